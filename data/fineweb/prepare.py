"""
FineWeb parquet shards (or any Hugging Face text dataset) -> train.bin / val.bin, raw uint16 GPT-2 token
streams (nanoGPT's format), and meta.json describing them. sources.py, beside this file, finds, checks and
downloads the inputs; docs/data.md describes every option and behaviour.

    python data/fineweb/prepare.py                        # FineWeb, dump CC-MAIN-2013-20, its first file
    python data/fineweb/prepare.py --input shard.parquet  # a file, a glob or a folder of .parquet files
    python data/fineweb/prepare.py --pretokenized kjj0/fineweb10B-gpt2 --shards 1-8  # llm.c shards (pretokenized.py)

The bins grow in out_dir/prepare.work/, resumable source by source, and are renamed into out_dir when checked.
"""
import argparse
import json
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# the repo root is not on the path when this file runs as a script (sources.py, beside it, is)
HERE = Path(__file__).resolve().parent
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))
import pretokenized  # noqa: E402
from kit.atomic import FolderInUse, atomic_write, check_writable, lock_folder, unlock_folder  # noqa: E402
from configurator import STOP_SIGNALS, fail, first_line, handle_signals  # noqa: E402
from sources import (DEFAULT_DUMP, HF_REPO, Prefetch, PrepareError, dataset_source, describe_parquet,  # noqa: E402
                     hub_sources, local_source, resolve_inputs, stream_batches)
from kit.tokenizer import (EOT_TOKEN, TOKEN_DTYPE, TOKENIZER_META, VOCAB_SIZE, TokenizerUnavailable,  # noqa: E402
                           encode_documents_flat, get_encoding, max_token_id, publish_dataset, read_dataset_meta)

DEFAULT_OUT_DIR = HERE  # data/fineweb/, whatever the working directory
SPLITS = ("train", "val")
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize
LOCK_NAME, WORK_NAME = "prepare.lock", "prepare.work"  # the work folder: the unfinished run's bins and manifest
COUNTS = ("rows", "null_texts", "token_count", "train_documents", "train_tokens", "val_documents",
          "val_tokens")  # per batch, per source (the manifest) and per run; train/val tokens: with their EOTs
VAL_RULE = ("document i of each source (0-based within its file or stream; skipped null texts keep their index) "
            "goes to val iff (splitmix64(splitmix64(seed) ^ i) >> 11) / 2**53 < threshold (see prepare.val_scores)")
PAUSE_AT = os.environ.get("FINEWEB_GPT_TEST_PAUSE_AT", "")  # for the tests: see pause_at


# -----------------------------------------------------------------------------
# the validation split: a hash of (seed, document index within its source), so it does not depend on
# --workers, row-group sizes or the other sources

