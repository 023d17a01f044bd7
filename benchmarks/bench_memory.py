"""
Peak memory and time of one training step with the memory levers, side by side in one run: a plain
nanoGPT-style step that computes the full (B, T, vocab) logits and their cross-entropy (written here, as
the reference, with glibc's allocator as it comes, as nanoGPT runs), the default step (chunked loss, glibc's
thresholds raised by runtime.keep_freed_memory as train.py does at start), the same with glibc as it comes,
and the default with activation_checkpointing. Every variant runs in a process of its own (peak RSS and malloc settings are per process),
the variants alternated round after round so that a change in the machine's load hits them all alike.

$ python benchmarks/bench_memory.py                    # the seed shape: 12x12x384, block 1024, fp32, micro-batch 4
$ python benchmarks/bench_memory.py --study=compile    # compiled: the chunked loss against the full logits, and eager
$ python benchmarks/bench_memory.py --study=compile --n_layer=4 --n_head=4 --n_embd=128 --block_size=128 \
      --batch_size=8 --dtype=bfloat16 --iters=20       # the same at the CPU quick start's shape
$ python benchmarks/bench_memory.py --study=quickstart --data_dir=data/fineweb   # train.py's quick start
$ python benchmarks/bench_memory.py --table=True       # per-row memory of the 40M and 124M configs -> what fits

Peak memory is the whole process's peak RSS on a CPU (Python and libraries included), and
torch.cuda.max_memory_allocated on a GPU. ms/iter is wall time; CPU ms/iter (user + system, all threads)
is printed beside it because on a shared machine wall time grows with other people's load.

--study=compile compares compiled steps (torch.compile, inductor): the default (chunked loss, which the
compiler traces as part of the one graph) against the full logits (chunked_loss=False), and against the
default run eagerly. The first step's time, compilation included, is printed as "first step".

--study=quickstart runs `python train.py config/train_fineweb_cpu.py` whole (150 iterations, evaluations
and samples included) with compile=False and compile=True, each with an empty compile cache as a first run
has, and a plain nanoGPT-style loop at the same shape (full logits, eager, glibc as it comes, the same
dtype and batches from the same train.bin), alternated: train.py's ms/iter (the median of its logged
windows after the first) against the plain loop's, and each run's wall time from start to end.

--table=True measures one step of the default and of checkpointing at micro-batch 1 and 4 for config/train_fineweb.py
and config/train_fineweb_124m.py in bf16 (as a GPU trains them), takes the growth per row, and prints the
largest micro-batch that fits on 8/12/16/24 GiB cards: weights, gradients and AdamW moments (16 bytes per
parameter) plus 1 GiB for the CUDA context and the allocator's slack, plus the rows. An estimate until
bench.py --fit_memory measures it on the card.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

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
study = "levers"  # 'levers' (the memory levers, eager), 'compile' (compiled steps) or 'quickstart' (train.py)
table = False  # measure per-row memory of the 40M and 124M configs instead, and print what fits
data_dir = "data/fineweb"  # --study=quickstart: the prepared train.bin / val.bin
loop_iters = 60  # --study=quickstart: iterations of the plain loop (the first 10 untimed)
variant = ""  # internal: the one variant a child process runs
config_file = ""  # internal: the child's model config file (with --table)
seed = 1337
# -----------------------------------------------------------------------------
VARIANTS = {  # name: (loss, activation_checkpointing, glibc thresholds raised, compiled)
    "plain, glibc as is": ("full logits", False, False, False),
    "default, glibc as is": ("chunked", False, False, False),
    "default": ("chunked", False, True, False),
    "activation_checkpointing": ("chunked", True, True, False),
    "full logits, compiled": ("chunked_loss=False", False, True, True),
    "default, compiled": ("chunked", False, True, True),
}
STUDIES = {  # the variants of each study; the first is the reference of the ratios
    "levers": ["plain, glibc as is", "default, glibc as is", "default", "activation_checkpointing"],
    "compile": ["full logits, compiled", "default, compiled", "default"],
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
    """nanoGPT's forward with targets: the logits of every position (all 50,304 columns, as nanoGPT), one
    cross-entropy over them; the logits are returned (nanoGPT's loop holds them through the backward)."""
    logits = model.lm_head(model.hidden_states(x))
    return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1)


