"""
The edges of a training run that let it be left unattended, so that train.py's middle stays the step:
- start_checks(): every setting that names a choice, the model's shape and out_dir (one run per out_dir),
  checked before any work, by every DDP rank together;
- resume_checkpoint(): whether a checkpoint can continue this run (shape, optimizer, data, schedule);
- save_run(): one call that saves, and refuses to save anything non-finite;
- Stopper: at the end of every iteration, whether every rank stops and why (a NaN, Ctrl-C / SIGTERM /
  SIGHUP, max_hours, a full disk for metrics.jsonl, new bins under data_dir, the launcher gone);
- the process set-up kit/runtime.setup_process installs: output that survives a closed pipe, an
  out-of-memory error in one line, and Ctrl-C before the first step ending the process at once.
"""
import glob
import io
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

from configurator import STOP_SIGNALS, fail, first_line, handle_signals, print_error
from kit.atomic import FolderInUse, check_writable, lock_folder
from kit.checkpoint import (CHECKPOINT_NAMES, GPT2_DEFAULTS, build_checkpoint, checkpoint_path, load_checkpoint,
                            model_args_of, rng_state, save_checkpoint, saved_val_loss)
from kit.evaluation import load_hellaswag, render_examples
from kit.hf import check_init_from
from kit.loader import check_data_order, dataset_changed, file_identity
from kit.schedule import check_resume_lr, cooldown_start, lr_multiplier
from kit.tokenizer import TokenizerUnavailable, get_encoding
from model import GPTConfig, check_optimizer

LOCK_NAME = "train.lock"  # in out_dir, held by the run writing there


def start_checks(config, ddp, device, master_process):
    """Every choice among names, the shape and out_dir, before any work, each checked where its facts live.
    Returns (model_args, out_dir lock, HellaSwag examples or None, the samples' tokenizer or None). A problem
    stops every rank with exit 2: rank 0's out_dir lock is rank 0's alone."""
    c = config
    result, problem = None, ""
    try:
        check_init_from(c["init_from"])
        lr_multiplier(0, c)  # lr_schedule, cooldown_frac
        checkpoint_path(c["out_dir"], c["resume_from"], key="resume_from")
        check_data_order(c["data_order"])
        check_optimizer(c["optimizer"])
        model_args = asdict(GPTConfig.from_dict(c))  # GPTConfig's fields of the config, padded vocabulary
        # eval_only saves nothing and takes no lock: it may run beside the training run; under DDP rank 0 locks
        lock = check_out_dir(c["out_dir"], c["init_from"], c["overwrite"] or c["eval_only"],
                             lock=master_process and not c["eval_only"])
        examples = None
        if c["hellaswag_interval"]:  # read (downloaded the first time) and tokenized once, by every rank
            examples = render_examples(load_hellaswag(c["hellaswag_file"]), c["block_size"], c["hellaswag_limit"])
        encoding = get_encoding() if c["sample_tokens"] and master_process else None
        if c["wandb_log"]:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ValueError("wandb_log=True but wandb is not installed: pip install wandb (or --wandb_log=False)")
        result = model_args, lock, examples, encoding
    except (ValueError, TokenizerUnavailable) as e:
        problem = str(e)
    fail_together(problem, ddp, device)
    return result


def check_out_dir(out_dir, init_from, overwrite, lock=False):
    """out_dir can be written; with lock, this process becomes its one writer (two runs would rename each
    other's half-written files and mix their checkpoints), removes the temporary files a killed run left, and
    holds the returned lock until it ends; a new run does not replace checkpoints there unless overwrite."""
    try:
        check_writable(out_dir)
        out_dir_lock = lock_folder(out_dir, LOCK_NAME) if lock else None
    except OSError as e:
        raise ValueError(f"out_dir={out_dir!r} is not writable: {e.strerror}") from None
    except FolderInUse as e:
        raise ValueError(f"out_dir={out_dir!r} is in use by another training run ({e.holder}); wait for it to "
                         "end, stop it, or use another out_dir") from None
    for name in CHECKPOINT_NAMES.values() if lock else ():
        for leftover in glob.glob(os.path.join(glob.escape(out_dir), f"{name}.tmp*")):
            os.remove(leftover)
    existing = [p for p in (checkpoint_path(out_dir, name) for name in CHECKPOINT_NAMES) if os.path.exists(p)]
    if init_from != "resume" and existing and not overwrite:
        raise ValueError(f"out_dir holds {', '.join(existing)}: this run (init_from={init_from}) would replace them "
                         "or mix its own checkpoints with them; continue that run with --init_from=resume (and "
                         "--resume_from=best or stable if it has no ckpt.pt), replace them with --overwrite=True, "
                         "or use another out_dir")
    return out_dir_lock


