"""
HellaSwag scoring speed (examples/s) for the ~40M model of config/train_fineweb.py (random weights:
speed does not depend on them), through evaluate.evaluate_hellaswag as eval.py and train.py call it.

$ python benchmarks/bench_eval.py                          # CPU, fp32, the 12 test examples x 8
$ python benchmarks/bench_eval.py --device=cuda --dtype=bfloat16 --batch_size=32 --hellaswag_file=hellaswag_val.jsonl

Examples/s depends on their length: the printed tokens per row says what was measured (rows are
context + ending); time scales about with the tokens, so other files scale by their row length.
"""
import os
import sys
import time

import torch

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)
from configurator import config_globals, configure, fail  # noqa: E402
from kit.evaluation import evaluate_hellaswag, read_hellaswag, render_examples  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from kit.runtime import autocast_context, pick_device, pick_dtype, synchronize  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 12  # the 40M configuration
n_head = 12
n_embd = 384
block_size = 1024
batch_size = 8  # examples (4 rows each) per forward pass
hellaswag_file = os.path.join(REPO_DIR, "tests", "data", "hellaswag_tiny.jsonl")
repeat = 8  # score the file's examples this many times over
device = "cpu"
dtype = "float32"
threads = 0  # CPU threads; 0 = torch's default (one per core)
seed = 1337
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)


def main():
    try:
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        rendered = render_examples(read_hellaswag(hellaswag_file), block_size) * repeat
    except ValueError as e:
        fail(str(e))
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False))
    model.eval().to(dev)
    autocast = autocast_context(dev, dt)
    evaluate_hellaswag(model, rendered[:batch_size], dev, autocast, batch_size)  # warm-up: allocator, kernels
    synchronize(dev)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = evaluate_hellaswag(model, rendered, dev, autocast, batch_size)
    synchronize(dev)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    rows = [row for example in rendered for row in example[0]]
    tokens = sum(map(len, rows))
    print(f"{n_layer}x{n_embd} model on {dev} ({dt}, {torch.get_num_threads()} threads), batch_size {batch_size}: "
          f"{result['hellaswag_n']} examples in {seconds:.2f}s = {result['hellaswag_n'] / seconds:.1f} examples/s "
          f"({tokens / len(rows):.1f} tokens per row, {tokens / seconds:,.0f} tokens/s); this process used "
          f"{cpu_seconds:.2f} CPU-seconds = {result['hellaswag_n'] / cpu_seconds:.1f} examples per CPU-second "
          "(on a machine shared with other jobs the wall-clock figure is lower)")


if __name__ == "__main__":
    main()