def splitmix64(x):
    """The splitmix64 mixer on a uint64 array (numpy wraps uint64 arithmetic, as the algorithm needs)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def val_scores(seed, doc_indices):
    """A score in [0, 1) per document that depends only on (seed, document index in its source)."""
    mixed = splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ splitmix64(np.array([seed], dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / 2.0**53


# -----------------------------------------------------------------------------
# tokenizing: a task is a parquet row group or a batch of streamed documents

@lru_cache(maxsize=4)
def open_parquet(path):
    return pq.ParquetFile(path)  # kept open per worker: a big shard's footer is worth parsing once


def tokenize_task(task):
    """One batch of documents in; their tokens out, already split into train and val, with their COUNTS.
    Null texts are skipped and counted, keeping their index: one bad row should not sink a 2 GB shard."""
    pause_at("tokenizing")
    texts, token_count = task.get("texts"), None
    if texts is None:
        try:
            table = open_parquet(task["path"]).read_row_group(task["row_group"], columns=task["columns"])
        except (pa.ArrowException, OSError) as e:
            raise PrepareError(f"{task['path']}: cannot read row group {task['row_group']} ({first_line(e)})")
        texts = table.column("text").to_pylist()
        if "token_count" in task["columns"]:
            counts = table.column("token_count").to_pylist()
            token_count = sum(n or 0 for n, text in zip(counts, texts) if text is not None)
    doc_index = task["first_doc"] + np.arange(len(texts))
    is_val = val_scores(task["seed"], doc_index) < task["threshold"]
    result = {"rows": len(texts), "null_texts": texts.count(None), "token_count": token_count}
    for split, to_val in (("train", False), ("val", True)):
        kept = [text for text, v in zip(texts, is_val) if v == to_val and text is not None]
        ids = encode_documents_flat(get_encoding(), kept)
        if ids.size and ids.max() >= VOCAB_SIZE:  # the one check of the ids: the uint16 cast would wrap them
            raise PrepareError(f"token id {ids.max()} >= vocab size {VOCAB_SIZE}: tokenizer bug")
        result[split] = ids.astype(TOKEN_DTYPE)
        result[f"{split}_documents"], result[f"{split}_tokens"] = len(kept), len(ids)
    return result


def source_tasks(source, path, args):
    """One source's tasks: its row groups, or batches of its streamed documents."""
    common = {"seed": args.seed, "threshold": args.val_fraction}
    if source.get("stream"):
        return (dict(common, texts=texts, first_doc=first) for first, texts in stream_batches(args))
    described = describe_parquet(path)
    common.update(path=described["path"],
                  columns=["text", "token_count"] if described["has_token_count"] else ["text"])
    starts = np.cumsum([0] + described["row_group_rows"][:-1])
    return (dict(common, row_group=k, first_doc=int(start)) for k, start in enumerate(starts))


class WorkerDied(Exception):
    pass


class Workers:
    """--workers processes running serve(), each given at most two tasks, read back in input order. Plain pipes,
    not multiprocessing: a dead worker shows at once as a closed pipe, and no resource tracker outlives us."""

    def __init__(self, count):
        code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import prepare; prepare.serve({os.getpid()})"
        # a session of their own: Ctrl-C and a closed terminal reach this process alone, which stops them
        self.procs = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       start_new_session=True) for _ in range(count)]

    def tokenize_in_order(self, tasks):
        in_flight = deque()
        try:
            for k, task in enumerate(tasks):
                in_flight.append(self.procs[k % len(self.procs)])
                send(in_flight[-1].stdin.fileno(), task)
                if len(in_flight) == 2 * len(self.procs):
                    yield receive(in_flight.popleft().stdout)
            while in_flight:
                yield receive(in_flight.popleft().stdout)
        except (BrokenPipeError, EOFError):
            raise WorkerDied from None

    def stop(self):
        for proc in self.procs:  # busy or idle: they hold no files, and nothing they hold is needed any more
            proc.kill()
            proc.wait()
            proc.stdin.close()
            proc.stdout.close()


def send(fd, message):
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(len(data).to_bytes(8, "little") + data)
    while view:  # os.write, not a buffered file: nothing is left to flush into a closed pipe at exit
        view = view[os.write(fd, view):]


def receive(stream):
    """The next message, raised if it is an exception; EOFError when the writer is gone, even mid-message."""
    size = int.from_bytes(header := stream.read(8), "little")
    data = stream.read(size) if len(header) == 8 else b""
    if len(header) < 8 or len(data) < size:
        raise EOFError
    if isinstance(message := pickle.loads(data), Exception):  # a worker's PrepareError or TokenizerUnavailable
        raise message
    return message


def serve(parent):
    """A tokenizer process: tasks from stdin until it closes, each result (or its error) to stdout. It ends
    with its parent: on Linux at once (the kernel's PR_SET_PDEATHSIG), elsewhere when it finds the pipes closed."""
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before that call
        return
    tasks = queue.Queue()

    def read_ahead():  # the parent never blocks handing over a task while this process blocks sending a result
        try:
            while True:
                tasks.put(receive(sys.stdin.buffer))
        except EOFError:
            tasks.put(None)

    threading.Thread(target=read_ahead, daemon=True).start()
    while (task := tasks.get()) is not None:
        try:
            result = tokenize_task(task)
        except Exception as e:  # raised again in the parent, which says it in one line
            result = e
        try:
            send(sys.stdout.fileno(), result)
        except BrokenPipeError:
            return


