"""
llm.c's token shards: the files of llm.c's dev/data scripts and of modded-nanogpt's downloads (the Hugging
Face dataset kjj0/fineweb10B-gpt2). A header of 256 int32 (magic 20240520, version 1, the token count, the
rest zero), then the tokens as uint16 GPT-2 ids, each document after an <|endoftext|>: our train.bin /
val.bin with a header in front. (llm.c's Llama 3 shards, magic 20240801 and version 7, hold uint32 ids.)

Every reader of a token file in the kit finds its tokens with token_span(), which knows both formats: a
file that starts with llm.c's magic is a shard and its header is checked; any other file is ours. They
cannot be confused: read as uint16 ids, the magic's first two bytes are id 55,432 (and the Llama 3
magic's 55,713), beyond GPT-2's 50,257, so no token file of ours starts with them.

The standard FineWeb val set, on which llm.c and modded-nanogpt report val loss: the first 10,485,760
tokens (10,240 windows of 1024) of fineweb_val_000000.bin in kjj0/fineweb10B-gpt2.
"""
import os

import numpy as np

from configurator import first_line
from kit.atomic import atomic_write
from kit.tokenizer import ENCODING_NAME, TOKEN_DTYPE, VOCAB_SIZE, max_token_id

MAGIC, VERSION = 20240520, 1  # GPT-2 tokens, uint16
LLAMA3_MAGIC, LLAMA3_VERSION = 20240801, 7  # Llama 3 tokens, uint32
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # the count is an int32
TOKEN_BYTES = np.dtype(TOKEN_DTYPE).itemsize

STANDARD_VAL_REPO = "kjj0/fineweb10B-gpt2"
STANDARD_VAL_FILE = "fineweb_val_000000.bin"
STANDARD_VAL_TOKENS = 10_485_760  # llm.c's 20 val steps x 8 GPUs x 64 rows x 1024; modded-nanogpt's val_tokens
STANDARD_VAL_NAME = "standard"  # eval.py --val_file=standard, train.py --val_file=standard


class ShardError(ValueError):
    """A file that is not a usable llm.c GPT-2 shard; the message is one line naming the file."""


def read_header(path, file=None):
    """The token count of an llm.c GPT-2 shard, after checking its header against the file's size; else
    ShardError. file: the file already open at path, whose own bytes are read."""
    if file is None:
        with open(path, "rb") as file:
            return read_header(path, file)
    size = os.fstat(file.fileno()).st_size
    file.seek(0)
    head = file.read(HEADER_BYTES)
    if len(head) < HEADER_BYTES:
        raise ShardError(f"{path}: {size:,} bytes, shorter than llm.c's {HEADER_BYTES:,}-byte header: "
                         f"truncated (an interrupted download or copy?) or not a token shard")
    magic, version, count = (int(v) for v in np.frombuffer(head, dtype="<i4")[:3])
    if magic == LLAMA3_MAGIC:
        raise ShardError(f"{path}: magic {LLAMA3_MAGIC}, version {version}: an llm.c shard of Llama 3 tokens (uint32); "
                         f"this kit reads {ENCODING_NAME} shards (magic {MAGIC}, version {VERSION}, uint16 tokens)")
    if magic != MAGIC:
        raise ShardError(f"{path}: magic {magic}, not llm.c's {MAGIC}: not an llm.c token shard")
    if version != VERSION:
        raise ShardError(f"{path}: version {version}; llm.c's {ENCODING_NAME} shards are version {VERSION}")
    expected = HEADER_BYTES + count * TOKEN_BYTES
    if count < 0 or size != expected:
        what = "truncated (an interrupted download or copy?)" if 0 <= count and size < expected else \
            "the header and the data disagree"
        raise ShardError(f"{path}: its header counts {count:,} tokens ({expected:,} bytes with the header) but the "
                         f"file holds {size:,} bytes: {what}")
    return count


def token_span(path, file=None):
    """(byte offset of the first token, number of tokens) of a token file in either format: an llm.c shard
    if it starts with one of llm.c's magics (its header then checked), else ours. file: as in read_header."""
    if file is None:
        with open(path, "rb") as file:
            return token_span(path, file)
    file.seek(0)
    head = file.read(4)
    if len(head) == 4 and int(np.frombuffer(head, dtype="<i4")[0]) in (MAGIC, LLAMA3_MAGIC):
        return HEADER_BYTES, read_header(path, file)
    return 0, os.fstat(file.fileno()).st_size // TOKEN_BYTES


def open_tokens(path):
    """The tokens of a token file in either format, as a read-only uint16 memmap (nothing is copied)."""
    offset, count = token_span(path)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset, shape=(count,))


def check_ids(path, offset=0):
    """The largest id of a token file, or ShardError when it is not below GPT-2's vocabulary."""
    largest = max_token_id(path, offset=offset)
    if largest >= VOCAB_SIZE:
        raise ShardError(f"{path} holds token id {largest}, not below {ENCODING_NAME}'s vocabulary of {VOCAB_SIZE:,}: "
                         f"not {ENCODING_NAME} tokens in uint16")
    return largest


def check_shard(path):
    """(token count, largest id) of an llm.c GPT-2 shard: header, size and every id checked; else ShardError."""
    count = read_header(path)
    return count, check_ids(path, HEADER_BYTES)


def write_shard(path, tokens):
    """An llm.c GPT-2 shard holding these uint16 tokens, written whole or not at all."""
    tokens = np.asarray(tokens)
    if tokens.dtype != TOKEN_DTYPE or len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"write_shard takes at most {MAX_SHARD_TOKENS:,} uint16 tokens, not {len(tokens):,} "
                         f"{tokens.dtype}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, len(tokens)
    with atomic_write(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


def standard_val_file():
    """The local path of the standard val shard: from the Hugging Face cache, downloaded there the first time."""
    return download(STANDARD_VAL_REPO, STANDARD_VAL_FILE)


def download(repo, filename):
    """A file of a Hub dataset, through huggingface_hub's cache (which resumes an interrupted download); one-line
    ShardError when it cannot be had."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    try:
        return hf_hub_download(repo_id=repo, repo_type="dataset", filename=filename)
    except LocalEntryNotFoundError:  # offline, or could not connect
        raise ShardError(f"cannot download {filename} from {repo}: the network is unreachable (or HF_HUB_OFFLINE "
                         f"is set) and it is not in the Hugging Face cache; fetch it elsewhere and pass its "
                         f"path") from None
    except EntryNotFoundError:
        raise ShardError(f"{repo} has no file {filename}") from None
    except RepositoryNotFoundError:
        raise ShardError(f"{repo}: no such dataset on the Hugging Face Hub (or it needs a login)") from None
    except Exception as e:  # a download boundary: whatever went wrong, one line with what was asked
        raise ShardError(f"cannot download {filename} from {repo} ({type(e).__name__}: {first_line(e)})") from None
