"""
Training batches from a token file (train.bin / val.bin: raw uint16 GPT-2 ids, as prepare.py writes
them; or an llm.c shard, the same ids behind a header, see kit/shards.py), with a state that a checkpoint
can hold, so a resumed run sees exactly the batches the uninterrupted run would have seen.

Two orders:
- 'random' (nanoGPT): each row is a window starting at a uniformly random position. Simple and
  the reference user's behaviour; windows may repeat or be missed: after one epoch's worth of
  batches ~37% of the tokens (e^-1) were never seen, after two ~14%, after four ~2%.
- 'shuffle': the file is cut into non-overlapping windows, shuffled once per epoch by (seed, epoch),
  and each DDP rank takes a disjoint share; every window is seen once per epoch.
- 'document': as 'shuffle', but the rows are the block_size tokens from each document's start (the
  <|endoftext|> prepare.py puts before every document), so no row starts mid-document, where the first
  positions have no context and a high loss. A row runs on into the next document when its own is
  shorter; a document longer than a row is seen only up to block_size tokens per epoch
  (epochs_done() counts rows, not tokens).
"""
import os

import numpy as np
import torch

from kit.shards import STANDARD_VAL_NAME, open_tokens, standard_val_file, token_span
from kit.tokenizer import ENCODING_NAME, EOT_TOKEN, TOKEN_DTYPE, VOCAB_SIZE, max_token_id, read_dataset_meta

ORDERS = ("random", "shuffle", "document")
SCAN_CHUNK = 1 << 26  # tokens per read when looking for document starts: 128 MiB of uint16 at a time


def check_data_order(order):
    if order not in ORDERS:
        raise ValueError(f"data_order={order!r}: allowed are {', '.join(map(repr, ORDERS))}")


def check_token_ids(path, vocab_size, recorded_max=None):
    """Refuse a token file holding an id >= vocab_size anywhere (another tokenizer's output, bytes that
    are not uint16 tokens): such an id would crash training whenever a batch reached it. prepare.py
    re-reads each bin it writes and records its largest id in meta.json (whose sizes read_dataset_meta
    ties to the bins), so the file itself is read only when no maximum is recorded (its time:
    docs/performance.md, "Data preparation")."""
    largest = max_token_id(path, offset=token_span(path)[0]) if recorded_max is None else recorded_max
    if largest >= vocab_size:
        raise ValueError(f"{path} holds token id {largest}, not below vocab_size {vocab_size}: "
                         f"not {ENCODING_NAME} tokens in {np.dtype(TOKEN_DTYPE).name}; re-run prepare.py")


def open_dataset(data_dir, block_size, val_file=""):
    """(meta.json, train.bin path, val path) of a prepared dataset, every check made before training:
    meta.json matches the bins, the val file holds a window, no token id is beyond the vocabulary. The val
    file is val.bin, or val_file: a token file in either format, or 'standard' (kit/shards.py)."""
    meta = read_dataset_meta(data_dir)
    paths = {split: os.path.join(data_dir, f"{split}.bin") for split in ("train", "val")}
    if val_file:
        paths["val"] = standard_val_file() if val_file == STANDARD_VAL_NAME else val_file
        if not os.path.isfile(paths["val"]):
            raise FileNotFoundError(f"val_file={val_file!r} not found: a token file (ours or an llm.c shard) or "
                                    f"{STANDARD_VAL_NAME!r}")
    for _ in eval_batches(paths["val"], block_size, 1, 1):
        pass  # a clear message if the val file is shorter than one window
    for split, path in paths.items():
        recorded = None if split == "val" and val_file else meta["splits"][split].get("max_token_id")
        check_token_ids(path, VOCAB_SIZE, recorded)
    return meta, paths["train"], paths["val"]


def num_tokens(path):
    return token_span(path)[1]


def document_starts(path, block_size):
    """Positions of the <|endoftext|> tokens that begin each document and leave a whole row (block_size
    tokens and the next one, the last target) before the end of the file, as int64. Read in chunks, so
    a multi-GB bin needs little memory (8 bytes per document are kept). Computed at every start, not
    cached (its time: docs/training.md, data_order='document')."""
    data = open_tokens(path)
    last_start = len(data) - block_size - 1
    starts = [np.flatnonzero(data[a:min(a + SCAN_CHUNK, last_start + 1)] == EOT_TOKEN) + a
              for a in range(0, last_start + 1, SCAN_CHUNK)]
    return np.concatenate(starts).astype(np.int64) if starts else np.zeros(0, dtype=np.int64)