def pause_at(point):
    """For the tests, off unless FINEWEB_GPT_TEST_PAUSE_AT is "<point>:<file>": the first process at the point
    writes its pid into that new file and waits while the file exists. A test then acts (a signal, a kill) at
    that very moment, not after a sleep that may be too short."""
    name, _, path = PAUSE_AT.partition(":")
    try:
        if name == point:
            with open(path, "x") as f:
                f.write(f"{os.getpid()}\n")
            while os.path.exists(path):
                time.sleep(0.01)
    except FileExistsError:  # another process waits there
        pass


# -----------------------------------------------------------------------------
# writing: the work folder, its manifest, one source after another

def summed(entries):
    """The COUNTS of several batches or sources; token_count stays None once one of them had no such column."""
    total = dict.fromkeys(COUNTS, 0)
    for entry in entries:
        total = {k: None if None in (total[k], entry[k]) else total[k] + entry[k] for k in COUNTS}
    return total


def open_work(work_dir, request, force):
    """The manifest of the unfinished run in work_dir if it was for this very request, else a fresh one.
    Its bins are cut back to what the manifest counts: a killed run may have written past it."""
    try:
        manifest = json.loads((work_dir / "manifest.json").read_text())
        sizes = {split: (work_dir / f"{split}.bin").stat().st_size for split in SPLITS}
        done = {split: summed(manifest["done"])[f"{split}_tokens"] * TOKEN_BYTES for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):  # none, or not one this version wrote: start afresh
        manifest = None
    if manifest and not force and manifest.get("request") == request:
        if all(sizes[split] >= done[split] for split in SPLITS):
            for split in SPLITS:
                os.truncate(work_dir / f"{split}.bin", done[split])
            if manifest["done"]:
                print(f"continuing an unfinished run: {len(manifest['done'])} of {len(request['sources'])} "
                      f"source(s) already done ({work_dir})")
            return manifest
    if manifest and manifest["done"]:
        print(f"discarding an unfinished run of other inputs or settings{' (--force)' if force else ''}: {work_dir}")
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    manifest = {"request": request, "done": []}
    write_json_atomically(work_dir / "manifest.json", manifest)
    return manifest


def tokenize_sources(sources, manifest, work_dir, args):
    """Tokenize the sources the manifest does not list as done, appending to the work bins. The manifest is
    rewritten after each source (bins fsynced first), so a killed run continues with the source it was in."""
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # not its multiprocessing lock, which can start the resource tracker
    first = len(manifest["done"])
    tokens = sum(summed(manifest["done"])[f"{split}_tokens"] for split in SPLITS)
    prefetch = Prefetch(sources[first])
    prefetch.wait()  # the first download before our bar starts; later ones show huggingface_hub's bar under it
    workers = Workers(args.workers) if args.workers > 1 else None  # one core gains nothing from a process
    try:
        with open(work_dir / "train.bin", "ab") as train_file, open(work_dir / "val.bin", "ab") as val_file, \
                tqdm(unit="tok", unit_scale=True, disable=None, smoothing=0.1) as bar:
            files = {"train": train_file, "val": val_file}
            for k in range(first, len(sources)):
                path, source = prefetch.wait(), sources[k]
                prefetch = Prefetch(sources[k + 1]) if k + 1 < len(sources) else None
                tasks, counts = source_tasks(source, path, args), summed([])
                bar.set_postfix_str(f"source {k + 1}/{len(sources)}", refresh=False)
                for result in workers.tokenize_in_order(tasks) if workers else map(tokenize_task, tasks):
                    for split in SPLITS:
                        files[split].write(result[split].data)
                    counts = summed([counts, result])
                    tokens += result["train_tokens"] + result["val_tokens"]
                    bar.update(result["train_tokens"] + result["val_tokens"])
                    pause_at("batch_written")
                    if args.max_tokens and tokens >= args.max_tokens:
                        break
                for file in files.values():
                    file.flush()
                    os.fsync(file.fileno())  # the manifest must not count data still only in the page cache
                reached_max = bool(args.max_tokens) and tokens >= args.max_tokens
                manifest["done"].append({"name": source["name"], **counts})
                manifest["complete"] = reached_max or k == len(sources) - 1  # in the same write: no gap to fall into
                write_json_atomically(work_dir / "manifest.json", manifest)
                if source.get("remote") and not args.keep_parquet:  # from the Hub's cache: the link and its blob
                    path.resolve().unlink(missing_ok=True)
                    path.unlink(missing_ok=True)
                pause_at("source_done")
                if reached_max:
                    break
    finally:
        if workers:
            workers.stop()