def run_child():
    """One variant: build, one untimed step, `iters` timed steps; print one JSON line."""
    if variant == "plain loop":
        return plain_loop()
    loss_kind, recompute, raise_thresholds, compiled = VARIANTS[variant]
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
    model.chunked_loss = loss_kind != "chunked_loss=False"
    run = torch.compile(model) if compiled else model
    optimizers = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), dev.split(":")[0])
    ctx = autocast_context(dev, dt)
    x = torch.randint(VOCAB_SIZE, (batch_size, shape["block_size"] + 1), device=dev)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        with ctx:
            logits, loss = plain_forward(model, x, y) if loss_kind == "full logits" else run(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizers["optimizer"].step()
        model.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.perf_counter()
    loss = step()
    synchronize(dev)
    first = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(iters):
        loss = step()
    synchronize(dev)
    wall, cpu = (time.perf_counter() - t0) / max(iters, 1), (time.process_time() - cpu0) / max(iters, 1)
    print(json.dumps({"variant": variant, "ms": wall * 1000, "cpu_ms": cpu * 1000, "peak": peak_bytes(dev),
                      "loss": loss, "params": sum(p.numel() for p in model.parameters()), "first_s": first}))


def plain_loop():
    """A plain nanoGPT-style training loop at the quick start's shape (config/train_fineweb_cpu.py): its
    batches (random windows of train.bin through np.memmap), its schedule, full logits, eager, glibc's
    allocator as it comes. Prints ms/iter over loop_iters - 10 iterations after 10 untimed ones."""
    c = configure(train_defaults(), [os.path.join(REPO, "config/train_fineweb_cpu.py")])
    dev = pick_device(c["device"])
    dt = pick_dtype(c["dtype"], dev)  # as train.py picks it for this config
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_dict(c)).to(dev)
    optimizer = model.configure_optimizers(c["weight_decay"], c["learning_rate"], (c["beta1"], c["beta2"]),
                                           "cpu")["optimizer"]
    ctx = autocast_context(dev, dt)
    data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=np.uint16, mode="r")
    bs, T = c["batch_size"], c["block_size"]

    def get_batch():
        ix = torch.randint(len(data) - T, (bs,))
        x = torch.stack([torch.from_numpy(data[i:i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + T].astype(np.int64)) for i in ix])
        return x.to(dev), y.to(dev)

    x, y = get_batch()
    for it in range(loop_iters):
        if it == 10:
            t0, cpu0 = time.perf_counter(), time.process_time()
        lr = c["learning_rate"] * min(1.0, (it + 1) / (c["warmup_iters"] + 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(c["gradient_accumulation_steps"]):
            with ctx:
                _, loss = plain_forward(model, x, y)
                loss = loss / c["gradient_accumulation_steps"]
            x, y = get_batch()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % c["log_interval"] == 0:
            loss.item()
    n = loop_iters - 10
    print(json.dumps({"variant": variant, "ms": (time.perf_counter() - t0) * 1000 / n, "dtype": dt,
                      "cpu_ms": (time.process_time() - cpu0) * 1000 / n, "peak": peak_bytes(dev)}))


def fresh_compile_cache():
    """An environment whose inductor cache is a new empty folder: every compiled run pays what a first
    run pays (a warm cache would make the second round's compilations look cheaper than the first's)."""
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))


