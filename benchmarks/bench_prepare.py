"""
How close data/fineweb/prepare.py runs to the tokenizer's own speed, and how much memory it takes.

    python benchmarks/bench_prepare.py                       # on ../shared/corpus/en_docs.parquet
    python benchmarks/bench_prepare.py --repeat_to_gb 1      # en_docs repeated into a >= 1 GiB parquet (temp dir)
    python benchmarks/bench_prepare.py --input shard.parquet --workers 2

Prints, for the same text and the same worker count:
  end-to-end tokens/s    prepare.py run as a user runs it (a subprocess, --force), timed by the wall clock
  tokenizer-only tokens/s  encode_ordinary alone on text already in memory, the faster of tiktoken's batch
                           threads and worker processes; on a repeated parquet, one copy of the text
  their ratio, and the peak RSS of prepare.py: summed over its process tree (psutil, sampled every 50 ms)
  and of its largest single process (getrusage RUSAGE_CHILDREN).
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
from tokenizer import get_encoding  # noqa: E402

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


def run_prepare(input_path, workers, out_dir):
    """prepare.py as a subprocess: (wall seconds, its meta.json, peak RSS summed over its process tree)."""
    args = [sys.executable, str(PREPARE), "--input", str(input_path), "--out_dir", str(out_dir),
            "--workers", str(workers), "--force"]
    t0 = time.time()
    proc = subprocess.Popen(args)
    peak = [0]

    def sample_tree_rss():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
            except psutil.Error:  # a process ended between listing and reading it
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_tree_rss, daemon=True)
    sampler.start()
    if proc.wait() != 0:
        sys.exit(f"prepare.py exited {proc.returncode}")
    seconds = time.time() - t0
    sampler.join()
    return seconds, json.loads((out_dir / "meta.json").read_text()), peak[0]


def read_texts(path, row_groups):
    parquet = pq.ParquetFile(path)
    return [t for rg in row_groups for t in parquet.read_row_group(rg, columns=["text"]).column("text").to_pylist()
            if t is not None]


def encode_with_threads(texts, workers):
    enc = get_encoding()
    t0 = time.time()
    tokens = sum(map(len, enc.encode_ordinary_batch(texts, num_threads=workers)))
    return tokens, time.time() - t0


_worker_texts = None


def load_share(path, row_groups):
    global _worker_texts
    _worker_texts = read_texts(path, row_groups)
    get_encoding()


def encode_share(_):
    return sum(map(len, get_encoding().encode_ordinary_batch(_worker_texts, num_threads=1)))


def encode_with_processes(path, row_groups, workers):
    """Each worker process loads its share of the row groups first; only the encoding is timed."""
    with mp.get_context("spawn").Pool(workers) as pool:
        shares = [(path, row_groups[k::workers]) for k in range(workers)]
        pool.starmap(load_share, shares, chunksize=1)  # one share per worker: each is busy until loaded
        t0 = time.time()
        tokens = sum(pool.map(encode_share, range(workers), chunksize=1))
        return tokens, time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--repeat_to_gb", type=float, help="benchmark on --input repeated into a parquet this big")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    if not args.input.exists():
        sys.exit(f"{args.input}: no such file (pass --input PATH)")

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        input_path = args.input
        if args.repeat_to_gb:
            input_path = make_repeated_parquet(args.input, Path(tmp) / "repeated.parquet", args.repeat_to_gb)
        seconds, meta, tree_peak = run_prepare(input_path, args.workers, Path(tmp) / "out")
        largest_process_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
        end_to_end = sum(s["tokens"] for s in meta["splits"].values()) / seconds

        # the tokenizer alone on the same text: the source, which a repeated parquet holds again and again
        row_groups = list(range(pq.ParquetFile(args.input).num_row_groups))
        texts = read_texts(args.input, row_groups)
        thread_tokens, thread_seconds = encode_with_threads(texts, args.workers)
        del texts
        process_tokens, process_seconds = encode_with_processes(args.input, row_groups, args.workers)
        assert thread_tokens == process_tokens
        threads, processes = thread_tokens / thread_seconds, process_tokens / process_seconds
        tokenizer_only = max(threads, processes)

    total_tokens = sum(s["tokens"] for s in meta["splits"].values())
    print(f"\ninput: {input_path.name} ({os.path.getsize(args.input) / 2**20:.0f} MiB source"
          f"{f', repeated to {args.repeat_to_gb} GiB' if args.repeat_to_gb else ''}), workers: {args.workers}, "
          f"cores: {os.cpu_count()}")
    print(f"end-to-end:     {end_to_end / 1e6:6.2f} M tokens/s  ({total_tokens:,} tokens in {seconds:.1f} s wall, "
          f"process start included; prepare.py's own clock: {total_tokens / meta['seconds'] / 1e6:.2f} M tokens/s)")
    print(f"tokenizer-only: {tokenizer_only / 1e6:6.2f} M tokens/s  (encode_ordinary on {thread_tokens:,} tokens in "
          f"memory: {threads / 1e6:.2f} with {args.workers} batch threads, {processes / 1e6:.2f} with "
          f"{args.workers} processes)")
    print(f"ratio:          {end_to_end / tokenizer_only:6.2f}")
    print(f"peak RSS:       {tree_peak / 2**20:6.0f} MiB summed over prepare.py's process tree, "
          f"{largest_process_peak / 2**20:.0f} MiB its largest process")


if __name__ == "__main__":
    main()
