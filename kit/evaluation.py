"""
How good a model is, in figures that compare across runs, models and tokenizers. eval.py prints them
for a checkpoint or GPT-2 weights; train.py evaluates HellaSwag while training (hellaswag_interval), and
its train/val loss estimate (estimate_loss) and the samples it prints at evaluations (generate_samples)
live here too.

- Bits per byte on val.bin: the loss in nats per token, over ln 2, times tokens per UTF-8 byte of the
  same text. A tokenizer with longer tokens has a higher loss per token but not per byte.
- HellaSwag (Zellers et al. 2019): 10,042 validation examples, each a context and 4 endings of which
  one is right. Each ending is scored by its log-probability given the context, summed over its tokens
  (acc) or averaged per token (acc_norm), as GPT-2's evaluation and build-nanogpt score it; the best
  scoring ending is the model's answer. Random guessing gets 0.25.

Both score over the tokenizer's 50,257 ids only: the model's padded output rows (50257..50303) are
ids the tokenizer never produces, and leaving them out makes a checkpoint and its Hugging Face export
(which drops them) evaluate the same.

(Named kit/evaluation.py, not evaluate.py: that would shadow Hugging Face's `evaluate` package, which
lm-evaluation-harness imports, for anyone running it from this folder.)
"""
import hashlib
import json
import math
import os
import urllib.request

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from kit.atomic import atomic_write
from kit.loader import eval_batches
from kit.shards import open_tokens
from kit.tokenizer import EOT_TOKEN, VOCAB_SIZE, decode, encode_prompt, get_encoding

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# as recorded by Hugging Face datasets for this file (datasets/hellaswag/dataset_infos.json: 12,246,618
# bytes); not verified by us, the machines that wrote this had no internet
HELLASWAG_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
HELLASWAG_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "hellaswag",
                               "hellaswag_val.jsonl")
SCHEMA = "JSON lines with ctx (text), endings (4 texts) and label (0-3), as in hellaswag_val.jsonl"


@torch.no_grad()
def estimate_loss(model, paths, batch_size, n_batches, device, ctx):
    """{split: mean loss} over the same n_batches random windows of each token file at every call (a fixed
    seed), so changes reflect the model, not the windows drawn: train.py's estimate at each evaluation."""
    out = {}
    model.eval()
    for split, path in paths.items():
        losses = []
        for x, y in eval_batches(path, model.config.block_size, batch_size, n_batches):
            with ctx:
                _, loss = model(x.to(device), y.to(device))
            losses.append(loss.item())
        out[split] = sum(losses) / len(losses)
    model.train()
    return out


def generate_samples(model, enc, prompt_text, max_new_tokens, device, ctx, seed, num_samples=2, top_k=50):
    """num_samples continuations of prompt_text ('' = a new document) as text, each ending at its EOT,
    top-k sampled with a fixed seed: the same draws at every evaluation, so the texts change only with the
    model. Training is not disturbed: the draws come from their own torch.Generator (the global RNG drives
    dropout) and the model is back in train mode after."""
    prompt = encode_prompt(enc, prompt_text)[-model.config.block_size:]
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.tensor(prompt, dtype=torch.long, device=device)[None, :].repeat(num_samples, 1)
    model.eval()
    with torch.no_grad(), ctx:
        y = model.generate(x, max_new_tokens, top_k=top_k, vocab_size=VOCAB_SIZE, stop_token=EOT_TOKEN,
                           generator=generator)
    model.train()
    texts = []
    for row in y.tolist():
        new = row[len(prompt):]
        texts.append(prompt_text + decode(enc, new[:new.index(EOT_TOKEN)] if EOT_TOKEN in new else new))
    return texts


# ----------------------------------------------------------------------------------------------
# HellaSwag: the file, its checks, its tokens

