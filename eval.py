"""
How good is a model: val loss and bits per byte on val.bin, and HellaSwag accuracy (see kit/evaluation.py
for what each figure means). Prints them and appends them as one JSON line to out_dir/evals.jsonl.
Offline, with HellaSwag neither cached nor given (--hellaswag_file), it scores the val loss and says so.

$ python eval.py --out_dir=out-fineweb --ckpt=best
$ python eval.py --out_dir=out-fineweb --limit=500 --eval_val=False       # a quick look at HellaSwag
$ python eval.py --init_from=gpt2 --data_dir=data/fineweb                  # GPT-2 from the hub, for comparison
$ python eval.py --out_dir=out-fineweb --val_file=standard --eval_hellaswag=False  # the val set llm.c reports on
$ python eval.py --init_from=hf_model --hellaswag_file=hellaswag_val.jsonl # a Hugging Face folder, offline
"""
import json
import os
import sys
import time

from configurator import config_globals, configure, fail
from kit.checkpoint import load_model
from kit.evaluation import evaluate_hellaswag, evaluate_val, load_hellaswag, render_examples
from kit.hf import load_gpt2
from kit.loader import check_token_ids, num_tokens
from kit.runtime import autocast_context, pick_device, pick_dtype, setup_process, synchronize
from kit.shards import STANDARD_VAL_NAME, STANDARD_VAL_TOKENS, open_tokens, standard_val_file
from kit.tokenizer import EOT_TOKEN, VOCAB_SIZE, read_dataset_meta
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
out_dir = "out"  # where train.py wrote its checkpoints; evals.jsonl is appended here
ckpt = "last"  # 'last' (ckpt.pt), 'best' (best.pt), 'stable' or a path to a .pt file
init_from = ""  # evaluate 'gpt2'...'gpt2-xl' or a Hugging Face GPT-2 folder instead of a checkpoint
data_dir = ""  # the folder holding val.bin; '' = the checkpoint's own dataset (data/fineweb for GPT-2 weights)
eval_val = True  # val loss and bits per byte
val_file = ""  # a token file to score instead (ours or an llm.c shard); 'standard' = the standard FineWeb val set
val_tokens = 0  # score the first this many tokens of val.bin; 0 = all of it (of a val_file: the standard 10,485,760)
eval_hellaswag = True
hellaswag_file = ""  # hellaswag_val.jsonl; '' = downloaded once into data/hellaswag/
limit = 0  # score the first this many HellaSwag examples; 0 = all 10,042
batch_size = 8  # HellaSwag examples (4 rows each) or val.bin windows per forward pass
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = "auto"
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)
REPO_DIR = os.path.dirname(os.path.abspath(__file__))


def check_options():
    if not (eval_val or eval_hellaswag):
        fail("eval_val=False and eval_hellaswag=False: nothing to evaluate")


def load_evaluated_model():
    """(model, where it came from, its iteration or None, its training config or {})."""
    if init_from:
        model_args, state = load_gpt2(init_from)
        model = GPT(GPTConfig(**model_args))
        model.load_state_dict(state)
        return model, init_from, None, {}
    model, checkpoint, path = load_model(out_dir, ckpt)
    return model, path, checkpoint["iter_num"], checkpoint.get("config") or {}


def tokens_to_read():
    """val_tokens; for a val_file 0 means the standard count: inputs at tokens 0 .. 10,485,759, each predicting
    the next, as llm.c and modded-nanogpt score it (10,485,761 tokens read, 10,485,760 scored)."""
    return val_tokens or (STANDARD_VAL_TOKENS + 1 if val_file else 0)


