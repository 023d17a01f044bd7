"""
Training throughput of a model config: forward + backward + optimizer step on one micro-batch, timed with
the device synchronised. Prints ms/iter, tokens/s, MFU, peak memory and the optimizer's state (--optimizer=muon: Muon's too).

$ python bench.py config/train_fineweb.py                          # the ~40M reference model
$ python bench.py config/train_fineweb_124m.py --compile=False --dtype=float16 --batch_size=4
$ python bench.py config/train_fineweb.py --real_data=True         # batches from data/fineweb/train.bin
$ python bench.py config/train_fineweb.py --profile=True           # also writes a torch profiler trace
$ python bench.py config/train_fineweb_124m.py --fit_memory=12GB   # largest micro-batch under 12 GB (both levers)
$ python bench.py config/train_fineweb_124m.py --fit_memory=free   # ... in the GPU's free memory

bench.py takes the same config files and --key=value as train.py: its defaults are train.py's own
(read from its settings block, so the list exists once) plus the bench keys below. Keys that only
matter to training (out_dir, the LR schedule, wandb, ...) are accepted and ignored.

Peak memory is torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak resident set
size stands in for it (the whole process, Python and libraries included).
"""
import os
import re
import sys
import time
from types import SimpleNamespace

import torch

from configurator import configure, fail, script_defaults
from kit.loader import TokenBatches
from kit.runtime import (autocast_context, compile_with_fallback, device_peak_flops, estimate_mfu, keep_freed_memory,
                         pick_device, pick_dtype, synchronize)
from model import GPT, VOCAB_SIZE, GPTConfig

# the bench's own keys, besides train.py's
BENCH_DEFAULTS = dict(
    bench_iters=10,  # timed iterations
    bench_warmup=3,  # untimed iterations first (compilation, allocator, cuBLAS heuristics)
    real_data=False,  # read batches from train.bin (data_dir, or data/<dataset>) instead of random tokens
    profile=False,  # run a few more iterations under torch.profiler and write a Chrome trace
    profile_file="bench_trace.json",  # where the trace goes (chrome://tracing or ui.perfetto.dev)
    # '12GB', '11.5GiB' or 'free': find the largest micro-batch that fits (needs CUDA). The budget is
    # for what PyTorch reserves; the CUDA context (~0.5 GB) and other programs (a display) come on
    # top, so on a 12 GB card give ~11GB, or 'free' (free memory now, with nothing else running)
    fit_memory="",
)


TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
SETTINGS_SOURCES = [TRAIN_PY, __file__]  # --help: train.py's settings and their comments, then the bench's


def train_defaults(path=TRAIN_PY):
    """train.py's settings and their defaults."""
    return script_defaults(path)


def parse_memory(text):
    """'12GB' -> 12e9 bytes, '11.5GiB' -> 11.5 * 2**30, also MB / MiB / TB / bytes."""
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in units:
        raise ValueError(f"fit_memory={text!r}: expected a size like 12GB, 11.5GiB or 12000MB, or 'free'")
    return float(m.group(1)) * units[m.group(2).upper()]


def largest_fitting_batch(measure, budget, max_batch):
    """Largest micro-batch b <= max_batch whose measure(b) (peak bytes, or None for out of memory)
    is at most budget: doubling from 1, then bisection, assuming memory grows with b.
    Returns (b, trials) with trials a list of (b, peak or None); b is 0 when even 1 does not fit."""
    trials = []

    def fits(b):
        peak = measure(b)
        trials.append((b, peak))
        return peak is not None and peak <= budget

    good, bad, b = 0, max_batch + 1, 1
    while b <= max_batch:
        if not fits(b):
            bad = b
            break
        good, b = b, b * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, trials


def accumulation_plan(sequences_per_iter, max_batch):
    """(batch_size, gradient_accumulation_steps) whose product is exactly sequences_per_iter, with
    the largest batch_size <= max_batch that divides it."""
    batch = max(d for d in range(1, min(max_batch, sequences_per_iter) + 1) if sequences_per_iter % d == 0)
    return batch, sequences_per_iter // batch


