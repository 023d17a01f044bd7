"""
Turn FineWeb parquet shards into train.bin / val.bin: raw uint16 GPT-2 token streams that np.memmap
reads (nanoGPT's format), plus meta.json describing them. The tokenizer and the EOT rule (one
<|endoftext|> prepended to every document) come from tokenizer.py at the repo root.

    python data/fineweb/prepare.py                             # downloads data/CC-MAIN-2013-20/000_00000.parquet
    python data/fineweb/prepare.py --dump CC-MAIN-2013-20 --shard 3
    python data/fineweb/prepare.py --input shard.parquet       # a file, a glob or a folder of .parquet files
    python data/fineweb/prepare.py --input 'shards/*.parquet' --val_tokens 1000000 --workers 2

How it runs: row groups are read (only the needed columns), tokenized and split by `--workers`
processes, and written in input order by this process, at most 2 * workers row groups in flight, so
memory does not grow with the input. Outputs go to *.tmp files, are re-read and checked, then renamed;
meta.json is written last, so bins without a matching meta.json are an unfinished run. Running again on
the same inputs and settings does nothing (--force redoes it).

Validation split, by whole documents: document i (0-based, counting the rows of all inputs in order)
goes to val iff val_scores(seed, i) < threshold, a hash of (seed, i) alone, so the split does not depend
on --workers or row-group sizes. threshold is --val_fraction, or, with --val_tokens, the smallest one
whose documents reach that many tokens (by FineWeb's token_count column). If no document qualifies,
the last document goes to val, so val is never empty.

Null texts are skipped and counted (reported, and in meta.json): one bad row should not sink a run over
a 2 GB shard. They keep their index, so the other documents' split does not change. A `text` column
that is not strings is refused.
"""
import argparse
import glob
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections import deque
from functools import lru_cache
from pathlib import Path

try:
    import fcntl  # the out_dir lock; POSIX only
except ImportError:
    fcntl = None

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# tokenizer.py lives at the repo root, which is not on the path when this file runs as a script
REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from configurator import fail  # noqa: E402
from tokenizer import (ENCODING_NAME, EOT_PLACEMENT, EOT_TOKEN, TOKEN_DTYPE, VOCAB_SIZE,  # noqa: E402
                       encode_documents_flat, get_encoding, read_dataset_meta)

HF_REPO = "HuggingFaceFW/fineweb"
DEFAULT_DUMP = "CC-MAIN-2013-20"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent  # data/fineweb/, whatever the working directory
SPLITS = ("train", "val")
LOCK_NAME = "prepare.lock"
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize
VAL_RULE = ("document i (0-based over all rows of all sources, in order; skipped null texts keep their index) "
            "goes to val iff (splitmix64(splitmix64(seed) ^ i) >> 11) / 2**53 < threshold; if none does, "
            "the last document goes to val (see prepare.val_scores)")


class PrepareError(Exception):
    """A problem the user can fix; main() prints it as one line `error: ...` and exits with status 2."""


# -----------------------------------------------------------------------------
# finding the inputs

def download_shard(dump, shard):
    """The shard's local path, through huggingface_hub: its cache, its resume, its retries."""
    from huggingface_hub import hf_hub_download  # imported here: only the download path needs it
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError
    filename = f"data/{dump}/{shard:03d}_00000.parquet"
    try:
        return Path(hf_hub_download(repo_id=HF_REPO, repo_type="dataset", filename=filename))
    except LocalEntryNotFoundError:  # raised for "offline" and for "could not connect" alike
        raise PrepareError(f"cannot download {filename} from {HF_REPO}: the network is unreachable (or HF_HUB_OFFLINE "
                           f"is set) and it is not in the cache; fetch it elsewhere and pass --input PATH")
    except EntryNotFoundError:
        raise PrepareError(f"{HF_REPO} has no file {filename}: check --dump {dump} and --shard {shard}")
    except Exception as e:  # a download boundary: whatever went wrong, say it in one line with the way out
        raise PrepareError(f"cannot download {filename} from {HF_REPO} ({type(e).__name__}: {first_line(e)}); "
                           f"fetch it elsewhere and pass --input PATH")