# -----------------------------------------------------------------------------
# checking and publishing

def verify_split_file(path, documents, tokens):
    """Re-read a written bin: its size, and one EOT per document, each first (encode_ordinary never emits EOT).
    Returns its largest id: meta.json records it, so train.py need not read the bin again."""
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
    return largest


def unsplittable(total, names):
    """What is wrong with the input when train and val cannot each get a document, else None."""
    documents = total["train_documents"] + total["val_documents"]
    if documents == 0:
        return f"{names}: every text is null ({total['rows']:,} rows): there is nothing to tokenize"
    if documents == 1:
        return (f"{names}: the input holds a single document ({total['rows']:,} rows, {total['null_texts']:,} "
                f"null); a train and a val split need at least two")
    for split in SPLITS:
        if total[f"{split}_documents"] == 0:  # the rule put every document on one side: only its settings can fix it
            return f"the {split} split came out empty ({documents:,} documents); change --val_fraction"


def publish(out_dir, work_dir, manifest, sources, args, seconds):
    """Check the finished work bins, then move them over the dataset in out_dir, which is untouched until then."""
    total = summed(manifest["done"])
    if problem := unsplittable(total, ", ".join(source["name"] for source in sources)):
        manifest["done"].clear()  # nothing worth keeping: the same command would fail the same way
        raise PrepareError(problem)
    splits = {split: {"documents": total[f"{split}_documents"], "tokens": total[f"{split}_tokens"],
                      "file": f"{split}.bin"} for split in SPLITS}
    for info in splits.values():
        info["max_token_id"] = verify_split_file(work_dir / info["file"], info["documents"], info["tokens"])
    recorded = ("name", "path", "size", "mtime", "blob_id", "data_files")
    text_tokens = sum(info["tokens"] - info["documents"] for info in splits.values())  # as FineWeb counts: no EOTs
    meta = {**TOKENIZER_META, "splits": splits,
            "sources": [{**{k: v for k, v in source.items() if k in recorded}, "documents": entry["rows"]}
                        for source, entry in zip(sources, manifest["done"])],
            "val_split": {"rule": VAL_RULE, **val_request(args), "threshold": args.val_fraction},
            "null_texts_skipped": total["null_texts"],
            "token_count_diff": None if total["token_count"] is None else text_tokens - total["token_count"],
            "workers": args.workers, "seconds": round(seconds, 2),
            **({"max_tokens": args.max_tokens} if args.max_tokens else {})}
    publish_dataset(work_dir, out_dir, meta)
    return meta


def write_json_atomically(path, data):
    with atomic_write(path, "w") as f:
        json.dump(data, f, indent=2)


# -----------------------------------------------------------------------------

