"""
Where and how the model runs: the process set-up, device and dtype choice (DDP included), autocast, timing
that can be trusted, torch.compile with a fallback, and the device's peak FLOP/s for MFU (train.py, bench.py...).
"""
import ctypes
import os
import re
import signal
import sys
from contextlib import nullcontext

import torch
import torch.distributed as dist

from configurator import first_line
from kit.guard import SurvivesClosedPipe, is_out_of_memory, out_of_memory_hook, stop_at_once_on_signals

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device):
    """'auto' -> cuda, then mps, then cpu; anything else is checked and returned."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use --device=cpu (or auto)")
    if kind not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device={device!r}: allowed are auto, cpu, cuda, cuda:N, mps")
    if kind == "mps" and not mps:
        raise ValueError(f"device={device!r} but MPS (Apple GPU) is not available here; use --device=cpu (or auto)")
    return device


def cpu_has_bf16():
    """True where the CPU has native bf16 matmuls (AVX512-BF16 or AMX): there bf16 autocast is faster than
    fp32 (bench.py --dtype=bfloat16 / float32 measures by how much); elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(dtype, device):
    """'auto' -> bf16 where the device does it natively, fp16 on older GPUs, else fp32; anything else checked."""
    kind = device.split(":")[0]
    if dtype == "auto":
        if kind == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if kind == "cpu" and cpu_has_bf16():
            return "bfloat16"
        return "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed are auto, {', '.join(DTYPES)}")
    if dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype='bfloat16' is not supported by {torch.cuda.get_device_name()}; "
                         "use --dtype=float16 (mixed precision with a GradScaler)")
    if dtype == "float16" and kind == "cpu":
        raise ValueError("dtype='float16' is not supported on CPU; use bfloat16 or float32")
    return dtype


def autocast_context(device, dtype):
    """Mixed precision for the forward pass: weights stay fp32, matmuls run in dtype."""
    if dtype == "float32" or device.startswith("mps"):
        return nullcontext()
    return torch.amp.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])


# glibc malloc hands every block above its mmap threshold back to the kernel when freed, and trims freed
# memory off the heap's top, so each CPU training step page-faults its memory in again. The mmap threshold
# fixed at its ceiling and trimming only above 1 GiB keep blocks up to 32 MiB (the chunked loss's included)
# for reuse; larger ones (the output layer's gradient) still go back, which keeps the peak down.
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30  # bytes
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h


def keep_freed_memory():
    """Set glibc malloc's mmap and trim thresholds (above). Returns the line to print at start, or '' where it
    does not apply: not Linux, not glibc (musl), or the user chose them (MALLOC_MMAP_THRESHOLD_, ..._TRIM_...)."""
    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return ""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc's alone: musl and others have no such function
    except (OSError, AttributeError):
        return ""
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return ""
    return (f"glibc malloc: freed blocks up to {MMAP_THRESHOLD // 2**20} MiB are reused, freed memory up to "
            f"{TRIM_THRESHOLD // 2**30} GiB kept (mmap and trim thresholds set: fewer page faults every step)")


