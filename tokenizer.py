"""
The one place that decides how text becomes tokens: GPT-2's BPE through tiktoken, and one
<|endoftext|> token *prepended* to every document. prepare.py, train.py, sample.py and export.py
all read these facts from here.

Why prepend: every document, including the first, then starts right after an EOT, so a model
sampled from a bare EOT starts a fresh document, and the token stream is "EOT doc EOT doc ...":
exactly one EOT between any two documents.
"""
import array

import numpy as np
import tiktoken

ENCODING_NAME = "gpt2"
EOT_TOKEN = 50256  # <|endoftext|>
VOCAB_SIZE = 50257  # ids the tokenizer can produce; the model pads its embedding to 50304
EOT_PLACEMENT = "prepend"
TOKEN_DTYPE = np.uint16  # 50257 < 2**16, so every id fits; train.bin/val.bin are raw uint16


def get_encoding():
    return tiktoken.get_encoding(ENCODING_NAME)


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