def fit_report(fitted, block_size, tokens_per_iter, levers=""):
    """Lines that turn the largest fitting micro-batch into a batch_size / gradient_accumulation_steps
    pair keeping tokens_per_iter; levers (e.g. ' --activation_checkpointing=True') go on the use: line."""
    if fitted == 0:
        return ["not even batch_size=1 fits: use a smaller model or block_size"]
    sequences = tokens_per_iter // block_size
    steps = tokens_per_iter / (fitted * block_size)
    lines = [f"largest micro-batch that fits: batch_size={fitted}; to keep {tokens_per_iter:,} tokens/iter "
             f"that needs {steps:g} accumulation steps"]
    batch, exact_steps = accumulation_plan(sequences, fitted)
    if batch != fitted:
        lines.append(f"{steps:g} is not a whole number: the largest batch_size <= {fitted} that divides the "
                     f"{sequences} sequences per iteration is {batch}")
    lines.append(f"use: --batch_size={batch} --gradient_accumulation_steps={exact_steps}{levers}")
    return lines


def peak_memory_text(device):
    if device.startswith("cuda"):
        return (f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved")
    if sys.platform == "win32":  # no `resource` module there (imported here, so bench.py starts on Windows)
        import psutil
        rss = psutil.Process().memory_info().peak_wset
    else:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        rss = kib if sys.platform == "darwin" else kib * 1024
    return f"peak RSS {rss / 2**30:.2f} GiB (whole process; CPU stand-in for device memory)"


def optimizer_state_text(optimizers):
    """The optimizers' state as held in memory after a step: AdamW keeps two copies of its parameters
    (exp_avg, exp_avg_sq), Muon one (its momentum buffer)."""
    parts, total = [], 0
    for key, opt in optimizers.items():
        n_params = sum(p.numel() for group in opt.param_groups for p in group["params"])
        n_bytes = sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values()
                      if torch.is_tensor(t) and t.dim() > 0)  # not the step counters
        parts.append(f"{type(opt).__name__} {n_bytes / 2**20:.1f} MiB for {n_params / 1e6:.2f}M parameters")
        total += n_bytes
    return f"optimizer state {total / 2**20:.1f} MiB: " + ", ".join(parts)


def main(argv):
    c = SimpleNamespace(**configure({**train_defaults(), **BENCH_DEFAULTS}, argv))
    malloc_note = keep_freed_memory()  # before the first large allocation
    try:
        device = pick_device(c.device)
        dtype = pick_dtype(c.dtype, device)
        gptconf = GPTConfig.from_dict(vars(c))  # the model's fields of the config, padded vocabulary
        budget = None
        if c.fit_memory:
            if not device.startswith("cuda"):
                raise ValueError(f"fit_memory={c.fit_memory!r} measures GPU memory and needs CUDA (device={device})")
            budget = torch.cuda.mem_get_info(device)[0] if c.fit_memory == "free" else parse_memory(c.fit_memory)
    except ValueError as e:
        fail(str(e))
    torch.manual_seed(c.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
    torch.backends.cudnn.allow_tf32 = True
    device_type = device.split(":")[0]
    ctx = autocast_context(device, dtype)

    model = GPT(gptconf).to(device)
    model.chunked_loss, model.activation_checkpointing = c.chunked_loss, c.activation_checkpointing
    flops_per_token = model.flops_per_token()
    peak, peak_description = device_peak_flops(device, dtype, c.peak_flops)
    try:
        optimizers = model.configure_optimizers(c.weight_decay, c.learning_rate, (c.beta1, c.beta2), device_type,
                                                c.optimizer, c.muon_lr, c.muon_momentum, c.muon_weight_decay)
    except ValueError as e:
        fail(str(e))
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    print(f"model: {model.get_num_params() / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs/token; "
          f"device {device}, dtype {dtype}, compile {c.compile}, optimizer {c.optimizer}, "
          f"chunked_loss {c.chunked_loss}, activation_checkpointing {c.activation_checkpointing}, "
          f"fused AdamW {bool(optimizers['optimizer'].defaults.get('fused'))}; "
          f"{peak_description}")
    if malloc_note:
        print(malloc_note)

    def step(m, x, y):
        """One training step on one micro-batch, as train.py does it (less the accumulation)."""
        with ctx:
            _, loss = m(x, y)
        scaler.scale(loss).backward()
        for opt in optimizers.values():
            scaler.unscale_(opt)
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        for opt in optimizers.values():
            scaler.step(opt)
        scaler.update()
        model.zero_grad(set_to_none=True)
        return loss.item()  # train.py reads the loss every iteration too

    def random_batch(batch_size):
        x = torch.randint(VOCAB_SIZE, (batch_size, c.block_size + 1), device=device)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    if budget is not None:
        fit(c, model, step, random_batch, budget, device)
        return

    if c.real_data:
        data_dir = c.data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", c.dataset)
        try:
            batches = TokenBatches(os.path.join(data_dir, "train.bin"), c.block_size, c.batch_size, c.data_order, c.seed)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))

        def next_batch():
            x, y = batches.next_batch()
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    else:
        fixed = random_batch(c.batch_size)  # made once: generating tokens is not the work measured

        def next_batch():
            return fixed

    run = model
    if c.compile:
        x0, y0 = next_batch()
        run = compile_with_fallback(model, lambda m: step(m, x0, y0))
    for _ in range(c.bench_warmup):
        step(run, *next_batch())
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)  # steady state, not the compilation's
    t0 = time.perf_counter()
    for _ in range(c.bench_iters):
        loss = step(run, *next_batch())
    synchronize(device)
    dt = (time.perf_counter() - t0) / c.bench_iters
    tokens_per_sec = c.batch_size * c.block_size / dt
    mfu = estimate_mfu(flops_per_token, tokens_per_sec, peak)
    print(f"batch_size {c.batch_size} x block_size {c.block_size}, {'real' if c.real_data else 'random'} tokens, "
          f"{c.bench_iters} iterations (loss {loss:.3f})")
    print(f"{dt * 1000:.1f} ms/iter, {tokens_per_sec:,.0f} tokens/s"
          + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "") + f", {peak_memory_text(device)}")

    print(optimizer_state_text(optimizers))

    if c.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(min(c.bench_iters, 5)):
                step(run, *next_batch())
            synchronize(device)
        prof.export_chrome_trace(c.profile_file)
        sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort_by, row_limit=15))
        print(f"profiler trace: {c.profile_file}")