def resolve_inputs(patterns):
    """The parquet files named by --input: files, globs and folders, each expanded in sorted order."""
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(path.glob("*.parquet"))
            if not found:
                raise PrepareError(f"{path}: the folder holds no .parquet files")
        elif any(char in pattern for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern) if Path(p).is_file())
            if not found:
                raise PrepareError(f"--input {pattern!r} matches no files")
        elif path.is_file():
            found = [path]
        else:
            raise PrepareError(f"{path}: no such file")
        paths += [p.resolve() for p in found]
    return paths


def first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def describe_source(path, name=None):
    """Check one input and describe it: name, size, mtime (the no-op check), rows, row groups."""
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{path}: not a parquet file ({first_line(e)})")
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise PrepareError(f"{path}: no 'text' column; it has: {', '.join(columns)}")
    text_type = parquet.schema_arrow.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise PrepareError(f"{path}: column 'text' holds {text_type}, expected strings")
    if parquet.metadata.num_rows == 0:
        raise PrepareError(f"{path}: the parquet is empty (0 rows)")
    stat = path.stat()
    return {"name": name or str(path), "path": str(path), "size": stat.st_size, "mtime": stat.st_mtime,
            "documents": parquet.metadata.num_rows,
            "row_group_rows": [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)],
            "has_token_count": "token_count" in columns}


# -----------------------------------------------------------------------------
# the validation split