def resume_checkpoint(out_dir, config, model_args, dataset_meta):
    """(checkpoint, path, model_args) to resume with config; model_args: the checkpoint's vocab_size, every other
    field as configured, which must be the checkpoint's (dropout aside). best_val_loss is the lower of its own
    and best.pt's. ValueError, one line, when it cannot be read or does not fit this run."""
    path = checkpoint_path(out_dir, config["resume_from"])
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"cannot resume: {e}") from None
    saved, saved_config = model_args_of(ckpt), ckpt.get("config") or {}
    model_args = dict(model_args, vocab_size=saved.get("vocab_size", GPT2_DEFAULTS["vocab_size"]))
    changed = [f"{k} (checkpoint {saved.get(k)!r}, config {v!r})" for k, v in model_args.items()
               if k != "dropout" and saved.get(k, GPT2_DEFAULTS[k]) != v]
    problem = f"the model shape changed: {'; '.join(changed)}" if changed else ""
    if not problem and saved_config.get("optimizer", "adamw") != config["optimizer"]:  # AdamW is nanoGPT's
        problem = (f"it was trained with optimizer={saved_config.get('optimizer', 'adamw')!r}, the config says "
                   f"optimizer={config['optimizer']!r}; keep the checkpoint's optimizer")
    if not problem and not (config["allow_new_data"] or config["eval_only"]):  # a look at other data is fine
        problem = other_data(ckpt, dataset_meta, config["data_dir"] or f"dataset={config['dataset']!r}")
    if problem:
        raise ValueError(f"cannot resume {path}: {problem}")
    if ckpt["iter_num"] >= config["max_iters"] and not config["eval_only"]:
        planned = saved_config.get("max_iters", 0)
        advice = (f"its run was planned for {planned}: add --max_iters={planned}" if planned > ckpt["iter_num"]
                  else "pass a larger --max_iters to extend it (see docs/training.md)")
        raise ValueError(f"{path} is at iteration {ckpt['iter_num']} and max_iters={config['max_iters']}: nothing "
                         f"to train; {advice}")
    check_resume_lr(ckpt.get("config"), ckpt["iter_num"], config)
    # resuming from stable.pt or another file: best.pt may hold a better model than the checkpoint knows of
    best = [float(ckpt.get("best_val_loss", math.inf)), saved_val_loss(checkpoint_path(out_dir, "best"))]
    ckpt["best_val_loss"] = min(v for v in best if v is not None)  # float(): nanoGPT stores a 0-dim tensor
    return ckpt, path, model_args


def other_data(ckpt, dataset_meta, where):
    """'' unless the bins now opened differ from those the checkpoint was trained on (their tokens and
    documents per split): a mistyped --data_dir would otherwise go on silently on other data."""
    saved = (ckpt.get("dataset_meta") or {}).get("splits")
    if not saved:  # nanoGPT's checkpoints record no dataset
        return ""

    def describe(splits):
        sizes = {s: (splits[s].get("tokens"), splits[s].get("documents")) for s in ("train", "val")}
        return sizes, ", ".join(f"{s}.bin {t if t is None else f'{t:,}'} tokens" + ("" if d is None else
                                                                                    f" in {d:,} documents")
                                for s, (t, d) in sizes.items())

    (before, text_before), (now, text_now) = describe(saved), describe(dataset_meta["splits"])
    if before == now:
        return ""
    trained = (ckpt.get("config") or {}).get("data_dir") or f"dataset={(ckpt.get('config') or {}).get('dataset')!r}"
    return (f"it was trained on other data ({trained}: {text_before}) than {where} holds ({text_now}); resume "
            "with the run's own data, or pass --allow_new_data=True to continue on this one")


def save_run(out_dir, names, model, optimizers, scaler, batches, world_size, **run_values):
    """Save a training run: a collective under DDP (every rank's RNG and data position are gathered); rank 0,
    the one whose names are not empty, writes them ('last', 'best'; at an evaluation of a wsd run before its
    cooldown also 'stable'). Returns the problem that stopped it ('' when saved): nothing non-finite is saved
    (a step can ruin the weights while its own loss is finite), a failed write leaves the old files."""
    ranks = gather({"rng": rng_state(), "data": batches.state_dict()}, world_size)
    if not names:
        return ""
    config, last = run_values["config"], checkpoint_path(out_dir, "last")
    if run_values["val_loss"] is not None and config["lr_schedule"] == "wsd" and \
            run_values["iter_num"] <= cooldown_start(config["max_iters"], config["cooldown_frac"]):
        names = [*names, "stable"]
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all().item():
        return non_finite_message(f"weights at iteration {run_values['iter_num']}", last)
    if not math.isfinite(run_values["val_loss"] if run_values["val_loss"] is not None else 0.0):
        return non_finite_message(f"val loss at iteration {run_values['iter_num']}", last)
    try:
        save_checkpoint(build_checkpoint(model, optimizers, scaler, ranks, **run_values),
                        *[checkpoint_path(out_dir, n) for n in sorted(set(names), key="last".__eq__)])
    except OSError as e:  # a full disk
        return str(e)
    return ""


