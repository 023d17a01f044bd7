"""
train.bin / val.bin from GPT-2 tokens someone already made: llm.c's token shards (kit/shards.py), from a
Hugging Face dataset such as kjj0/fineweb10B-gpt2 (modded-nanogpt's download: FineWeb's 10B sample as a
val shard and 103 train shards of 100M tokens) or from a local folder of them. Nothing is tokenized. And
the other way: a prepared dataset written as llm.c shards, for llm.c's own trainer. prepare.py runs these:

    python data/fineweb/prepare.py --pretokenized kjj0/fineweb10B-gpt2 --shards 1-8
    python data/fineweb/prepare.py --pretokenized ../modded-nanogpt/data/fineweb10B --shards 1-8
    python data/fineweb/prepare.py --out_dir data/fineweb --to_llmc data/fineweb/llmc

The shards are <prefix>_val_000000.bin and <prefix>_train_000001.bin ... (llm.c's names); the prefix is the
Hub dataset's name up to its first digit (fineweb for kjj0/fineweb10B-gpt2, finewebedu for
kjj0/finewebedu10B-gpt2), or that of the folder's one *_val_000000.bin. val.bin holds the val shard's
tokens, train.bin those of train shards A..B (--shards A-B, --shard N; default 1) in order. llm.c cuts its
shards at 100M tokens wherever a document is, so each train shard continues the document its predecessor
ended in, and in train.bin every document is whole but the first.

Resumable per shard: the shards are appended in out_dir/pretokenized.work/ and counted in its manifest, and
each downloaded train shard is then removed from the Hugging Face cache (its tokens are in train.bin; the val
shard stays, eval.py --val_file=standard reads it there). A killed run continues with the shard it was in
(its bins cut back to what the manifest counts); within a shard, huggingface_hub resumes an interrupted
download where it can. When all are in, the bins are renamed into out_dir and meta.json written last, as
prepare.py does.
"""
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np

from configurator import fail
from kit.atomic import FolderInUse, atomic_write, lock_folder, unlock_folder
from kit.shards import (HEADER_BYTES, MAX_SHARD_TOKENS, ShardError, download, read_header, token_span,
                        write_shard)
from kit.tokenizer import (ENCODING_NAME, EOT_TOKEN, TOKEN_DTYPE, TOKENIZER_META, VOCAB_SIZE, max_token_id,
                           publish_dataset, read_dataset_meta)

WORK_NAME = "pretokenized.work"
LOCK_NAME = "prepare.lock"  # prepare.py's: one writer per folder, whichever way it writes
CHUNK_TOKENS = 1 << 24  # tokens per read while copying: 32 MiB at a time
LLMC_SHARD_TOKENS = 10**8  # --to_llmc's shard size, llm.c's own


def train_range(args):
    """(first, last) train shard: --shards A-B, --shard N, or shard 1."""
    return args.shards or (1 if args.shard is None else args.shard,) * 2


def add_arguments(parser):
    """prepare.py's options for llm.c shards."""
    parser.add_argument("--pretokenized", metavar="REPO|DIR", help="llm.c token shards, e.g. kjj0/fineweb10B-gpt2: "
                        "the val shard and train shards --shards A-B (default 1), no tokenizing (pretokenized.py)")
    parser.add_argument("--to_llmc", type=Path, metavar="DIR", help="write the dataset in --out_dir as llm.c shards")


def check_args(args, error):
    """prepare.py's options that mean nothing here are refused, in prepare.py's one-line way (error)."""
    if args.pretokenized and args.to_llmc:
        error("--pretokenized and --to_llmc are alternatives: shards in, or shards out")
    given = [f"--{k}" for k in ("input", "dump", "subset", "hf_dataset", "adopt", "max_tokens", "val_fraction")
             if getattr(args, k, None) is not None]
    if given:
        error(f"{given[0]} does not go with {'--to_llmc' if args.to_llmc else '--pretokenized'}: the tokens are "
              f"taken as they are")
    first, last = train_range(args)
    if args.to_llmc and (args.shards or args.shard is not None):
        error("--shard/--shards go with --pretokenized (which train shards to take)")
    if args.pretokenized and first < 1:
        error(f"--shards {first}-{last}: train shards are numbered from 1 (<prefix>_train_000001.bin); "
              f"shard 0 is the val shard, which is always taken")


def run(args):
    """--pretokenized or --to_llmc; every error ends in one line (configurator.fail)."""
    try:
        if args.to_llmc:
            return to_llmc(Path(args.out_dir).resolve(), Path(args.to_llmc))
        return fetch(args)
    except ShardError as e:
        fail(str(e))
    except OSError as e:
        fail(f"{getattr(e, 'filename', None) or args.out_dir}: {e.strerror or e}")


# -----------------------------------------------------------------------------
# shards in: --pretokenized