def splitmix64(x):
    """The splitmix64 mixer on a uint64 array (numpy wraps uint64 arithmetic, as the algorithm needs)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def val_scores(seed, doc_indices):
    """A score in [0, 1) per document that depends only on (seed, global document index)."""
    key = splitmix64(np.array([seed], dtype=np.uint64))
    mixed = splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ key)
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


def threshold_for_val_tokens(sources, seed, val_tokens):
    """The smallest threshold whose documents hold >= val_tokens tokens (FineWeb's token_count + 1 EOT each)."""
    counts = []
    for source in sources:
        if not source["has_token_count"]:
            raise PrepareError(f"{source['path']}: --val_tokens needs FineWeb's token_count column and this file "
                               f"has none; use --val_fraction")
        column = pq.read_table(source["path"], columns=["token_count"]).column("token_count")
        counts.append(np.array([count or 0 for count in column.to_pylist()], dtype=np.int64))
    tokens_per_doc = np.concatenate(counts) + 1
    if val_tokens >= tokens_per_doc.sum():
        raise PrepareError(f"--val_tokens {val_tokens} must be below the input's {tokens_per_doc.sum()} tokens")
    scores = val_scores(seed, np.arange(len(tokens_per_doc)))
    order = np.argsort(scores, kind="stable")
    last_val = np.searchsorted(np.cumsum(tokens_per_doc[order]), val_tokens)  # first position reaching val_tokens
    return float(np.nextafter(scores[order[last_val]], 1.0))


def forced_val_doc(total_docs, seed, threshold):
    """The last document's index when the rule picks no document (val must not be empty), else -1."""
    picks_any = any((val_scores(seed, np.arange(start, min(start + 2**22, total_docs))) < threshold).any()
                    for start in range(0, total_docs, 2**22))
    return -1 if picks_any else total_docs - 1


# -----------------------------------------------------------------------------
# tokenizing, in worker processes

@lru_cache(maxsize=4)
def open_parquet(path):
    return pq.ParquetFile(path)  # kept open per worker: a big shard's footer is worth parsing once


def to_uint16(ids):
    """The ids as uint16, checked first: a cast would wrap an id >= 2**16 silently."""
    if ids.size and ids.max() >= VOCAB_SIZE:
        raise PrepareError(f"token id {ids.max()} >= vocab size {VOCAB_SIZE} ({2**16} fits uint16): tokenizer bug")
    return ids.astype(TOKEN_DTYPE)


def tokenize_row_group(task):
    """One row group in; its documents' tokens out, already split into train and val."""
    columns = ["text", "token_count"] if task["has_token_count"] else ["text"]
    try:
        table = open_parquet(task["path"]).read_row_group(task["row_group"], columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise PrepareError(f"{task['path']}: cannot read row group {task['row_group']} ({first_line(e)})")
    texts = table.column("text").to_pylist()
    doc_index = task["first_doc"] + np.arange(len(texts))
    is_val = (val_scores(task["seed"], doc_index) < task["threshold"]) | (doc_index == task["forced_val_doc"])
    split_texts = {"train": [], "val": []}
    for text, to_val in zip(texts, is_val):
        if text is not None:
            split_texts["val" if to_val else "train"].append(text)
    result = {"null_texts": texts.count(None), "token_count": None}
    if task["has_token_count"]:
        counts = table.column("token_count").to_pylist()
        result["token_count"] = sum(count or 0 for count, text in zip(counts, texts) if text is not None)
    for split, texts_of_split in split_texts.items():
        result[split] = to_uint16(encode_documents_flat(get_encoding(), texts_of_split))
        result[f"{split}_documents"] = len(texts_of_split)
        result[f"{split}_text_tokens"] = len(result[split]) - len(texts_of_split)  # without the EOTs
    return result


def tokenize_in_order(tasks, workers):
    """Each row group's result in input order, `workers` processes tokenizing ahead of the writer.

    At most 2 * workers row groups are in flight, so memory stays bounded however long the input is."""
    if workers == 1:  # no pool: one core gains nothing from it, and tests run faster in-process
        yield from map(tokenize_row_group, tasks)
        return
    # spawn, not fork: the same on Linux and macOS, and no forking of a process that holds threads
    with mp.get_context("spawn").Pool(workers) as pool:
        in_flight = deque()
        for task in tasks:
            in_flight.append(pool.apply_async(tokenize_row_group, (task,)))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


# -----------------------------------------------------------------------------
# writing, checking, publishing

def append_tokens(file, tokens):
    file.write(tokens.data)


def write_splits(tasks, workers, tmp_paths, total_docs):
    """Tokenize all row groups into the temporary bins; returns the counts."""
    from tqdm import tqdm
    counts = {"null_texts": 0, "token_count": 0}
    for split in SPLITS:
        counts.update({f"{split}_documents": 0, f"{split}_text_tokens": 0})
    with open(tmp_paths["train"], "wb") as train_file, open(tmp_paths["val"], "wb") as val_file, \
            tqdm(total=total_docs, unit="doc", unit_scale=True, disable=None, smoothing=0.1) as bar:
        files = {"train": train_file, "val": val_file}
        for result in tokenize_in_order(tasks, workers):
            for split in SPLITS:
                append_tokens(files[split], result[split])
            for key in counts:
                counts[key] = None if None in (counts[key], result[key]) else counts[key] + result[key]
            bar.update(sum(result[f"{split}_documents"] for split in SPLITS) + result["null_texts"])
            tokens = sum(counts[f"{split}_text_tokens"] + counts[f"{split}_documents"] for split in SPLITS)
            bar.set_postfix_str(f"{tokens / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.2f}M tok/s", refresh=False)
        for file in files.values():
            file.flush()
            os.fsync(file.fileno())  # the rename must not publish data still only in the page cache
    return counts


def verify_split_file(path, documents, tokens):
    """Re-read a written bin: its size, exactly one EOT per document (encode_ordinary never emits EOT),
    every id below the vocabulary. Returns its largest id, which meta.json records so that train.py
    need not read the whole file again."""
    if path.stat().st_size != tokens * TOKEN_BYTES:
        raise PrepareError(f"verification failed: {path} holds {path.stat().st_size} bytes, expected {tokens} tokens")
    eots, first, largest = 0, None, -1
    with open(path, "rb") as f:  # read in chunks, not np.memmap: mapped pages would count against our RSS
        while (ids := np.fromfile(f, dtype=TOKEN_DTYPE, count=2**22)).size:
            first = ids[0] if first is None else first
            eots += int(np.count_nonzero(ids == EOT_TOKEN))
            largest = max(largest, int(ids.max()))
    if eots != documents or (documents and first != EOT_TOKEN):
        raise PrepareError(f"verification failed: {path} holds {eots} EOT tokens for {documents} documents")
    if largest >= VOCAB_SIZE:
        raise PrepareError(f"verification failed: {path} holds token id {largest} >= vocab size {VOCAB_SIZE}")
    return largest


def write_json_atomically(path, data):
    tmp_path = path.with_name(path.name + ".tmp")
    with open(tmp_path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)


def check_writable(out_dir):
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as e:
        raise PrepareError(f"{out_dir}: the output folder is not writable ({e.strerror or e})")


def lock_out_dir(out_dir):
    """Hold out_dir/prepare.lock until release_lock: a second prepare.py into the same folder is refused
    instead of deleting this run's files. flock is dropped by the kernel when the process ends, even on
    SIGKILL, so a stale lock never blocks a later run. (POSIX only: on Windows there is no lock.)"""
    if fcntl is None:
        return None
    path = out_dir / LOCK_NAME
    while True:
        lock_file = open(path, "a+")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise PrepareError(f"{out_dir}: another prepare.py ({holder}) is writing to this folder; wait for it "
                               f"to finish or choose another --out_dir")
        # the holder we waited on may have removed the file before we locked it: then lock the new one
        if path.exists() and os.path.samestat(os.fstat(lock_file.fileno()), path.stat()):
            break
        lock_file.close()
    lock_file.truncate(0)
    lock_file.write(f"pid {os.getpid()}")
    lock_file.flush()
    return lock_file


def release_lock(out_dir, lock_file):
    if lock_file is not None:
        (out_dir / LOCK_NAME).unlink(missing_ok=True)  # removed while still held, so no one locks a stale file
        lock_file.close()


def matches_request(meta, sources, val_split):
    """Whether meta.json came from these very inputs and split settings (then a rerun is a no-op)."""
    def key(source):
        return source["name"], source["size"], source["mtime"]
    return ([key(s) for s in meta.get("sources", [])] == [key(s) for s in sources]
            and all(meta.get("val_split", {}).get(k) == v for k, v in val_split.items()))


# -----------------------------------------------------------------------------

def parse_args(argv):
    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message):
            fail(f"{message} (see --help)")

    parser = OneLineErrors(description="FineWeb parquet -> train.bin, val.bin (uint16 GPT-2 tokens), meta.json")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="local parquet: a file, a glob or a folder (several: processed in order into one pair)")
    parser.add_argument("--dump", help=f"FineWeb dump to download (default {DEFAULT_DUMP})")
    parser.add_argument("--shard", type=int, help="file index in the dump: data/{dump}/{shard:03d}_00000.parquet (default 0)")
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="where the bins go (default: this folder)")
    val_size = parser.add_mutually_exclusive_group()
    val_size.add_argument("--val_fraction", type=float, help="expected fraction of documents in val (default 0.005)")
    val_size.add_argument("--val_tokens", type=int, help="val size in tokens instead (needs FineWeb's token_count)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the val split")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="tokenizer processes (default: every core)")
    parser.add_argument("--force", action="store_true", help="redo even if the outputs match the inputs")
    args = parser.parse_args(argv)
    if args.input and (args.dump is not None or args.shard is not None):
        parser.error("--input and --dump/--shard are alternatives: give one")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        parser.error(f"--val_fraction {args.val_fraction}: must be between 0 and 1 (exclusive)")
    if args.val_tokens is not None and args.val_tokens < 1:
        parser.error(f"--val_tokens {args.val_tokens}: must be at least 1")
    if not 0 <= args.seed < 2**64:
        parser.error(f"--seed {args.seed}: must be between 0 and 2**64 - 1")
    if args.workers < 1:
        parser.error(f"--workers {args.workers}: must be at least 1")
    if args.shard is not None and not 0 <= args.shard <= 999:
        parser.error(f"--shard {args.shard}: must be between 0 and 999")
    if args.val_fraction is None and args.val_tokens is None:
        args.val_fraction = 0.005
    return args


