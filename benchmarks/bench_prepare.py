"""
How close data/fineweb/prepare.py runs to the tokenizer's own speed, and how much memory it takes.

    python benchmarks/bench_prepare.py                       # on ../shared/corpus/en_docs.parquet
    python benchmarks/bench_prepare.py --repeat_to_gb 1      # en_docs repeated into a >= 1 GiB parquet (temp dir)
    python benchmarks/bench_prepare.py --input shard.parquet --workers 2
    python benchmarks/bench_prepare.py --runs 1 3 datasets   # one input; the input 3 times (3 sources, one
                                                             # pair of bins); one input through --hf_dataset

Prints, for the same text and the same worker count:
  end-to-end tokens/s    prepare.py run as a user runs it (a subprocess, --force), timed by the wall clock
  tokenizer-only tokens/s  encode_ordinary alone on text already in memory, the faster of tiktoken's batch
                           threads and worker processes; on a repeated parquet, one copy of the text
  their ratio; the same ratio in CPU time per token (what the wall-clock ratio is on otherwise idle cores);
  and the peak RSS of prepare.py and its workers: summed, and of the largest (psutil, sampled every 50 ms).
With --runs, one such line per run, all against the same tokenizer-only figure, so their ratios compare
side by side on a machine whose load changes.
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
SHARED_TIKTOKEN = REPO_ROOT.parent / "shared" / "tiktoken_cache"
if SHARED_TIKTOKEN.is_dir():  # offline machines: the GPT-2 BPE files from ../shared
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_TIKTOKEN))
from kit.tokenizer import get_encoding  # noqa: E402

PREPARE = REPO_ROOT / "data" / "fineweb" / "prepare.py"
DEFAULT_INPUT = REPO_ROOT.parent / "shared" / "corpus" / "en_docs.parquet"


def make_repeated_parquet(source, path, target_gib):
    """source's row groups written again and again (same codec) until the file reaches target_gib."""
    parquet = pq.ParquetFile(source)
    copies = math.ceil(target_gib * 2**30 / os.path.getsize(source))
    codec = parquet.metadata.row_group(0).column(0).compression.lower()
    with pq.ParquetWriter(path, parquet.schema_arrow, compression=codec) as writer:
        for _ in range(copies):
            for row_group in range(parquet.num_row_groups):
                writer.write_table(parquet.read_row_group(row_group))
    print(f"wrote {path}: {copies} copies of {source}, {os.path.getsize(path) / 2**30:.2f} GiB")
    return path


def run_prepare(input_path, workers, out_dir, how="1", prepare=PREPARE):
    """prepare.py as a subprocess: wall seconds, CPU seconds (its workers included), meta.json, peak RSS.
    how: "N" = the input given N times (N sources), "datasets" = read through --hf_dataset parquet."""
    source = (["--hf_dataset", "parquet", "--hf_data_files", str(input_path)] if how == "datasets"
              else ["--input"] + [str(input_path)] * int(how))
    args = [sys.executable, str(prepare), *source, "--out_dir", str(out_dir), "--workers", str(workers), "--force"]
    cpu_before = children_cpu_seconds()
    t0 = time.time()
    proc = subprocess.Popen(args)
    peak = {"tree": 0, "largest": 0}

    def sample_rss():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = [p.memory_info().rss for p in [root] + root.children(recursive=True)]
                peak.update(tree=max(peak["tree"], sum(rss)), largest=max(peak["largest"], *rss))
            except psutil.Error:  # a process ended between listing and reading it
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        sys.exit(f"prepare.py exited {proc.returncode}")
    seconds = time.time() - t0
    sampler.join()
    return {"seconds": seconds, "cpu_seconds": children_cpu_seconds() - cpu_before,
            "meta": json.loads((out_dir / "meta.json").read_text()), "peak_rss": peak}


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children and their reaped children
    return usage.ru_utime + usage.ru_stime


def read_texts(path, row_groups):
    """Texts per row group: encoding batch by batch keeps the token lists (~36 bytes per id) small."""
    parquet = pq.ParquetFile(path)
    return [[t for t in parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist() if t is not None]
            for rg in row_groups]


def encode_with_threads(path, workers):
    """tiktoken's own parallelism: encode_ordinary_batch's threads (they release the GIL while encoding)."""
    texts = read_texts(path, range(pq.ParquetFile(path).num_row_groups))
    enc = get_encoding()
    t0, cpu0 = time.time(), time.process_time()
    tokens = sum(sum(map(len, enc.encode_ordinary_batch(batch, num_threads=workers))) for batch in texts)
    return tokens, time.time() - t0, time.process_time() - cpu0


_worker_texts = None


def load_share(path, row_groups):
    global _worker_texts
    _worker_texts = read_texts(path, row_groups)
    get_encoding()