def fit(c, model, step, random_batch, budget, device):
    """Search the largest micro-batch whose steady-state step stays under budget bytes (reserved
    memory, which is what the allocator holds from the GPU), and print the accumulation to use."""
    def measure(batch_size):
        run = model
        if c.compile:  # a fresh compilation for each shape: static kernels, as training will use
            torch._dynamo.reset()
            run = torch.compile(model)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            for _ in range(2):  # the second step has the optimizer state of the first in memory
                step(run, *random_batch(batch_size))
            synchronize(device)
            peak = torch.cuda.max_memory_reserved(device)
        except torch.cuda.OutOfMemoryError:
            peak = None
        except RuntimeError as e:  # compiled kernels can report it as a plain RuntimeError
            if "out of memory" not in str(e).lower():
                raise
            peak = None
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        print(f"  batch_size={batch_size}: " + (f"{peak / 2**30:.2f} GiB" if peak is not None else "out of memory"),
              flush=True)
        return peak

    tokens_per_iter = c.batch_size * c.gradient_accumulation_steps * c.block_size
    # both memory levers: the setting given, then activation checkpointing (if not given) for comparison
    for recompute in dict.fromkeys([c.activation_checkpointing, True]):
        model.activation_checkpointing = recompute
        print(f"searching the largest micro-batch under {budget / 2**30:.2f} GiB ({budget / 1e9:.2f} GB) "
              f"of reserved GPU memory, block_size {c.block_size}, dtype {c.dtype}, compile {c.compile}, "
              f"chunked_loss {c.chunked_loss}, activation_checkpointing {recompute}"
              + (" (each size compiles afresh: slow; --compile=False is quicker and errs on the safe side)"
                 if c.compile else "") + ":")
        fitted, _ = largest_fitting_batch(measure, budget, c.batch_size * c.gradient_accumulation_steps)
        levers = (" --chunked_loss=False" if not c.chunked_loss else "") + \
            (" --activation_checkpointing=True" if recompute else "")
        for line in fit_report(fitted, c.block_size, tokens_per_iter, levers):
            print(line)
    print("activation checkpointing recomputes every block in the backward: about 1/4 more compute per token")


if __name__ == "__main__":
    main(sys.argv[1:])