def file_identity(path):
    """What changes when a file is replaced (another inode) or rewritten in place (size, modification time)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def dataset_changed(identities):
    """One line naming the token files among {path: file_identity(path) at start} that were replaced,
    rewritten or removed since (another prepare.py into data_dir), else ''. A stat per file: cheap enough
    for every iteration."""
    changed = []
    for path, identity in identities.items():
        try:
            now = file_identity(path)
        except FileNotFoundError:
            now = None
        if now != identity:
            changed.append(path)
    return f"{' and '.join(changed)} changed on disk during training (another prepare.py?)" if changed else ""


class TokenBatches:
    """Endless (x, y) batches of int64 tensors (batch_size, block_size); y is x shifted by one."""

    def __init__(self, path, block_size, batch_size, order="random", seed=1337, rank=0, world_size=1):
        check_data_order(order)
        self.path, self.block_size, self.batch_size = path, block_size, batch_size
        self.order, self.seed, self.rank, self.world_size = order, seed, rank, world_size
        # batches come from the file as opened here, even once prepare.py publishes new bins under this path
        # (by rename: this inode lives on while open); train.py stops when it sees that (dataset_changed)
        self.file = open(path, "rb")
        self.offset, self.n_tokens = token_span(path, self.file)  # past an llm.c shard's header
        if self.n_tokens < block_size + 1:
            raise ValueError(f"{path} has {self.n_tokens} tokens, fewer than block_size + 1 = {block_size + 1}; "
                             "use a smaller block_size or more data")
        # the rows an epoch of 'shuffle' or 'document' order permutes: window i, or document i
        self.doc_starts = torch.from_numpy(document_starts(path, block_size)) if order == "document" else None
        self.n_windows = len(self.doc_starts) if order == "document" else (self.n_tokens - 1) // block_size
        if order != "random" and self.n_windows < world_size * batch_size:
            what = "document starts" if order == "document" else f"windows of {block_size} tokens"
            raise ValueError(f"{path}: {self.n_windows} {what} cannot fill one batch of {batch_size} on each of "
                             f"{world_size} ranks; use data_order='random'")
        # random order: one generator per rank, its state saved in checkpoints
        self.generator = torch.Generator().manual_seed(seed + rank)
        self.epoch, self.position = 0, 0  # shuffle order: which epoch, how far into this rank's share
        self._share, self._share_epoch = None, None  # cache of _epoch_share()
        self.tokens_served = 0  # per rank; tokens_served * world_size / n_tokens = epochs

    def _epoch_share(self):
        """This rank's windows of the current epoch, in order; computed once per epoch (a randperm
        of millions of windows per micro-batch would cost more than the batch)."""
        if self._share_epoch != self.epoch:
            perm = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            share = perm[self.rank::self.world_size]
            self._share = share[: len(perm) // self.world_size]  # equal shares, so ranks stay in step
            self._share_epoch = self.epoch
        return self._share

    def windows_per_epoch(self):
        """Rows this rank serves per epoch in 'shuffle' or 'document' order: its share, in whole batches."""
        return (self.n_windows // self.world_size) // self.batch_size * self.batch_size

    def _starts(self):
        if self.order == "random":
            return torch.randint(self.n_tokens - self.block_size, (self.batch_size,), generator=self.generator)
        share = self._epoch_share()
        if self.position + self.batch_size > len(share):
            self.epoch, self.position = self.epoch + 1, 0
            share = self._epoch_share()
        rows = share[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return self.doc_starts[rows] if self.order == "document" else rows * self.block_size

    def next_batch(self):
        # re-open the memmap every batch: a long-lived np.memmap keeps every page it touched
        # resident, and RSS grows with the file over a long run
        data = np.memmap(self.file, dtype=TOKEN_DTYPE, mode="r", offset=self.offset, shape=(self.n_tokens,))
        starts = self._starts().tolist()
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in starts]).astype(np.int64))
        self.tokens_served += self.batch_size * self.block_size
        return x, y

    def epochs_done(self):
        """Passes over the file so far, counting every rank's batches. In 'shuffle' and 'document' order
        the integer part is the epoch counter: every window (document start) was seen that many times."""
        if self.order != "random":
            return self.epoch + self.position / self.windows_per_epoch()
        return self.tokens_served * self.world_size / self.n_tokens

    def state_dict(self):
        return {"order": self.order, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "generator": self.generator.get_state(), "epoch": self.epoch, "position": self.position,
                "tokens_served": self.tokens_served}

    def load_state_dict(self, state):
        for key in ("order", "seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data loader state has {key}={state[key]!r} but this run has "
                                 f"{getattr(self, key)!r}; the batch order cannot be resumed exactly")
        self.generator.set_state(state["generator"])
        self.epoch, self.position, self.tokens_served = state["epoch"], state["position"], state["tokens_served"]


def eval_batches(path, block_size, batch_size, n_batches, seed=0):
    """The same n_batches windows at every evaluation (a fresh generator, same seed), so changes
    in the estimate reflect the model, not which windows happened to be drawn."""
    batches = TokenBatches(path, block_size, batch_size, order="random", seed=seed)
    for _ in range(n_batches):
        yield batches.next_batch()