def find_sources(args):
    if args.input:
        return [describe_source(path) for path in resolve_inputs(args.input)]
    dump, shard = args.dump or DEFAULT_DUMP, args.shard or 0
    path = download_shard(dump, shard)
    return [describe_source(path, name=f"hf://datasets/{HF_REPO}/data/{dump}/{shard:03d}_00000.parquet")]


def row_group_tasks(sources, seed, threshold, forced_val):
    first_doc = 0
    for source in sources:
        for row_group, rows in enumerate(source["row_group_rows"]):
            yield {"path": source["path"], "row_group": row_group, "first_doc": first_doc, "seed": seed,
                   "threshold": threshold, "forced_val_doc": forced_val, "has_token_count": source["has_token_count"]}
            first_doc += rows


def prepare(args):
    out_dir = args.out_dir.resolve()
    check_writable(out_dir)
    lock = lock_out_dir(out_dir)
    try:
        return prepare_locked(args, out_dir)
    finally:
        release_lock(out_dir, lock)


def prepare_locked(args, out_dir):
    t0 = time.time()
    sources = find_sources(args)
    val_request = {"seed": args.seed}
    val_request.update({"val_tokens": args.val_tokens} if args.val_tokens else {"val_fraction": args.val_fraction})
    if not args.force:
        try:
            meta = read_dataset_meta(out_dir)
        except (FileNotFoundError, ValueError):
            meta = None
        if meta and matches_request(meta, sources, val_request):
            print(f"{out_dir}: train.bin and val.bin already hold these inputs "
                  f"({meta['splits']['train']['tokens']:,} + {meta['splits']['val']['tokens']:,} tokens); "
                  f"nothing to do (--force redoes it)")
            return meta

    total_docs = sum(source["documents"] for source in sources)
    threshold = args.val_fraction or threshold_for_val_tokens(sources, args.seed, args.val_tokens)
    forced_val = forced_val_doc(total_docs, args.seed, threshold)
    row_groups = sum(len(source["row_group_rows"]) for source in sources)
    print(f"tokenizing {len(sources)} file(s), {total_docs:,} documents in {row_groups} row groups "
          f"with {args.workers} worker(s) -> {out_dir}")

    # from here on the old outputs are invalid: without meta.json no reader accepts the bins
    for name in ("meta.json", "train.bin", "val.bin"):
        (out_dir / name).unlink(missing_ok=True)
    tmp_paths = {split: out_dir / f"{split}.bin.tmp" for split in SPLITS}
    complete = False
    try:
        counts = write_splits(row_group_tasks(sources, args.seed, threshold, forced_val), args.workers,
                              tmp_paths, total_docs)
        splits = {split: {"documents": counts[f"{split}_documents"],
                          "tokens": counts[f"{split}_text_tokens"] + counts[f"{split}_documents"],
                          "file": f"{split}.bin"} for split in SPLITS}
        for split in SPLITS:
            if splits[split]["documents"] == 0:  # only possible with null texts or a val_fraction near 1
                raise PrepareError(f"the {split} split came out empty; change --val_fraction/--val_tokens")
            splits[split]["max_token_id"] = verify_split_file(tmp_paths[split], splits[split]["documents"],
                                                              splits[split]["tokens"])
        meta = make_meta(sources, splits, counts, val_request, threshold, forced_val, args.workers, time.time() - t0)
        for split in SPLITS:
            os.replace(tmp_paths[split], out_dir / f"{split}.bin")
        write_json_atomically(out_dir / "meta.json", meta)  # last: it marks the bins as complete
        complete = True
    except OSError as e:
        raise PrepareError(f"{out_dir}: writing failed ({e.strerror or e}); partial outputs removed")
    finally:
        unfinished = [out_dir / "meta.json.tmp", *tmp_paths.values()]
        unfinished += [] if complete else [out_dir / f"{split}.bin" for split in SPLITS]
        for path in unfinished:
            path.unlink(missing_ok=True)
    print_summary(meta, out_dir)
    return meta


