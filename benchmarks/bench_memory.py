"""
Peak memory and time of one training step with the memory levers, side by side in one run: a plain
nanoGPT-style step that computes the full (B, T, vocab) logits and their cross-entropy (written here, as
the reference, with glibc's allocator as it comes, as nanoGPT runs), the default step (chunked loss, glibc's
thresholds raised by runtime.keep_freed_memory as train.py does at start), the same with glibc as it comes,
and the default with activation_checkpointing. Every variant runs in a process of its own (peak RSS and malloc settings are per process),
the variants alternated round after round so that a change in the machine's load hits them all alike.

$ python benchmarks/bench_memory.py                    # the seed shape: 12x12x384, block 1024, fp32, micro-batch 4
$ python benchmarks/bench_memory.py --table=True       # per-row memory of the 40M and 124M configs -> what fits

Peak memory is the whole process's peak RSS on a CPU (Python and libraries included), and
torch.cuda.max_memory_allocated on a GPU. ms/iter is wall time; CPU ms/iter (user + system, all threads)
is printed beside it because on a shared machine wall time grows with other people's load.

--table=True measures one step of the default and of checkpointing at micro-batch 1 and 4 for config/train_fineweb.py
and config/train_fineweb_124m.py in bf16 (as a GPU trains them), takes the growth per row, and prints the
largest micro-batch that fits on 8/12/16/24 GiB cards: weights, gradients and AdamW moments (16 bytes per
parameter) plus 1 GiB for the CUDA context and the allocator's slack, plus the rows. An estimate until
bench.py --fit_memory measures it on the card.
"""
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import train_defaults  # noqa: E402
from configurator import configure, fail  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from kit.runtime import autocast_context, keep_freed_memory, pick_device, pick_dtype, synchronize  # noqa: E402
from kit.tokenizer import VOCAB_SIZE  # noqa: E402

# -----------------------------------------------------------------------------
n_layer = 12  # the seed shape (config/train_fineweb.py's model)
n_head = 12
n_embd = 384
block_size = 1024
batch_size = 4
device = "cpu"
dtype = "float32"
iters = 1  # timed steps per variant and round, after one untimed step (it allocates AdamW's moments)
rounds = 2  # every variant once per round, in alternating order
table = False  # measure per-row memory of the 40M and 124M configs instead, and print what fits
variant = ""  # internal: the one variant a child process runs
config_file = ""  # internal: the child's model config file (with --table)
seed = 1337
# -----------------------------------------------------------------------------
VARIANTS = {  # name: (loss, activation_checkpointing, glibc thresholds raised)
    "plain, glibc as is": ("full logits", False, False),
    "default, glibc as is": ("chunked", False, False),
    "default": ("chunked", False, True),
    "activation_checkpointing": ("chunked", True, True),
}
TABLE_VARIANTS = ["default", "activation_checkpointing"]
CARDS_GIB = [8, 12, 16, 24]
CONFIGS = ["config/train_fineweb.py", "config/train_fineweb_124m.py"]
config = configure({k: v for k, v in globals().items() if k.islower() and not k.startswith("_")
                    and isinstance(v, (int, float, bool, str))}, sys.argv[1:])
globals().update(config)


def peak_bytes(dev):
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def plain_forward(model, x, y):
    """nanoGPT's forward with targets: the logits of every position, one cross-entropy over them; the
    logits are returned (nanoGPT's loop, and train.py before the chunked loss, held them through the
    backward)."""
    logits = model.output_logits(model.hidden_states(x))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)


def run_child():
    """One variant: build, one untimed step, `iters` timed steps; print one JSON line."""
    loss_kind, recompute, raise_thresholds = VARIANTS[variant]
    if raise_thresholds:
        keep_freed_memory()  # before the first large allocation, as the scripts do
    shape = dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, bias=False)
    if config_file:
        settings = configure(train_defaults(), [os.path.join(REPO, config_file)])
        shape = {k: settings[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")}
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**shape)).to(dev)
    model.activation_checkpointing = recompute
    optimizers = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev.split(":")[0])
    ctx = autocast_context(dev, dt)
    x = torch.randint(VOCAB_SIZE, (batch_size, shape["block_size"] + 1), device=dev)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with ctx:
            logits, loss = plain_forward(model, x, y) if loss_kind == "full logits" else model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizers["optimizer"].step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    loss = step()
    synchronize(dev)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        loss = step()
    synchronize(dev)
    wall, cpu = (time.perf_counter() - t0) / max(iters, 1), (time.process_time() - cpu0) / max(iters, 1)
    print(json.dumps({"variant": variant, "ms": wall * 1000, "cpu_ms": cpu * 1000, "peak": peak_bytes(dev),
                      "loss": loss, "params": sum(p.numel() for p in model.parameters())}))