def parse_args(argv):
    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message):
            fail(f"{message} (see --help)")

    def shard_range(text):
        first, _, last = text.partition("-")
        if not (first.isdigit() and last.isdigit() and int(first) <= int(last)):
            raise argparse.ArgumentTypeError(f"{text!r} is not a range A-B of shard numbers with A <= B")
        return int(first), int(last)

    def yes_no(text):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"{text!r}: allowed are True or False")
        return text.lower() in ("true", "1", "yes")

    parser = OneLineErrors(description="FineWeb parquet -> train.bin, val.bin (uint16 GPT-2 tokens), meta.json")
    source = parser.add_mutually_exclusive_group()  # where the documents come from: one of these
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="local parquet: a file, a glob or a folder (several: processed in order into one pair)")
    source.add_argument("--dump", help=f"a dump of --repo, i.e. its folder data/<dump> (default {DEFAULT_DUMP})")
    source.add_argument("--subset", help="a sample folder of --repo instead, e.g. sample-10BT (sample/10BT)")
    source.add_argument("--hf_dataset", metavar="NAME", help="any Hugging Face text dataset, streamed by `datasets`")
    source.add_argument("--adopt", type=Path, metavar="DIR",
                        help="train.bin/val.bin written by another tool: check them and write their meta.json")
    parser.add_argument("--repo", default=HF_REPO, help=f"Hub dataset to download from (default {HF_REPO})")
    shards = parser.add_mutually_exclusive_group()
    shards.add_argument("--shard", type=int, help="the N-th file of the folder, sorted by name (default 0)")
    shards.add_argument("--shards", type=shard_range, metavar="A-B", help="files A to B of the folder, inclusive")
    parser.add_argument("--keep_parquet", type=yes_no, default=True, metavar="True|False",
                        help="keep downloaded shards in the Hugging Face cache (False: delete each once tokenized)")
    parser.add_argument("--hf_config", help="its configuration (datasets' `name`)")
    parser.add_argument("--hf_split", default="train", help="its split to read (default train)")
    parser.add_argument("--hf_data_files", nargs="+", metavar="PATH", help="data_files passed to datasets.load_dataset")
    parser.add_argument("--text_column", default="text", help="the column holding the text (default text)")
    parser.add_argument("--max_tokens", type=int, help="stop after the batch that reaches this many tokens")
    pretokenized.add_arguments(parser)
    parser.add_argument("--out_dir", type=Path, default=DEFAULT_OUT_DIR, help="where the bins go (default: here)")
    parser.add_argument("--val_fraction", type=float, help="expected fraction of documents in val (default 0.005)")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the val split")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: every core)",
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    parser.add_argument("--force", action="store_true", help="redo even if the outputs match the inputs")
    args = parser.parse_args(argv)
    if args.pretokenized or args.to_llmc:
        pretokenized.check_args(args, parser.error)
        return args
    hub_only = [f"--{k}" for k in ("shard", "shards") if getattr(args, k) is not None]
    hub_only += ["--repo"] if args.repo != HF_REPO else []
    other = next((f"--{k}" for k in ("input", "hf_dataset", "adopt") if getattr(args, k)), None)
    hf_only = args.hf_config or args.hf_data_files or args.hf_split != "train" or args.text_column != "text"
    for problem, message in [
            (hub_only and other, f"{' '.join(hub_only)} and {other} are alternatives: give one"),
            (hf_only and not args.hf_dataset,
             "--hf_config, --hf_split, --hf_data_files and --text_column go with --hf_dataset"),
            (args.val_fraction is not None and not 0 < args.val_fraction < 1,
             f"--val_fraction {args.val_fraction}: must be between 0 and 1 (exclusive)"),
            (args.max_tokens is not None and args.max_tokens < 1,
             f"--max_tokens {args.max_tokens}: must be at least 1"),
            (not 0 <= args.seed < 2**64, f"--seed {args.seed}: must be between 0 and 2**64 - 1"),
            (args.workers < 1, f"--workers {args.workers}: must be at least 1"),
            (args.shard is not None and args.shard < 0, f"--shard {args.shard}: must be 0 or more")]:
        if problem:
            parser.error(message)
    if args.val_fraction is None:  # None until here: pretokenized.check_args refuses it given
        args.val_fraction = 0.005
    return args


def lock_out_dir(path):
    """The output folder (--out_dir, or --adopt's), resolved, proven writable and locked. prepare.lock (the
    kernel releases it even on SIGKILL) refuses a second prepare.py that would delete this run's files."""
    try:
        path = path.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop: RuntimeError before Python 3.13
        raise PrepareError(f"{path}: cannot resolve the folder ({first_line(e)})")
    if path.exists() and not path.is_dir():
        raise PrepareError(f"{path}: not a folder; --out_dir names the folder for train.bin, val.bin and meta.json")
    try:
        check_writable(path)
        return path, lock_folder(path, LOCK_NAME)
    except FolderInUse as e:
        raise PrepareError(f"{path}: another prepare.py ({e.holder}) is writing to this folder; wait for it "
                           f"to finish or choose another --out_dir") from None
    except OSError as e:  # also a disk without room for one byte
        raise PrepareError(f"{path}: the output folder is not writable ({e.strerror or e})") from None