def download_hellaswag(path):
    """Fetch the validation file into path, checked against its published sha256. It is written to a
    temporary file that becomes path only when complete and correct (one per process, so DDP ranks
    downloading at once cannot mix their bytes)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(HELLASWAG_URL, timeout=60) as response, \
                atomic_write(path, per_process=True) as f:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
            if digest.hexdigest() != HELLASWAG_SHA256:  # raised inside: the file is not kept
                raise ValueError(f"downloaded {HELLASWAG_URL} but its sha256 is {digest.hexdigest()}, not the "
                                 f"published {HELLASWAG_SHA256}; not kept. Pass --hellaswag_file=PATH (a copy of "
                                 "hellaswag_val.jsonl)")
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors too: offline, DNS, 404, timeout
        reason = getattr(e, "reason", None) or e.strerror or e
        raise ValueError(f"HellaSwag is not cached at {path} and cannot be downloaded from {HELLASWAG_URL} "
                         f"({reason}); pass --hellaswag_file=PATH (a copy of hellaswag_val.jsonl)") from None


def check_example(record, where):
    """{'ctx', 'endings', 'label'} of one parsed line, or ValueError naming what is off."""
    problem = None
    if not isinstance(record, dict):
        problem = f"a JSON {type(record).__name__}, not an object"
    elif not isinstance(record.get("ctx"), str) or not record["ctx"]:
        problem = "no ctx text"
    elif not (isinstance(record.get("endings"), list) and len(record["endings"]) == 4
              and all(isinstance(e, str) and e for e in record["endings"])):
        problem = "endings is not a list of 4 texts"
    elif str(record.get("label")) not in ("0", "1", "2", "3"):  # an int in the original, a string in HF's copy
        problem = f"label {record.get('label')!r} is not 0-3"
    if problem:
        raise ValueError(f"{where}: not HellaSwag's schema ({problem}); expected {SCHEMA}")
    return {"ctx": record["ctx"], "endings": record["endings"], "label": int(record["label"])}


def read_hellaswag(path):
    """The examples of a HellaSwag jsonl file, each checked; ValueError (one line) when it is not one."""
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {line_number}: not JSON ({e.msg}); expected {SCHEMA}") from None
                examples.append(check_example(record, f"{path} line {line_number}"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; expected {SCHEMA}") from None
    if not examples:
        raise ValueError(f"{path} holds no examples; expected {SCHEMA}")
    return examples


def load_hellaswag(hellaswag_file=""):
    """The validation examples from hellaswag_file, or from the cache (downloaded there the first time)."""
    if hellaswag_file:
        if not os.path.isfile(hellaswag_file):
            raise ValueError(f"hellaswag_file={hellaswag_file!r} not found")
        return read_hellaswag(hellaswag_file)
    if not os.path.exists(HELLASWAG_CACHE):
        download_hellaswag(HELLASWAG_CACHE)
    return read_hellaswag(HELLASWAG_CACHE)


def render_example(enc, example, block_size):
    """(rows, scored, label, cropped): the 4 token rows context + ending, how many last tokens of each row
    are its ending's (the tokens scored), and whether a row was longer than block_size and lost tokens from
    its start, as a sliding window would. None when an ending alone needs block_size tokens or more: its
    row would hold no context to score it against. The context is not preceded by <|endoftext|>, as in
    GPT-2's scoring."""
    context = enc.encode_ordinary(example["ctx"])
    endings = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    if max(map(len, endings)) >= block_size:
        return None
    rows, scored = [], []
    for ending_ids in endings:
        row = (context + ending_ids)[-block_size:]
        rows.append(row)
        scored.append(min(len(ending_ids), len(row) - 1))  # the first token of a row has no prediction
    return rows, scored, example["label"], len(context) + max(map(len, endings)) > block_size


def render_examples(examples, block_size, limit=0):
    """The first `limit` examples (0 = all), tokenized for a model of this block_size; None for each one
    that cannot be scored at this block_size (evaluate_hellaswag counts them as skipped)."""
    enc = get_encoding()
    rendered = [render_example(enc, example, block_size) for example in examples[:limit or None]]
    if all(example is None for example in rendered):
        raise ValueError(f"no HellaSwag example fits block_size={block_size}: each has an ending of "
                         f"{block_size} tokens or more, which leaves no context to score it against")
    return rendered


# ----------------------------------------------------------------------------------------------
# HellaSwag: scoring

def score_endings(model, rendered, device):
    """(sum, mean) log-probability of each ending given its context: two (examples, 4) tensors.
    All 4 x examples rows go through the model in one forward pass, right-padded to the longest:
    causal attention keeps padding from changing the positions before it, and padding is never scored."""
    rows = [row for example in rendered for row in example[0]]
    scored = [n for example in rendered for n in example[1]]
    width = max(len(row) for row in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, scored)):
        x[i, :len(row)] = torch.tensor(row)
        y[i, len(row) - 1 - n:len(row) - 1] = torch.tensor(row[len(row) - n:])  # position t predicts token t+1
    total = model.target_logprobs(x.to(device), y.to(device)).sum(1).cpu()
    mean = total / torch.tensor(scored)
    return total.view(-1, 4), mean.view(-1, 4)