def gather(state, world_size):
    """Every rank's state, in rank order, on every rank (a collective under DDP). Sent as torch.save bytes:
    all_gather_object's own pickling of tensors does not unpickle."""
    if world_size == 1:
        return [state]
    buffer, gathered = io.BytesIO(), [None] * world_size
    torch.save(state, buffer)
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]


def non_finite_message(what, last_checkpoint):
    """Nothing non-finite is ever saved, so the checkpoint on disk predates the damage."""
    return (f"non-finite {what}; stopping without saving. Last good checkpoint, untouched: "
            f"{last_checkpoint if os.path.exists(last_checkpoint) else '(none saved yet)'}")


def stop_at_once_on_signals(stage):
    """Ctrl-C, SIGTERM or SIGHUP end the process at once, in one line, exit 128 + signal: for a stretch where
    nothing is trained or saved yet (the start, torch.compile's warm-up), until StopSignal takes over. The
    previous handlers, to restore. No exception: raised in a handler, one may surface inside torch's C++
    calling back into Python (dynamo's tracing does), which aborts the process."""

    def stop(signum, frame):
        name = signal.Signals(signum)
        print_error(f"{name.name} {stage}: stopped before any training step, nothing saved")
        os._exit(128 + name.value)

    return handle_signals(STOP_SIGNALS, stop)


def fail_together(problem, ddp, device, elsewhere="rank 0 could not go on (see its message)", status=2):
    """fail(problem) on every rank if any rank has one: a problem only one rank sees (rank 0's out_dir lock,
    its save) must stop them all, or the others wait for it in their next collective forever. Every rank
    calls this; without DDP it is fail(problem) when there is one."""
    if ddp:
        # torchrun SIGTERMs the other ranks as soon as one exits: a SIGTERM from here on ends this rank with the
        # same status when there is a problem, and goes to the usual handler (a save) when there is none
        decided, received = [False], []
        previous = signal.signal(signal.SIGTERM, lambda *_: os._exit(status) if decided[0] else received.append(1))
        flag = torch.tensor(float(bool(problem)), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        problem = problem or (elsewhere if flag.item() else "")
        decided[0] = bool(problem)
        if problem and received:
            os._exit(status)
        if problem:  # ignored in the C library too: a Python handler no longer runs once the interpreter exits
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, previous)
            if received:
                os.kill(os.getpid(), signal.SIGTERM)
    if problem:
        fail(problem, status=status)


def resume_command():
    """The command line that continues this run: the same script and settings, with --init_from=resume."""
    dropped = ("--init_from=", "--overwrite=", "--resume_from=")
    args = [arg for arg in sys.argv[1:] if not arg.startswith(dropped)] + ["--init_from=resume"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"torchrun --standalone --nproc_per_node={world_size}" if world_size > 1 else "python"
    return f"{launcher} {shlex.join([sys.argv[0], *args])}"


def launcher_gone(launcher_pid):
    """A message when the process that started this one (torchrun) is gone, else '': a SIGKILLed launcher
    cannot stop its ranks, and they are re-parented (to init or a subreaper), which changes os.getppid()."""
    if os.getppid() == launcher_pid:
        return ""
    return f"the launcher (torchrun, pid {launcher_pid}) is gone"


def is_out_of_memory(error):
    """CUDA's torch.OutOfMemoryError, the CPU allocator's and MPS's RuntimeError, numpy's MemoryError."""
    text = str(error)
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text))


def out_of_memory_hook(advice):
    """A sys.excepthook that ends an out-of-memory error in one line, 'error: out of memory (...): advice'
    (advice names the settings to lower), exit status 1; any other error keeps its traceback. A hook, not a
    try block, so that a flat script (train.py) needs one line for it. Only a failed allocation is caught:
    where the kernel's OOM killer ends the process first, nothing can be printed."""
    def hook(kind, error, traceback):
        if not is_out_of_memory(error):
            return sys.__excepthook__(kind, error, traceback)
        what = first_line(error).split("DefaultCPUAllocator: ")[-1]  # past c10's "[enforce fail at ...]"
        print(f"error: out of memory ({what}): {advice}", file=sys.stderr)  # every rank: it may be the only one
    return hook