def shard_names(source, first, last):
    """[(split, file name)] to take: the val shard, then train shards first..last."""
    if os.path.isdir(source):
        found = sorted(Path(source).glob("*_val_000000.bin"))
        if len(found) != 1:
            raise ShardError(f"{source}: expected one *_val_000000.bin (llm.c's val shard) in the folder, found "
                             f"{len(found)}")
        prefix = found[0].name.removesuffix("_val_000000.bin")
    else:
        prefix = re.match(r"[^\d]*", source.rsplit("/", 1)[-1]).group(0).rstrip("-_")
    return [("val", f"{prefix}_val_000000.bin")] + [("train", f"{prefix}_train_{k:06d}.bin")
                                                    for k in range(first, last + 1)]


def source_name(source, filename):
    if os.path.isdir(source):
        return str(Path(source).resolve() / filename)
    return f"hf://datasets/{source}/{filename}"


def local_shard(source, filename, first, last):
    """The shard's path on this machine: in the folder, or from the Hub (downloaded into the cache)."""
    if not os.path.isdir(source):
        return Path(download(source, filename))
    path = Path(source) / filename
    if not path.is_file():
        held = sorted(p.name for p in Path(source).glob("*_train_*.bin"))
        raise ShardError(f"{path}: no such shard (--shards {first}-{last}); the folder holds {len(held)} train "
                         f"shard(s)" + (f": {held[0]}" if held else "") + (f" to {held[-1]}" if len(held) > 1 else ""))
    return path


def append_shard(path, out):
    """Append the tokens of the llm.c shard at path to the open file out, every id checked on the way;
    returns {tokens, documents (its EOTs), max_token_id}."""
    count = read_header(path)
    documents, largest = 0, -1
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        while (ids := np.fromfile(f, dtype=TOKEN_DTYPE, count=CHUNK_TOKENS)).size:
            largest = max(largest, int(ids.max()))
            if largest >= VOCAB_SIZE:
                raise ShardError(f"{path} holds token id {largest}, not below {ENCODING_NAME}'s vocabulary of "
                                 f"{VOCAB_SIZE:,}: not {ENCODING_NAME} tokens")
            documents += int(np.count_nonzero(ids == EOT_TOKEN))
            out.write(ids.tobytes())
    return {"tokens": count, "documents": documents, "max_token_id": largest}


def open_work(work_dir, request, force):
    """The manifest of an unfinished run whose shards so far begin this request's (its bins cut back to what
    it counts: a killed run may have written past it), else a fresh one."""
    try:
        manifest = json.loads((work_dir / "manifest.json").read_text())
        done = [entry["name"] for entry in manifest["done"]]
        resumable = not force and manifest["source"] == request["source"] and done == request["names"][:len(done)]
        for split in ("train", "val"):
            tokens = sum(entry["tokens"] for entry in manifest["done"] if entry["split"] == split)
            resumable = resumable and (work_dir / f"{split}.bin").stat().st_size >= tokens * 2
            if resumable:
                os.truncate(work_dir / f"{split}.bin", tokens * 2)
        if resumable:
            manifest["names"] = request["names"]
            if done:
                print(f"continuing an unfinished run: {len(done)} of {len(request['names'])} shard(s) already "
                      f"in ({work_dir})")
            return manifest
    except (OSError, ValueError, KeyError, TypeError):
        pass
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir()
    for split in ("train", "val"):
        (work_dir / f"{split}.bin").touch()
    return {**request, "done": []}


def fetch(args):
    """Download (or read) the val shard and the train shards, check them, and publish train.bin, val.bin and
    meta.json in --out_dir."""
    t0 = time.time()
    first, last = train_range(args)
    source = args.pretokenized
    names = shard_names(source, first, last)
    out_dir = Path(args.out_dir).resolve()
    try:
        lock = lock_folder(out_dir, LOCK_NAME)
    except FolderInUse as e:
        raise ShardError(f"{out_dir}: another prepare.py ({e.holder}) is writing to this folder; wait for it to "
                         f"finish or choose another --out_dir") from None
    try:
        request = {"source": source, "names": [name for _, name in names]}
        meta = None if args.force else already_done(out_dir, source, request["names"])
        if meta:
            print(f"{out_dir}: train.bin and val.bin already hold these shards ({meta['splits']['train']['tokens']:,}"
                  f" + {meta['splits']['val']['tokens']:,} tokens); nothing to do (--force redoes it)")
            return meta
        if os.path.isdir(source):  # a shard missing from a folder is named before any work
            for _, name in names:
                local_shard(source, name, first, last)
        work_dir = out_dir / WORK_NAME
        manifest = open_work(work_dir, request, args.force)
        try:
            copy_shards(names, manifest, work_dir, source, (first, last))
        except ShardError as e:
            kept = len(manifest["done"])
            raise ShardError(f"{e}; the {kept} shard(s) before it are kept in {work_dir}, for a command that takes "
                             f"them again" if kept else str(e)) from None
        except KeyboardInterrupt as e:
            name = e.args[0] if e.args else "SIGINT"
            fail(f"interrupted{'' if name == 'SIGINT' else ' by ' + name}; {len(manifest['done'])} of {len(names)} "
                 f"shard(s) are kept in {work_dir}: the same command continues from there",
                 status=128 + signal.Signals[name].value)
        meta = publish(out_dir, work_dir, manifest, time.time() - t0)
    finally:
        unlock_folder(lock)
    for split, info in meta["splits"].items():
        print(f"{split:>5}: {info['documents']:>11,} docs {info['tokens']:>15,} tokens -> {out_dir / info['file']}")
    print(f"done in {meta['seconds']:.1f} s; meta: {out_dir / 'meta.json'}")
    return meta