@torch.no_grad()
def evaluate_hellaswag(model, rendered, device, autocast, batch_size=8, rank=0, world_size=1, progress=False):
    """{'hellaswag_acc', 'hellaswag_acc_norm', 'hellaswag_n'} over the rendered examples, and how many of
    them were cropped to block_size (hellaswag_cropped, among the n scored) or skipped (hellaswag_skipped,
    not in n). Under DDP each rank scores rendered[rank::world_size] and the counts are summed, so every
    rank must call this."""
    share = rendered[rank::world_size]
    # similar lengths batched together waste less on padding; the order does not change the counts
    mine = sorted((example for example in share if example is not None), key=lambda example: max(map(len, example[0])))
    counts = torch.zeros(5, dtype=torch.float64)  # right by sum, right by mean, examples, cropped, skipped
    counts[3:] = torch.tensor([sum(example[3] for example in mine), len(share) - len(mine)])
    was_training = model.training
    model.eval()
    with tqdm(total=len(mine), unit="example", desc="hellaswag", disable=None if progress else True) as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            with autocast:
                total, mean = score_endings(model, batch, device)
            labels = torch.tensor([example[2] for example in batch])
            counts[:3] += torch.tensor([(total.argmax(1) == labels).sum().item(),
                                        (mean.argmax(1) == labels).sum().item(), len(batch)], dtype=torch.float64)
            bar.update(len(batch))
    model.train(was_training)
    if world_size > 1:
        counts = counts.to(device)  # nccl reduces CUDA tensors, gloo CPU ones
        dist.all_reduce(counts)
    right, right_norm, n, cropped, skipped = counts.tolist()
    return {"hellaswag_acc": right / n, "hellaswag_acc_norm": right_norm / n, "hellaswag_n": int(n),
            "hellaswag_cropped": int(cropped), "hellaswag_skipped": int(skipped)}


# ----------------------------------------------------------------------------------------------
# val.bin: loss and bits per byte

def token_byte_lengths(enc):
    """How many bytes of text each token id stands for: (VOCAB_SIZE,) int64. GPT-2's BPE works on bytes,
    so a text's UTF-8 bytes are exactly its tokens' bytes one after the other; <|endoftext|> separates
    documents and is no text (0 bytes), but predicting it is part of the loss charged to the text."""
    return torch.tensor([0 if i == EOT_TOKEN else len(enc.decode_single_token_bytes(i)) for i in range(VOCAB_SIZE)])


def val_windows(path, block_size, batch_size, max_tokens=0):
    """(x, y) batches covering the first max_tokens tokens of path (0 = all) in consecutive windows of
    block_size targets; the last, shorter window comes alone. Every target token is scored once."""
    data = open_tokens(path)  # ours or an llm.c shard
    n = min(len(data), max_tokens) if max_tokens else len(data)
    starts = list(range(0, n - 1, block_size))
    full = [s for s in starts if s + block_size + 1 <= n]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts[len(full):]]
    for batch in batches:
        length = min(block_size, n - 1 - batch[0])
        window = torch.from_numpy(np.stack([data[s:s + length + 1] for s in batch]).astype(np.int64))
        yield window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate_val(model, path, device, autocast, batch_size=4, max_tokens=0, progress=False):
    """{'val_loss' (nats/token), 'val_bpb' (bits/byte), 'val_tokens', 'val_bytes'} of the model on val.bin."""
    byte_lengths = token_byte_lengths(get_encoding())
    nats, tokens, text_bytes = 0.0, 0, 0
    model.eval()
    windows = list(val_windows(path, model.config.block_size, batch_size, max_tokens))
    for x, y in tqdm(windows, unit="batch", desc="val", disable=None if progress else True):
        with autocast:
            nats += -model.target_logprobs(x.to(device), y.to(device)).sum().item()
        tokens += y.numel()
        text_bytes += byte_lengths[y].sum().item()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / text_bytes, "val_tokens": tokens,
            "val_bytes": text_bytes}