def val_path(train_config):
    """--val_file, else val.bin of --data_dir, else of the dataset the checkpoint was trained on."""
    dataset = train_config.get("dataset", "fineweb")
    folder = data_dir or train_config.get("data_dir") or os.path.join(REPO_DIR, "data", dataset)
    path = os.path.join(folder, "val.bin")
    recorded_max = None  # prepare.py's meta.json records val.bin's largest id: no need to read the file for it
    if os.path.exists(os.path.join(folder, "meta.json")) and not val_file:  # prepare.py's record: same tokenizer
        try:
            recorded_max = read_dataset_meta(folder)["splits"]["val"].get("max_token_id")
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))
    try:
        path = (standard_val_file() if val_file == STANDARD_VAL_NAME else val_file) or path
        if not os.path.isfile(path):
            fail(f"{path} not found: pass --data_dir=<folder holding val.bin> or --val_file=PATH, or "
                 f"--eval_val=False for HellaSwag only")
        if num_tokens(path) < 2:
            fail(f"{path} holds fewer than 2 tokens: nothing to predict")
    except ValueError as e:  # an llm.c shard whose header is wrong, a val set that cannot be downloaded
        fail(str(e))
    targets = open_tokens(path)[1:tokens_to_read() or None]  # what evaluate_val scores
    if not (targets != EOT_TOKEN).any():  # bits per byte would divide by 0 bytes of text
        fail(f"{path}: every token to be scored is <|endoftext|> (no text, 0 bytes), so bits per byte is undefined; "
             f"score more of it (val_tokens) or another val.bin")
    try:
        check_token_ids(path, VOCAB_SIZE, recorded_max)
    except ValueError as e:
        fail(str(e))
    return path


def hellaswag_examples(block_size, skippable):
    """The rendered HellaSwag examples; None when off, or when the default file is neither cached nor
    downloadable and the val loss still runs (skippable): offline, eval.py scores what it can."""
    if not eval_hellaswag:
        return None
    try:
        return render_examples(load_hellaswag(hellaswag_file), block_size, limit)
    except ValueError as e:
        if hellaswag_file or not skippable:
            fail(f"{e}, or --eval_hellaswag=False to skip it")
        print(f"hellaswag: skipped: {e} (--eval_hellaswag=False skips it quietly)", file=sys.stderr)
        return None


def append_result(record):
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "evals.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        fail(f"cannot write {os.path.join(out_dir, 'evals.jsonl')}: {e.strerror or e}")


def main():
    check_options()
    # a closed pipe must not cost the record: evals.jsonl still gets it
    malloc_note = setup_process("lower batch_size (val.bin windows or HellaSwag examples per forward pass)")
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        model, source, iter_num, train_config = load_evaluated_model()
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    path = val_path(train_config) if eval_val else None
    rendered = hellaswag_examples(model.config.block_size, skippable=eval_val)
    model.eval().to(dev)
    autocast = autocast_context(dev, dt)
    print(f"evaluating {source}" + (f" (iteration {iter_num})" if iter_num is not None else "")
          + f" on {dev}, {dt}", file=sys.stderr)
    if malloc_note:
        print(malloc_note, file=sys.stderr)
    record = {"checkpoint": source, "iter": iter_num, "val_loss": None, "val_bpb": None, "val_tokens": None,
              "hellaswag_acc": None, "hellaswag_acc_norm": None, "hellaswag_n": None, "hellaswag_cropped": None,
              "hellaswag_skipped": None}
    if eval_val:
        windows = -(-(min(tokens_to_read() or num_tokens(path), num_tokens(path)) - 1) // model.config.block_size)
        print(f"val: scoring {windows:,} windows of {model.config.block_size} tokens of {path}"
              + ("" if val_tokens else "; --val_tokens=N scores only the first N tokens"), file=sys.stderr)
        val = evaluate_val(model, path, dev, autocast, batch_size, tokens_to_read(), progress=True)
        record.update(val_loss=val["val_loss"], val_bpb=val["val_bpb"], val_tokens=val["val_tokens"])
        print(f"val: {val['val_tokens']:,} tokens ({val['val_bytes']:,} bytes of text) of {path}: "
              f"loss {val['val_loss']:.4f} nats/token, {val['val_bpb']:.4f} bits/byte")
    if rendered is not None:
        t0 = time.time()
        record.update(evaluate_hellaswag(model, rendered, dev, autocast, batch_size, progress=True))
        synchronize(dev)
        seconds = time.time() - t0
        print(f"hellaswag: {record['hellaswag_n']:,} examples: acc {record['hellaswag_acc']:.4f}, "
              f"acc_norm {record['hellaswag_acc_norm']:.4f} ({record['hellaswag_n'] / seconds:.1f} examples/s)")
        if record["hellaswag_cropped"] or record["hellaswag_skipped"]:
            print(f"hellaswag: {record['hellaswag_cropped']:,} of them cropped to block_size="
                  f"{model.config.block_size} (their context loses its start); {record['hellaswag_skipped']:,} "
                  f"skipped, not scored: an ending alone is {model.config.block_size} tokens or more")
    append_result(record)
    print(f"appended to {os.path.join(out_dir, 'evals.jsonl')}", file=sys.stderr)


if __name__ == "__main__":
    main()