def synchronize(device):
    """Wait for queued device work, so that wall-clock timings measure the work itself."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elif device.startswith("mps"):
        torch.mps.synchronize()


# Dense peak TFLOP/s per GPU (no 2:4 sparsity): (bf16/fp16 on tensor cores with fp32 accumulate, tf32, fp32), keyed
# by card_name(). GeForce cards accumulate in fp32 at half their headline fp16 rate; PyTorch accumulates in fp32, so
# that is the honest peak. A card its whitepaper or datasheet does not list is derived as the whitepaper does it:
# SMs x boost clock x 512 FLOP per clock per SM (NVIDIA's product page), tf32 and fp32 half of that.
PEAK_TFLOPS = {
    # "NVIDIA Ampere GA102 GPU Architecture" whitepaper v2, Appendix A (3090, 3080, 3070); others derived
    "rtx 3060": (25.5, 12.7, 12.7),  # derived: 28 SMs x 1.777 GHz
    "rtx 3060 ti": (32.4, 16.2, 16.2),  # derived: 38 SMs x 1.665 GHz
    "rtx 3070": (40.6, 20.3, 20.3),
    "rtx 3070 ti": (43.5, 21.7, 21.7),  # derived: 48 SMs x 1.770 GHz
    "rtx 3080": (59.5, 29.8, 29.8),
    "rtx 3080 ti": (68.2, 34.1, 34.1),  # derived: 80 SMs x 1.665 GHz
    "rtx 3090": (71.0, 35.6, 35.6),
    "rtx 3090 ti": (80.0, 40.0, 40.0),  # derived: 84 SMs x 1.860 GHz
    # "NVIDIA Ada GPU Architecture" whitepaper, Appendix A (4090, 4080; 4070 Ti as the "4080 12GB"); others derived
    "rtx 4060": (30.2, 15.1, 15.1),  # derived: 24 SMs x 2.460 GHz
    "rtx 4060 ti": (44.1, 22.1, 22.1),  # derived: 34 SMs x 2.535 GHz
    "rtx 4070": (58.3, 29.1, 29.1),  # derived: 46 SMs x 2.475 GHz
    "rtx 4070 super": (71.0, 35.5, 35.5),  # derived: 56 SMs x 2.475 GHz
    "rtx 4070 ti": (80.2, 40.1, 40.1),
    "rtx 4070 ti super": (88.2, 44.1, 44.1),  # derived: 66 SMs x 2.610 GHz
    "rtx 4080": (97.5, 48.7, 48.7),
    "rtx 4080 super": (104.4, 52.2, 52.2),  # derived: 80 SMs x 2.550 GHz
    "rtx 4090": (165.2, 82.6, 82.6),
    # "NVIDIA RTX Blackwell GPU Architecture" whitepaper, Appendix A (5090); others derived
    "rtx 5060 ti": (47.4, 23.7, 23.7),  # derived: 36 SMs x 2.572 GHz
    "rtx 5070": (61.7, 30.9, 30.9),  # derived: 48 SMs x 2.512 GHz
    "rtx 5070 ti": (87.9, 43.9, 43.9),  # derived: 70 SMs x 2.452 GHz
    "rtx 5080": (112.6, 56.3, 56.3),  # derived: 84 SMs x 2.617 GHz
    "rtx 5090": (209.5, 104.8, 104.8),
    # workstation cards: fp32 accumulate at the full rate. NVIDIA RTX A6000 datasheet (309.7 sparse);
    # NVIDIA RTX 6000 Ada Generation datasheet (728.5 sparse)
    "rtx a6000": (154.8, 77.4, 38.7),
    "rtx 6000 ada generation": (364.2, 182.1, 91.1),
    # data centre datasheets: T4 ("mixed precision FP16/FP32"; no bf16, no tf32), V100 (SXM2, PCIe, V100S),
    # A10, L4, A100 (40/80 GB, SXM4 and PCIe), H100 (SXM5 = HBM3, PCIe, NVL), H200 (SXM, NVL), L40S
    "t4": (65.0, 8.1, 8.1),
    "v100 sxm2": (125.0, 15.7, 15.7),
    "v100 pcie": (112.0, 14.0, 14.0),
    "v100s pcie": (130.0, 16.4, 16.4),
    "a10": (125.0, 62.5, 31.2),
    # AWS's A10G: no vendor figure; 70 as Baseten's "NVIDIA A10 vs A10G" lists it, = 80 SMs x 1.71 GHz x 512
    "a10g": (70.0, 35.0, 35.0),
    "l4": (121.0, 60.0, 30.3),
    "a100 sxm4": (312.0, 156.0, 19.5),
    "a100 pcie": (312.0, 156.0, 19.5),
    "a100 sxm": (312.0, 156.0, 19.5),  # 'NVIDIA A100-SXM-80GB' in some DGX systems
    "h100 hbm3": (989.4, 494.7, 66.9),
    "h100 pcie": (756.0, 378.0, 51.2),
    "h100 nvl": (835.5, 417.5, 60.0),
    "h200": (989.4, 494.7, 66.9),
    "h200 nvl": (835.5, 417.5, 60.0),
    "l40s": (362.1, 183.2, 91.6),
}
PEAK_COLUMN = {"bfloat16": 0, "float16": 0, "tf32": 1, "float32": 2}


def card_name(device_name):
    """'NVIDIA GeForce RTX 3080 Ti' -> 'rtx 3080 ti', 'Tesla V100-SXM2-16GB' -> 'v100 sxm2': the vendor words and
    the memory size go, every other word stays, so a 3080 Ti is not a 3080 and a 'Laptop GPU' is no desktop card."""
    words = device_name.lower().replace("-", " ").split()
    return " ".join(w for w in words if w not in ("nvidia", "geforce", "tesla") and not re.fullmatch(r"\d+gb", w))


def peak_flops(device_name, dtype):
    """Peak FLOP/s of a GPU by its name (torch.cuda.get_device_name) for a dtype (PEAK_COLUMN); None if unknown."""
    peaks = PEAK_TFLOPS.get(card_name(device_name))
    return None if peaks is None else peaks[PEAK_COLUMN[dtype]] * 1e12


def estimate_mfu(flops_per_token, tokens_per_second, peak):
    """Model FLOPs utilisation as a fraction of the peak, or None when the peak is unknown."""
    return None if not peak else flops_per_token * tokens_per_second / peak


def device_peak_flops(device, dtype, override=None):
    """(peak FLOP/s, description) for MFU; peak is None when unknown (CPU, a GPU not in the table)."""
    if override:
        return float(override), f"peak_flops={float(override):.3g} (from config)"
    if not device.startswith("cuda"):
        return None, f"{device}: no peak FLOP/s known, reporting tokens/s only"
    name = torch.cuda.get_device_name(device)
    tensor_dtype = "tf32" if dtype == "float32" and torch.backends.cuda.matmul.allow_tf32 else dtype
    peak = peak_flops(name, tensor_dtype)
    if peak is None:
        return None, (f"{name}: not in kit/runtime.py's PEAK_TFLOPS, reporting tokens/s only; for MFU pass its dense "
                      f"{tensor_dtype} peak, e.g. --peak_flops=120e12 for 120 TFLOP/s")
    return peak, f"{name}: peak {peak / 1e12:.1f} TFLOP/s ({tensor_dtype})"


def compile_with_fallback(model, example_step, announce=True):
    """torch.compile(model), tried on one real step (compilation is lazy: no C++ compiler, no Triton, an old GPU
    show up on first use). On failure, warn once and return the eager model: a long run never dies for the sake
    of speed. Ctrl-C, SIGTERM or SIGHUP while compiling (announced once handled) ends the process at once."""
    previous = stop_at_once_on_signals("during torch.compile's warm-up")
    if announce:
        print("compiling the model... (takes a minute)", flush=True)
    try:
        compiled = torch.compile(model)
        # the trial step must not advance the RNG (dropout), or a resumed run would diverge
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            example_step(compiled)
        return compiled
    except Exception as e:  # any backend failure: fall back rather than abort the run
        if is_out_of_memory(e):  # eager would run out too: the caller's one line says what to lower
            raise
        print(f"warning: torch.compile failed ({type(e).__name__}: {first_line(e)}); "
              "continuing without it (--compile=False silences this)", file=sys.stderr)
        return model
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def setup_process(oom_advice, streams=True, training=False):
    """What a script needs of its process, before the first large allocation: output that survives its reader
    going away (streams: `| head`, a killed tee), an out-of-memory error in one line that names oom_advice, and
    glibc malloc keeping freed memory; training: Ctrl-C / SIGTERM / SIGHUP end the process at once until the
    training loop's Stopper takes over. Returns the malloc line to print ('' where it does not apply)."""
    if streams:
        sys.stdout, sys.stderr = SurvivesClosedPipe(sys.stdout), SurvivesClosedPipe(sys.stderr)
    sys.excepthook = out_of_memory_hook(oom_advice)
    if training:
        stop_at_once_on_signals("while starting")
    return keep_freed_memory()


def setup_device(device, dtype, gradient_accumulation_steps):
    """(device, dtype, ddp, rank, local_rank, world_size), 'auto' resolved. Under torchrun (RANK is set) each
    process drives one GPU, or is one gloo process on a CPU-only machine. ValueError before any rank waits."""
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    if int(os.environ.get("RANK", -1)) == -1:
        return device, dtype, False, 0, 0, 1
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if gradient_accumulation_steps % world_size != 0:
        raise ValueError(f"gradient_accumulation_steps={gradient_accumulation_steps} is not divisible by the "
                         f"{world_size} DDP ranks; use a multiple of {world_size}")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device, dtype, True, rank, local_rank, world_size


