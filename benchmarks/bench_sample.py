"""
Generation speed with and without the KV cache, for the ~40M model of config/train_fineweb.py
(random weights: speed does not depend on them). Also checks that both paths produce the same tokens.

$ python benchmarks/bench_sample.py                       # CPU, fp32, batch 1, 64-token prompt, 512 new tokens
$ python benchmarks/bench_sample.py --device=cuda --dtype=bfloat16
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import config_globals, configure, fail  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from kit.runtime import autocast_context, pick_device, pick_dtype, synchronize  # noqa: E402
from kit.tokenizer import VOCAB_SIZE  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 12  # the 40M configuration
n_head = 12
n_embd = 384
block_size = 1024
batch_size = 1
prompt_tokens = 64
new_tokens = 512
device = "cpu"
dtype = "float32"
threads = 0  # CPU threads; 0 = torch's default (one per core)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)


def timed_generation(model, prompt, use_cache, dev, dt):
    """(wall seconds, CPU seconds of this process, generated tokens) for new_tokens tokens, sampled at
    temperature 1 from a fixed seed. On a CPU shared with other jobs the wall time grows with their
    load; with --threads=1 the CPU time does not, and tokens per CPU second is the idle core's rate."""
    torch.manual_seed(seed)
    synchronize(dev)
    t0, cpu0 = time.perf_counter(), time.process_time()
    with autocast_context(dev, dt):
        tokens = [t for t in model.generate_tokens(prompt, new_tokens, temperature=1.0, vocab_size=VOCAB_SIZE,
                                                   use_cache=use_cache)]
    synchronize(dev)
    return time.perf_counter() - t0, time.process_time() - cpu0, torch.cat(tokens, dim=1)


def main():
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
    except ValueError as e:
        fail(str(e))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False))
    model.eval().to(dev)
    prompt = torch.randint(0, VOCAB_SIZE, (batch_size, prompt_tokens), device=dev)
    print(f"{model.get_num_params() / 1e6:.1f}M parameters, batch {batch_size}, {prompt_tokens}-token prompt, "
          f"{new_tokens} new tokens, {dev} {dt}"
          + (f", {torch.get_num_threads()} threads" if dev == "cpu" else ""), flush=True)
    for use_cache in (True, False):  # warm-up: allocator, kernels
        with autocast_context(dev, dt):
            list(model.generate_tokens(prompt, 4, use_cache=use_cache))
    results = {}
    for use_cache in (True, False):
        seconds, cpu_seconds, tokens = timed_generation(model, prompt, use_cache, dev, dt)
        results[use_cache] = (seconds, cpu_seconds, tokens)
        generated = batch_size * new_tokens
        print(f"{'with' if use_cache else 'without'} KV cache: {generated / seconds:8.1f} tokens/s ({seconds:.1f}s "
              f"wall), {generated / cpu_seconds:.1f} tokens per CPU second", flush=True)
    same = torch.equal(results[True][2], results[False][2])
    print(f"speedup: {results[False][0] / results[True][0]:.1f}x wall, {results[False][1] / results[True][1]:.1f}x "
          f"CPU time; same tokens on both paths: {same}")


if __name__ == "__main__":
    main()