def identity(source):
    """What makes a source the same input again: for the no-op check and for continuing a killed run."""
    return {k: source.get(k) for k in ("name", "size", "mtime", "blob_id")}


def val_request(args):
    return {"seed": args.seed, "val_fraction": args.val_fraction}


def already_done(out_dir, sources, args):
    """meta.json of an earlier run from these very sources and settings, else None (a stream is never the same)."""
    try:
        meta = read_dataset_meta(out_dir)
        same = [identity(s) for s in meta.get("sources", [])] == [identity(s) for s in sources] and \
            all((meta.get("val_split") or {}).get(k) == v for k, v in val_request(args).items())
    except (FileNotFoundError, ValueError, AttributeError, TypeError):  # a hand-edited meta.json is no match
        return None
    return meta if same and meta.get("max_tokens") == args.max_tokens and not args.hf_dataset else None


def prepare(args, out_dir):
    t0 = time.time()
    if args.input:  # local files are checked now, Hub shards listed now and downloaded as they come
        sources = [local_source(path) for path in resolve_inputs(args.input)]
    else:
        sources = [dataset_source(args)] if args.hf_dataset else hub_sources(args)
    if meta := None if args.force else already_done(out_dir, sources, args):
        print(f"{out_dir}: train.bin and val.bin already hold these inputs ({meta['splits']['train']['tokens']:,} + "
              f"{meta['splits']['val']['tokens']:,} tokens); nothing to do (--force redoes it)")
        return meta
    request = json.loads(json.dumps({"sources": [identity(s) for s in sources], **val_request(args),
                                     "max_tokens": args.max_tokens}))  # as it reads back from the manifest
    work_dir, manifest = out_dir / WORK_NAME, None
    try:
        manifest = open_work(work_dir, request, args.force)
        if not manifest.get("complete"):
            print(f"tokenizing {len(sources)} source(s) with {args.workers} worker(s) -> {out_dir}")
            tokenize_sources(sources, manifest, work_dir, args)
        meta = publish(out_dir, work_dir, manifest, sources, args, time.time() - t0)
    except OSError as e:
        raise PrepareError(f"{out_dir}: writing failed ({e.strerror or e}); {give_up(out_dir, work_dir, manifest)}")
    except (PrepareError, TokenizerUnavailable) as e:
        raise PrepareError(f"{e}; {give_up(out_dir, work_dir, manifest)}")
    except WorkerDied:
        fail(f"a tokenizer worker process died (killed, e.g. by the out-of-memory killer, or crashed); "
             f"{give_up(out_dir, work_dir, manifest)}; fewer --workers need less memory", status=1)
    except KeyboardInterrupt as e:
        what, status = interrupted(e)
        fail(f"{what}; {give_up(out_dir, work_dir, manifest)}", status=status)
    print_summary(meta, out_dir)
    return meta


def give_up(out_dir, work_dir, manifest):
    """After an error: keep the finished sources for the same command to continue from, or remove the work.
    The dataset in out_dir is untouched while its meta.json is there (publish() removes that first)."""
    if manifest and manifest["done"]:
        outcome = (f"the {len(manifest['done'])} finished source(s) are kept in {work_dir}: the same command "
                   f"continues from there")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
        outcome = "nothing was published"
    return outcome + (f"; the dataset already in {out_dir} is unchanged" if (out_dir / "meta.json").exists() else "")