def child(name, *extra):
    args = [sys.executable, os.path.abspath(__file__), f"--variant={name}", f"--device={device}", f"--dtype={dtype}",
            f"--iters={iters}", f"--seed={seed}", f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
            f"--block_size={block_size}", f"--batch_size={batch_size}", *extra]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
             status=1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare():
    print(f"{n_layer} layers x {n_head} heads x {n_embd}, block {block_size}, micro-batch {batch_size}, {device}, "
          f"{dtype}; {rounds} rounds x {iters} timed steps per variant, each variant in its own process; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    names = list(VARIANTS)
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternated: neither end always runs first
            results[name].append(child(name))
            print(f"  round {r + 1}: {name}: {results[name][-1]['ms']:,.0f} ms/iter, "
                  f"peak {results[name][-1]['peak'] / 2**30:.2f} GiB", flush=True)
    ref = results["plain, glibc as is"]
    ref_peak, ref_ms, ref_cpu = (max(r["peak"] for r in ref), sum(r["ms"] for r in ref) / rounds,
                                 sum(r["cpu_ms"] for r in ref) / rounds)
    print(f"\n| step | peak {'RSS' if device == 'cpu' else 'allocated'} | x plain | ms/iter | x plain | "
          f"CPU ms/iter | x plain | loss |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        peak = max(r["peak"] for r in results[name])
        ms, cpu = sum(r["ms"] for r in results[name]) / rounds, sum(r["cpu_ms"] for r in results[name]) / rounds
        print(f"| {name} | {peak / 2**30:.2f} GiB | {peak / ref_peak:.2f} | {ms:,.0f} | {ms / ref_ms:.2f} | "
              f"{cpu:,.0f} | {cpu / ref_cpu:.2f} | {results[name][-1]['loss']:.4f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def fits(per_row, params, card_gib):
    """Largest micro-batch whose estimated memory stays within the card: 16 bytes per parameter
    (fp32 weights, gradients, AdamW's two moments) + 1 GiB + per_row bytes per row."""
    return max(0, int((card_gib * 2**30 - 16 * params - 2**30) // per_row))


def what_fits():
    rows_small, rows_large = 1, 4  # 1 and 2 differ by less than the heap's own noise (measured)
    print(f"per-row memory, {device}, {dtype}, block from each config, micro-batch {rows_small} and {rows_large}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    lines = []
    for path in CONFIGS:
        for name in TABLE_VARIANTS:
            small, large = (child(name, f"--config_file={path}", f"--batch_size={b}", "--iters=0")
                            for b in (rows_small, rows_large))
            per_row = (large["peak"] - small["peak"]) / (rows_large - rows_small)
            print(f"  {path} {name}: peak {small['peak'] / 2**30:.2f} GiB at {rows_small}, "
                  f"{large['peak'] / 2**30:.2f} GiB at {rows_large}: {per_row / 2**20:,.0f} MiB per row", flush=True)
            lines.append((path, name, per_row, small["params"]))
    print(f"\n| config | step | MiB per row | " + " | ".join(f"{c} GiB" for c in CARDS_GIB) + " |")
    print("|---|---|---|" + "---|" * len(CARDS_GIB))
    for path, name, per_row, params in lines:
        if per_row <= 0:  # the heap's retained memory hid the rows' growth: no estimate, rather than a wrong one
            print(f"| {path} | {name} | {per_row / 2**20:,.0f}: below the heap's noise | "
                  + " | ".join("n/a" for _ in CARDS_GIB) + " |")
            continue
        print(f"| {path} | {name} | {per_row / 2**20:,.0f} | "
              + " | ".join(str(fits(per_row, params, c)) for c in CARDS_GIB) + " |")


if __name__ == "__main__":
    if variant:
        run_child()
    elif table:
        what_fits()
    else:
        compare()