def encode_share(_):
    cpu0 = time.process_time()
    enc = get_encoding()
    tokens = sum(sum(map(len, enc.encode_ordinary_batch(batch, num_threads=1))) for batch in _worker_texts)
    return tokens, time.process_time() - cpu0


def encode_with_processes(path, workers):
    """Worker processes, as prepare.py uses: each loads its share of the text first; only encoding is timed."""
    row_groups = list(range(pq.ParquetFile(path).num_row_groups))
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.starmap(load_share, [(path, row_groups[k::workers]) for k in range(workers)], chunksize=1)
        t0 = time.time()
        results = pool.map(encode_share, range(workers), chunksize=1)
        return sum(r[0] for r in results), time.time() - t0, sum(r[1] for r in results)


def measure_tokenizer(path, workers):
    """The faster of the two ways to run encode_ordinary on `workers` cores: (tokens/s, CPU s/token, detail)."""
    by_threads, by_processes = encode_with_threads(path, workers), encode_with_processes(path, workers)
    assert by_threads[0] == by_processes[0]
    rates = {"threads": by_threads[0] / by_threads[1], "processes": by_processes[0] / by_processes[1]}
    cpu_per_token = min(by_threads[2], by_processes[2]) / by_threads[0]
    return max(rates.values()), cpu_per_token, rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--repeat_to_gb", type=float, help="benchmark on --input repeated into a parquet this big")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--runs", nargs="+", default=["1"], metavar="N|datasets",
                        help="prepare.py runs to time: N = the input N times as N sources; datasets = --hf_dataset")
    parser.add_argument("--compare_with", type=Path, metavar="PREPARE_PY",
                        help="also time another version of prepare.py (e.g. an older checkout's) on one input")
    args = parser.parse_args()
    if not args.input.exists():
        sys.exit(f"{args.input}: no such file (pass --input PATH)")

    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        input_path = args.input
        if args.repeat_to_gb:
            input_path = make_repeated_parquet(args.input, Path(tmp) / "repeated.parquet", args.repeat_to_gb)
        # the tokenizer alone on the same text (a repeated parquet holds --input's text again and again),
        # before and after the runs, keeping the faster: other users of the cores come and go
        before = measure_tokenizer(args.input, args.workers)
        for how in args.runs:
            runs[how] = run_prepare(input_path, args.workers, Path(tmp) / "out", how)
        if args.compare_with:
            runs[str(args.compare_with)] = run_prepare(input_path, args.workers, Path(tmp) / "other", "1",
                                                       prepare=args.compare_with)
        after = measure_tokenizer(args.input, args.workers)
        input_mib = os.path.getsize(input_path) / 2**20  # before the temporary folder goes
    tokenizer_only, tokenizer_cpu_per_token, rates = max(before, after, key=lambda m: m[0])

    print(f"\ninput: {input_path.name} ({input_mib:,.0f} MiB), workers: {args.workers}, cores: {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"tokenizer-only: {tokenizer_only / 1e6:6.2f} M tokens/s  (encode_ordinary on {args.input.name}'s text in "
          f"memory: {rates['threads'] / 1e6:.2f} with {args.workers} batch threads, {rates['processes'] / 1e6:.2f} "
          f"with {args.workers} processes; best of before and after the runs)")
    for how, run in runs.items():
        tokens = sum(s["tokens"] for s in run["meta"]["splits"].values())
        end_to_end = tokens / run["seconds"]
        label = {"datasets": "through datasets", str(args.compare_with): f"{args.compare_with}, 1 input"}.get(
            how, f"{how} input(s)")
        print(f"\n{label}:")
        own_clock = tokens / run["meta"]["seconds"] / 1e6
        print(f"  end-to-end:     {end_to_end / 1e6:6.2f} M tokens/s  ({tokens:,} tokens in {run['seconds']:.1f} s "
              f"wall, interpreter start included; by prepare.py's own clock {own_clock:.2f})")
        print(f"  ratio:          {end_to_end / tokenizer_only:6.2f}")
        print(f"  CPU per token:  {run['cpu_seconds'] / tokens * 1e9:6.0f} ns end-to-end, "
              f"{tokenizer_cpu_per_token * 1e9:.0f} ns tokenizer-only: ratio "
              f"{tokenizer_cpu_per_token * tokens / run['cpu_seconds']:.2f} (what the wall-clock ratio would be "
              f"with the cores to ourselves)")
        print(f"  peak RSS:       {run['peak_rss']['tree'] / 2**20:6.0f} MiB summed over prepare.py's process tree, "
              f"{run['peak_rss']['largest'] / 2**20:.0f} MiB its largest process (psutil, every 50 ms)")


if __name__ == "__main__":
    main()