def make_meta(sources, splits, counts, val_request, threshold, forced_val, workers, seconds):
    text_tokens = counts["train_text_tokens"] + counts["val_text_tokens"]
    return {"tokenizer": ENCODING_NAME, "vocab_size": VOCAB_SIZE, "eot_token": EOT_TOKEN,
            "eot_placement": EOT_PLACEMENT, "dtype": np.dtype(TOKEN_DTYPE).name, "splits": splits,
            "sources": [{k: s[k] for k in ("name", "path", "size", "mtime", "documents")} for s in sources],
            "val_split": {"rule": VAL_RULE, **val_request, "threshold": threshold, "forced_last_doc": forced_val >= 0},
            "null_texts_skipped": counts["null_texts"],
            "token_count_diff": None if counts["token_count"] is None else text_tokens - counts["token_count"],
            "workers": workers, "seconds": round(seconds, 2)}


def print_summary(meta, out_dir):
    total_tokens = sum(info["tokens"] for info in meta["splits"].values())
    for split, info in meta["splits"].items():
        print(f"{split:>5}: {info['documents']:>11,} docs {info['tokens']:>15,} tokens "
              f"({info['tokens'] / total_tokens:7.2%}) -> {out_dir / info['file']}")
    if meta["null_texts_skipped"]:
        print(f"warning: skipped {meta['null_texts_skipped']:,} documents with a null text")
    if meta["token_count_diff"] is not None:
        print(f"tokens written minus FineWeb's token_count column: {meta['token_count_diff']:+,}")
    print(f"done in {meta['seconds']:.1f} s ({total_tokens / max(meta['seconds'], 1e-6) / 1e6:.2f}M tokens/s); "
          f"meta: {out_dir / 'meta.json'}")


def main(argv=None):
    args = parse_args(argv)
    try:
        return prepare(args)
    except PrepareError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