def copy_shards(names, manifest, work_dir, source, shard_range):
    """Each shard not yet in: fetched, appended to its split's bin, fsynced, counted in the manifest."""
    for k, (split, name) in enumerate(names):
        if k < len(manifest["done"]):
            continue
        print(f"[{k + 1}/{len(names)}] {source_name(source, name)}", flush=True)
        path = local_shard(source, name, *shard_range)  # a download shows huggingface_hub's progress bar
        with open(work_dir / f"{split}.bin", "ab") as out:
            counts = append_shard(path, out)
            out.flush()
            os.fsync(out.fileno())  # the manifest must not count tokens still only in the page cache
        manifest["done"].append({"split": split, "name": name, "size": path.stat().st_size, **counts})
        with atomic_write(work_dir / "manifest.json", "w") as f:
            json.dump(manifest, f)
        if split == "train" and not os.path.isdir(source):  # its tokens are in train.bin now
            path.resolve().unlink(missing_ok=True)  # the cache's blob, then the snapshot's link to it
            path.unlink(missing_ok=True)


def already_done(out_dir, source, names):
    try:
        meta = read_dataset_meta(out_dir)
    except (FileNotFoundError, ValueError):
        return None
    recorded = [entry.get("name") for entry in meta.get("sources") or []]
    return meta if meta.get("pretokenized") == source and recorded == [source_name(source, n) for n in names] else None


def publish(out_dir, work_dir, manifest, seconds):
    """The finished work bins moved into out_dir with their meta.json (kit/tokenizer.publish_dataset)."""
    splits = {}
    for split in ("train", "val"):
        entries = [entry for entry in manifest["done"] if entry["split"] == split]
        splits[split] = {"documents": sum(entry["documents"] for entry in entries),
                         "tokens": sum(entry["tokens"] for entry in entries), "file": f"{split}.bin",
                         "max_token_id": max(entry["max_token_id"] for entry in entries)}
    sources = [{"name": source_name(manifest["source"], entry["name"]), "split": entry["split"],
                "size": entry["size"], "tokens": entry["tokens"]} for entry in manifest["done"]]
    meta = {**TOKENIZER_META, "splits": splits, "sources": sources, "pretokenized": manifest["source"],
            "val_split": {"rule": "the source's val shard, as it is"}, "seconds": round(seconds, 2)}
    publish_dataset(work_dir, out_dir, meta)
    return meta


# -----------------------------------------------------------------------------
# shards out: --to_llmc

def to_llmc(data_dir, dest):
    """The dataset in data_dir (train.bin, val.bin, meta.json) as llm.c shards of at most 100M tokens in dest:
    <name>_val_000000.bin, <name>_train_000001.bin, ..., name being data_dir's, so that llm.c's trainer reads
    them with -i 'dest/<name>_train_*.bin' -j 'dest/<name>_val_*.bin'."""
    try:
        meta = read_dataset_meta(data_dir)
    except (FileNotFoundError, ValueError) as e:
        raise ShardError(str(e)) from None
    if dest.exists() and any(dest.glob("*.bin")):
        raise ShardError(f"{dest} holds .bin files already; --to_llmc writes into an empty or new folder (llm.c "
                         f"reads every shard its pattern matches)")
    dest.mkdir(parents=True, exist_ok=True)
    for split, number in (("val", 0), ("train", 1)):
        path = data_dir / f"{split}.bin"
        offset, count = token_span(path)
        largest = meta["splits"][split].get("max_token_id")  # prepare.py records it; --adopt too
        largest = max_token_id(path, offset=offset) if largest is None else largest
        if largest >= VOCAB_SIZE:
            raise ShardError(f"{path} holds token id {largest}, not below {ENCODING_NAME}'s vocabulary of "
                             f"{VOCAB_SIZE:,}")
        shard_tokens = min(LLMC_SHARD_TOKENS, MAX_SHARD_TOKENS)
        for start in range(0, count, shard_tokens):
            tokens = np.fromfile(path, dtype=TOKEN_DTYPE, count=min(shard_tokens, count - start),
                                 offset=offset + start * 2)
            shard = dest / f"{data_dir.name}_{split}_{number:06d}.bin"
            write_shard(shard, tokens)
            print(f"{shard}: {len(tokens):,} tokens")
            number += 1
    return dest