def to_devnull(stream):
    """Send what is left of stream's output to /dev/null: its reader went away (`| head`, a killed tee), and
    Python's own flush at exit must not fail on it again (a second BrokenPipeError, printed)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class SurvivesClosedPipe:
    """sys.stdout or sys.stderr for a script that must go on when the reader of its output goes away
    (`python train.py ... | head`, a tee that was killed): from the first broken pipe on, that output goes to
    /dev/null, instead of a BrokenPipeError at the next print that would end a run of hours unsaved."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            to_devnull(self.stream)
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            to_devnull(self.stream)

    def __getattr__(self, name):  # isatty, fileno, encoding...: the stream's own
        return getattr(self.stream, name)


class StopSignal:
    """Ctrl-C, SIGTERM or SIGHUP sets .requested: the training loop finishes its iteration, saves and exits 0.
    A second signal means now (KeyboardInterrupt), unless it comes within a second of the first: a
    scheduler that signals every process while torchrun forwards the signal too delivers two at once."""

    def __init__(self, announce=True):
        self.requested, self.requested_at, self.announce = False, 0.0, announce
        handle_signals(STOP_SIGNALS, self.handle)

    def handle(self, signum, frame):
        if self.requested:
            if time.time() - self.requested_at > 1.0:
                raise KeyboardInterrupt
            return
        self.requested, self.requested_at = True, time.time()
        if self.announce:
            try:  # after SIGHUP the terminal may be gone: the save matters, not this line
                print(f"\n{signal.Signals(signum).name} received: finishing this iteration, then saving", flush=True)
            except OSError:
                pass


class Stopper:
    """Whether every rank stops at the end of an iteration, and why. A NaN/Inf loss or gradient norm means the
    weights are ruined: every rank exits 1 at once, nothing saved. A signal, max_hours, or a problem (a full
    disk for metrics.jsonl, new bins under data_dir, the launcher gone) means save and stop. metrics: kit/progress.py's
    Metrics, whose failed append is such a problem. Under DDP every rank decides together, else the others wait
    for it forever."""

    def __init__(self, config, ddp, device, master_process, watched_files, metrics, check_grad_norm=True):
        self.ddp, self.device, self.master_process = ddp, device, master_process
        self.max_seconds, self.out_dir, self.max_iters = config["max_hours"] * 3600, config["out_dir"], config["max_iters"]
        self.check_grad_norm = check_grad_norm  # fp16: inf gradients are the GradScaler's (it skips the step)
        self.signal = StopSignal(announce=master_process)
        self.files = {path: file_identity(path) for path in watched_files} if master_process else {}
        self.launcher_pid = os.getppid()  # under torchrun: torchrun; a SIGKILLed one re-parents its ranks
        self.metrics, self.problem, self.out_of_time = metrics, "", False

    def check(self, iter_num, loss, grad_norm, progress):
        """True when every rank should save and stop now; collective under DDP."""
        self.out_of_time = progress.next_would_pass(self.max_seconds, iter_num)
        bad = ("loss" if not math.isfinite(loss) else
               "gradient norm" if self.check_grad_norm and not math.isfinite(grad_norm) else "")
        problem = (self.metrics.problem or (dataset_changed(self.files) if self.master_process else "")
                   or (launcher_gone(self.launcher_pid) if self.ddp else ""))
        # a signal from here on is seen next iteration, by all; after the last one the run ends with its final
        # evaluation anyway, so a stop there would only skip it and leave a resume with nothing to train
        stop = (self.signal.requested or self.out_of_time) and iter_num < self.max_iters
        if self.ddp:
            flags = torch.tensor([float(bool(bad)), float(stop), float(bool(problem))], device=self.device)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = bad or ("loss or gradient norm on another rank" if flags[0].item() else "")
            stop = bool(flags[1].item())
            if flags[2].item() and not problem:  # a dead launcher re-parents every rank, but not all before one checks
                problem = launcher_gone(self.launcher_pid) or "another rank stopped the run"
        if bad:
            fail(non_finite_message(f"{bad} at iteration {iter_num} (loss {loss}, grad norm {grad_norm})",
                                    checkpoint_path(self.out_dir, "last")), status=1)
        self.problem = problem
        return stop or bool(problem)

    def stopped(self, iter_num):
        """After the save: exit 1 for a problem, else say why the run stopped (it then exits 0)."""
        last = checkpoint_path(self.out_dir, "last")
        if self.problem:
            fail(f"{self.problem}; stopped at iteration {iter_num}, checkpoint saved to {last}; fix that, then "
                 f"continue with: {resume_command()}", status=1)
        if self.master_process:
            print((f"max_hours={self.max_seconds / 3600:g} would pass in the next iteration: " if self.out_of_time
                   else "") + f"stopped at iteration {iter_num}; checkpoint saved to {last}; continue with: "
                  + resume_command())