def child(name, *extra):
    args = [sys.executable, os.path.abspath(__file__), f"--variant={name}", f"--device={device}", f"--dtype={dtype}",
            f"--iters={iters}", f"--seed={seed}", f"--n_layer={n_layer}", f"--n_head={n_head}", f"--n_embd={n_embd}",
            f"--block_size={block_size}", f"--batch_size={batch_size}", f"--data_dir={data_dir}",
            f"--loop_iters={loop_iters}", *extra]
    proc = subprocess.run(args, capture_output=True, text=True, env=fresh_compile_cache())
    if proc.returncode != 0:
        fail(f"{name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}",
             status=1)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare():
    print(f"{n_layer} layers x {n_head} heads x {n_embd}, block {block_size}, micro-batch {batch_size}, {device}, "
          f"{dtype}; {rounds} rounds x {iters} timed steps per variant, each variant in its own process; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    names = STUDIES[study]
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):  # alternated: neither end always runs first
            results[name].append(child(name))
            print(f"  round {r + 1}: {name}: {results[name][-1]['ms']:,.0f} ms/iter, "
                  f"peak {results[name][-1]['peak'] / 2**30:.2f} GiB, "
                  f"first step {results[name][-1]['first_s']:.1f} s, load average {os.getloadavg()[0]:.1f}",
                  flush=True)
    ref = results[names[0]]
    ref_peak, ref_ms, ref_cpu = (max(r["peak"] for r in ref), sum(r["ms"] for r in ref) / rounds,
                                 sum(r["cpu_ms"] for r in ref) / rounds)
    print(f"\n| step | peak {'RSS' if device == 'cpu' else 'allocated'} | x ref | ms/iter | x ref | "
          f"CPU ms/iter | x ref | first step (s) | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in names:
        peak = max(r["peak"] for r in results[name])
        ms, cpu = sum(r["ms"] for r in results[name]) / rounds, sum(r["cpu_ms"] for r in results[name]) / rounds
        first = " / ".join(f"{r['first_s']:.1f}" for r in results[name])
        print(f"| {name} | {peak / 2**30:.2f} GiB | {peak / ref_peak:.2f} | {ms:,.0f} | {ms / ref_ms:.2f} | "
              f"{cpu:,.0f} | {cpu / ref_cpu:.2f} | {first} | {results[name][-1]['loss']:.4f} |")
    print(f"(x ref: against {names[0]})")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def train_py(compile_on):
    """One whole quick start, `python train.py config/train_fineweb_cpu.py`, in a fresh process: its wall
    time, the median ms/iter of its logged windows after the first, and its last val loss."""
    with tempfile.TemporaryDirectory() as out_dir:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "train.py", "config/train_fineweb_cpu.py", f"--data_dir={data_dir}",
                               f"--out_dir={out_dir}", f"--compile={compile_on}"], cwd=REPO, capture_output=True,
                              text=True, env=fresh_compile_cache())
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            fail(f"train.py --compile={compile_on} failed: {proc.stderr.strip().splitlines()[-1:]}", status=1)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    windows = [r["ms_per_iter"] for r in records if "ms_per_iter" in r][1:]
    return {"wall": wall, "ms": statistics.median(windows), "val": [r["val_loss"] for r in records if "val_loss" in r][-1]}


def quickstart():
    if not os.path.exists(os.path.join(data_dir, "train.bin")):
        fail(f"data_dir={data_dir!r} has no train.bin: prepare the quick start's data first "
             "(python data/fineweb/prepare.py --input=...) or give --data_dir")
    print(f"the quick start, config/train_fineweb_cpu.py, data {data_dir}; {rounds} rounds, alternated; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    names = ["train.py, compile=False", "train.py, compile=True", "plain loop"]
    results = {name: [] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            if name == "plain loop":
                results[name].append(child(name))
                text = f"{results[name][-1]['ms']:,.0f} ms/iter ({results[name][-1]['dtype']})"
            else:
                results[name].append(train_py(name.endswith("True")))
                text = (f"{results[name][-1]['ms']:,.0f} ms/iter, whole run {results[name][-1]['wall']:.0f} s, "
                        f"val loss {results[name][-1]['val']:.4f}")
            print(f"  round {r + 1}: {name}: {text}, load average {os.getloadavg()[0]:.1f}", flush=True)
    plain = statistics.mean(r["ms"] for r in results["plain loop"])
    print("\n| run | ms/iter | x plain loop | whole run (s), per round |")
    print("|---|---|---|---|")
    for name in names:
        ms = statistics.mean(r["ms"] for r in results[name])
        walls = " / ".join(f"{r['wall']:.0f}" for r in results[name]) if "wall" in results[name][0] else ""
        print(f"| {name} | {ms:,.0f} | {ms / plain:.2f} | {walls} |")
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
    elif study == "quickstart":
        quickstart()
    elif study in STUDIES:
        compare()
    else:
        fail(f"study={study!r}: allowed are {', '.join(map(repr, [*STUDIES, 'quickstart']))}")
