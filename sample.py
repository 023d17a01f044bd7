"""
Sample from a trained model.

$ python sample.py --out_dir=out-fineweb --device=cuda --num_samples=10 --max_new_tokens=512
$ python sample.py --out_dir=out-fineweb --start="The meaning of life is" --top_p=0.9 --num_samples=1 --stream=True
$ python sample.py --out_dir=out-fineweb --start=FILE:prompt.txt --ckpt=best
"""
import os
import sys
import time

import torch

from configurator import config_globals, configure, fail
from kit.checkpoint import load_model
from kit.guard import to_devnull
from kit.runtime import autocast_context, pick_device, pick_dtype, setup_process, synchronize
from kit.tokenizer import EOT_TOKEN, VOCAB_SIZE, TokenizerUnavailable, decode, encode_prompt, get_encoding

# -----------------------------------------------------------------------------
out_dir = "out"  # where train.py wrote its checkpoints
ckpt = "last"  # 'last' (ckpt.pt), 'best' (best.pt), 'stable' or a path to a .pt file
start = ""  # prompt text, or FILE:path to read it from a file; empty = start a new document
num_samples = 10  # generated together as one batch
max_new_tokens = 500  # past block_size the model sees only the last block_size tokens (a sliding window)
temperature = 0.8  # 1.0 = the model's distribution, lower = more conservative, 0 = greedy
top_k = 200  # keep only the top_k most likely tokens; 0 disables
top_p = 1.0  # nucleus sampling: keep the smallest set of tokens with this much probability; 1.0 disables
stop_at_eot = True  # end a sample at <|endoftext|>: the document ended, what follows would be another one
stream = False  # print tokens as they arrive (num_samples must be 1)
use_cache = True  # KV cache: each new token costs one position instead of the whole context
seed = 1337
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = "auto"
compile = False  # torch.compile the forward pass: pays off for long generations on a GPU
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)


def read_prompt(start):
    if start.startswith("FILE:"):
        path = start[len("FILE:"):]
        if not os.path.isfile(path):
            fail(f"prompt file {path!r} not found")
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except UnicodeDecodeError as e:
            fail(f"prompt file {path!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                 "save it as UTF-8")
    return start


def main():
    # every value was checked by configure() (configurator.RULES); the rest before the checkpoint is read
    if stream and num_samples != 1:
        fail(f"stream=True prints one sample as it is generated; set --num_samples=1 (got {num_samples})")
    # its own BrokenPipeError handling below: sampling is not worth going on for with nobody reading
    malloc_note = setup_process("lower num_samples (they are generated as one batch)", streams=False)
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        prompt_text = read_prompt(start)
        enc = get_encoding()
        model, checkpoint, path = load_model(out_dir, ckpt)
    except (FileNotFoundError, ValueError, TokenizerUnavailable) as e:
        fail(str(e))
    if malloc_note:
        print(malloc_note, file=sys.stderr)
    model.eval().to(dev)
    if compile:
        # generate() calls forward once per token, so forward is what must be compiled (compiling the
        # module would leave generate() calling the eager forward); the cache grows every step: dynamic
        model.forward = torch.compile(model.forward, dynamic=True)
    prompt = encode_prompt(enc, prompt_text)
    if len(prompt) > model.config.block_size:  # generation crops the context to the last block_size tokens
        print(f"warning: the prompt is {len(prompt)} tokens but the model sees at most block_size="
              f"{model.config.block_size}: only its last {model.config.block_size} tokens are used", file=sys.stderr)
    torch.manual_seed(seed)
    if dev.startswith("cuda"):
        torch.cuda.manual_seed(seed)
    x = torch.tensor(prompt, dtype=torch.long, device=dev)[None, ...].repeat(num_samples, 1)
    print(f"sampling from {path} (iteration {checkpoint['iter_num']}), {num_samples} sample(s) of up to "
          f"{max_new_tokens} tokens on {dev}", file=sys.stderr)
    sampling = dict(temperature=temperature, top_k=top_k or None, top_p=top_p, vocab_size=VOCAB_SIZE,
                    stop_token=EOT_TOKEN if stop_at_eot else None, use_cache=use_cache)
    t0 = time.time()
    with torch.no_grad(), autocast_context(dev, dt):
        if stream:
            n_new = stream_sample(model, x, enc, sampling)
        else:
            y = model.generate(x, max_new_tokens, **sampling)
            n_new = 0
            for row in y.tolist():
                new = row[len(prompt):]
                if stop_at_eot and EOT_TOKEN in new:
                    new = new[:new.index(EOT_TOKEN)]
                n_new += len(new)
                print(decode(enc, row[:len(prompt)] if start else []) + decode(enc, new))
                print("---------------")
    synchronize(dev)
    seconds = time.time() - t0
    print(f"{n_new} tokens in {seconds:.2f}s ({n_new / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)


def stream_sample(model, x, enc, sampling):
    """Print one sample as it is generated: the prompt, then each token as soon as it decodes to
    whole characters (a multi-byte character can span tokens). Returns the number of new tokens."""
    if start:
        print(decode(enc, x[0].tolist()), end="", flush=True)
    stop_token = sampling.pop("stop_token")
    new, shown = [], ""
    for token in model.generate_tokens(x, max_new_tokens, **sampling):
        if token.item() == stop_token:
            break
        new.append(token.item())
        text = decode(enc, new)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text
    print(decode(enc, new)[len(shown):])
    return len(new)


if __name__ == "__main__":
    try:
        main()
    except BrokenPipeError:  # the reader went away (`sample.py | head`): nobody to print for, stop quietly
        to_devnull(sys.stdout)
