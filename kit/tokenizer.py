"""
The one place that decides how text becomes tokens: GPT-2's BPE through tiktoken, and one
<|endoftext|> token *prepended* to every document; and how tokens are stored: raw uint16 files
(train.bin, val.bin) described by a meta.json. prepare.py, train.py, sample.py and export.py all
read these facts from here.

Why prepend: every document, including the first, then starts right after an EOT, so a model
sampled from a bare EOT starts a fresh document, and the token stream is "EOT doc EOT doc ...":
exactly one EOT between any two documents.
"""
import array

import json
import os
import shutil

import numpy as np
import tiktoken

from kit.atomic import atomic_write

ENCODING_NAME = "gpt2"
EOT_TOKEN = 50256  # <|endoftext|>
VOCAB_SIZE = 50257  # ids the tokenizer can produce; the model pads its embedding to 50304
EOT_PLACEMENT = "prepend"
TOKEN_DTYPE = np.uint16  # 50257 < 2**16, so every id fits; train.bin/val.bin are raw uint16
TOKENIZER_META = {"tokenizer": ENCODING_NAME, "vocab_size": VOCAB_SIZE, "eot_token": EOT_TOKEN,
                  "eot_placement": EOT_PLACEMENT, "dtype": np.dtype(TOKEN_DTYPE).name}  # in meta.json, checked on read


class TokenizerUnavailable(RuntimeError):
    """GPT-2's BPE files are neither cached nor downloadable."""


def get_encoding():
    """GPT-2's BPE. tiktoken downloads its two files on first use and caches them (in TIKTOKEN_CACHE_DIR,
    else a folder in the temp dir); without a network and without that cache it cannot load."""
    try:
        return tiktoken.get_encoding(ENCODING_NAME)
    except Exception as e:  # a download boundary (requests' errors and others): one line with the way out
        raise TokenizerUnavailable(
            f"cannot load the {ENCODING_NAME} tokenizer: tiktoken downloads its BPE files (vocab.bpe, encoder.json "
            f"from openaipublic.blob.core.windows.net) on first use and that failed ({type(e).__name__}); "
            f"without a network, copy a tiktoken cache folder from a machine that has one and set "
            f"TIKTOKEN_CACHE_DIR to it") from e


def encode_documents(enc, texts, num_threads=8):
    """Token ids of each document with its EOT prepended: a list of lists, one per text."""
    return [[EOT_TOKEN] + ids for ids in enc.encode_ordinary_batch(texts, num_threads=num_threads)]


def encode_documents_flat(enc, texts):
    """The token stream of these documents, EOT prepended to each, as one uint32 array: what prepare.py
    writes. One thread and no per-document lists: ~20% less CPU than encode_documents, for callers that
    parallelise with processes."""
    ids = array.array("I")
    for text in texts:
        ids.append(EOT_TOKEN)
        ids.extend(enc.encode_ordinary(text))
    return np.frombuffer(ids, dtype=np.uint32)


def encode_prompt(enc, text):
    """A sampling prompt. The empty prompt is a bare EOT: 'start a new document'."""
    return enc.encode(text, allowed_special={"<|endoftext|>"}) if text else [EOT_TOKEN]


def decode(enc, ids):
    return enc.decode(list(ids))


def max_token_id(path, chunk_tokens=1 << 24, offset=0):
    """The largest id in a token file (-1 if empty) from byte `offset` on (past a header), read in 32 MiB
    chunks: memory stays flat whatever the file's size, and np.fromfile leaves no mapped pages behind to
    count against RSS."""
    largest = -1
    with open(path, "rb") as f:
        f.seek(offset)
        while (ids := np.fromfile(f, dtype=TOKEN_DTYPE, count=chunk_tokens)).size:
            largest = max(largest, int(ids.max()))
    return largest


def check_split_record(meta_path, split, info):
    """The fields of meta.json's splits[split] that readers rely on, by type: a hand-edited or foreign
    meta.json ends in one line naming the field, not in a TypeError far away."""
    def is_count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    problem = None
    if info.get("file") != f"{split}.bin":
        problem = f"file is {info.get('file')!r}, but the readers read {split}.bin"
    elif not is_count(info.get("tokens")):
        problem = f"tokens is {info.get('tokens')!r}, not a count"
    elif info.get("max_token_id") is not None and not (is_count(info["max_token_id"]) and info["max_token_id"] < 2**16):
        problem = f"max_token_id is {info['max_token_id']!r}, not a uint16 token id"
    if problem:
        raise ValueError(f"{meta_path}: splits.{split}.{problem}; rerun prepare.py --force")


def publish_dataset(work_dir, out_dir, meta):
    """Move finished bins from work_dir into out_dir (Paths) with their meta.json, in the order readers rely on.
    Each bin is renamed over the old one, never deleted first: a reader holding it open keeps its bytes.
    The old meta.json goes first and the new one comes last, so no reader pairs new bins with an old one."""
    with atomic_write(work_dir / "meta.json", "w") as f:  # before any move: a full disk fails here, work intact
        json.dump(meta, f, indent=2)
    (out_dir / "meta.json").unlink(missing_ok=True)
    for split in ("train", "val"):
        os.replace(work_dir / f"{split}.bin", out_dir / f"{split}.bin")
    os.replace(work_dir / "meta.json", out_dir / "meta.json")
    shutil.rmtree(work_dir, ignore_errors=True)  # published: a leftover manifest is harmless


def read_dataset_meta(data_dir):
    """meta.json of a dataset prepare.py finished, checked against kit/tokenizer.py and the bins beside
    it. publish_dataset writes meta.json last, so bins without it are from an unfinished run.
    Raises FileNotFoundError (nothing prepared there) or ValueError (unfinished or inconsistent)."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path) and os.path.exists(os.path.join(data_dir, "train.bin")):
        raise FileNotFoundError(f"{meta_path} not found beside train.bin: bins from another tool (e.g. nanoGPT's "
                                f"prepare.py) can be checked and described with `python data/fineweb/prepare.py "
                                f"--adopt={data_dir}`; bins of an unfinished prepare.py run need that run again")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run `python data/fineweb/prepare.py` first, or set "
                                "--dataset / --data_dir")
    if not os.path.isfile(meta_path):  # a FIFO would block the read forever, /dev/zero never end it
        raise ValueError(f"{meta_path}: not a regular file (a pipe, a device or a folder); rerun prepare.py")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        expected = dict(TOKENIZER_META)
        if meta.get("adopted"):  # bins from another tool (prepare.py --adopt): where their EOTs go is unknown
            del expected["eot_placement"]
        for key, value in expected.items():
            if meta.get(key) != value:
                raise ValueError(f"{meta_path}: {key} is {meta.get(key)!r} but kit/tokenizer.py says {value!r}; "
                                 "rerun prepare.py --force")
        for split in ("train", "val"):
            info = meta["splits"][split]
            check_split_record(meta_path, split, info)
            path = os.path.join(data_dir, info["file"])
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} not found although {meta_path} lists it; rerun prepare.py")
            if not os.path.isfile(path):
                raise ValueError(f"{path}: not a regular file (a pipe, a device or a folder); rerun prepare.py")
            expected_bytes = info["tokens"] * np.dtype(TOKEN_DTYPE).itemsize
            if os.path.getsize(path) != expected_bytes:
                raise ValueError(f"{path} holds {os.path.getsize(path)} bytes but meta.json says {info['tokens']} "
                                 f"tokens ({expected_bytes} bytes): incomplete or stale; rerun prepare.py --force")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path}: not a prepare.py meta.json ({type(e).__name__}: {e}); rerun prepare.py")
    return meta