def print_summary(meta, out_dir):
    total = sum(info["tokens"] for info in meta["splits"].values())
    for split, info in meta["splits"].items():
        print(f"{split:>5}: {info['documents']:>11,} docs {info['tokens']:>15,} tokens "
              f"({info['tokens'] / total:7.2%}) -> {out_dir / info['file']}")
    if meta["null_texts_skipped"]:
        print(f"warning: skipped {meta['null_texts_skipped']:,} documents with a null text")
    if meta["token_count_diff"] is not None:
        print(f"tokens written minus FineWeb's token_count column: {meta['token_count_diff']:+,}")
    for source in meta["sources"]:
        if source["name"].startswith("hf-datasets://"):  # a stream: say how much of it was fetched
            stopped = meta.get("max_tokens") and total >= meta["max_tokens"]
            print(f"streamed {source['documents']:,} documents ({total:,} tokens) from {source['name']}"
                  + (f", stopped at --max_tokens {meta['max_tokens']:,}" if stopped else ", all of it"))
    print(f"done in {meta['seconds']:.1f} s ({total / max(meta['seconds'], 1e-6) / 1e6:.2f}M tokens/s); "
          f"meta: {out_dir / 'meta.json'}")


def adopt(data_dir):
    """meta.json for train.bin / val.bin written by another tool (e.g. nanoGPT's prepare scripts): check that
    they hold uint16 ids below GPT-2's vocabulary, record what can be known, say what cannot."""
    if (data_dir / "meta.json").exists():
        raise PrepareError(f"{data_dir / 'meta.json'} exists already: --adopt is for bins without one "
                           f"(delete it to adopt the bins as they are)")
    splits = {}
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        if not path.is_file():
            raise PrepareError(f"{path}: not a regular file (missing, a pipe, a device or a folder); --adopt needs "
                               f"train.bin and val.bin")
        if (size := path.stat().st_size) == 0 or size % TOKEN_BYTES:
            raise PrepareError(f"{path}: {size} bytes, not a non-empty file of uint16 tokens")
        if (largest := max_token_id(path)) >= VOCAB_SIZE:
            raise PrepareError(f"{path} holds token id {largest}, not below GPT-2's vocabulary of {VOCAB_SIZE}: "
                               f"not GPT-2 tokens in uint16; cannot adopt it")
        splits[split] = {"documents": None, "tokens": size // TOKEN_BYTES, "file": path.name, "max_token_id": largest}
    meta = {**TOKENIZER_META, "eot_placement": "unknown", "splits": splits, "sources": [], "val_split": None,
            "adopted": "train.bin and val.bin come from another tool; prepare.py --adopt checked that they are uint16 "
                       "ids all below GPT-2's vocabulary. Not known, so not recorded: the document count, the split "
                       "rule, where EOT tokens go, and whether the ids are GPT-2's (a small enough vocabulary passes)"}
    write_json_atomically(data_dir / "meta.json", meta)
    print(f"{data_dir / 'meta.json'}: train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} "
          f"tokens, every id below {VOCAB_SIZE}; not known (not recorded): document count, split rule, EOT placement")
    return meta


def stop_like_ctrl_c(signum, frame):
    """SIGTERM and SIGHUP end the run as Ctrl-C does: one line, the finished sources kept."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupted(error):
    """The start of the one line and the exit status for Ctrl-C's KeyboardInterrupt, or a signal's."""
    name = error.args[0] if error.args else "SIGINT"
    return ("interrupted" if name == "SIGINT" else f"interrupted by {name}"), 128 + signal.Signals[name].value


def main(argv=None):
    args = parse_args(argv)
    previous = handle_signals(STOP_SIGNALS[1:], stop_like_ctrl_c)  # SIGINT is Python's KeyboardInterrupt already
    try:
        if args.pretokenized or args.to_llmc:
            return pretokenized.run(args)
        out_dir, lock = lock_out_dir(args.adopt or args.out_dir)
        try:
            return adopt(out_dir) if args.adopt else prepare(args, out_dir)
        finally:
            unlock_folder(lock)
    except PrepareError as e:
        fail(str(e))
    except KeyboardInterrupt as e:  # before any work (listing, checking the inputs): nothing was written
        what, status = interrupted(e)
        fail(f"{what}; nothing was changed", status=status)
    finally:  # main() also runs inside other programs (the tests)
        for stop, handler in previous.items():
            signal.signal(stop, handler)


if __name__ == "__main__":
    main()
