"""
Train a GPT on a prepared token dataset, on one GPU, a CPU, or several GPUs with DDP.

One GPU (or CPU):
$ python train.py config/train_fineweb.py
$ python train.py config/train_fineweb.py --batch_size=8 --gradient_accumulation_steps=64

DDP on 4 GPUs of one node (the same command with gloo on CPU-only machines):
$ torchrun --standalone --nproc_per_node=4 train.py config/train_fineweb.py

Continue a run (exactly where it stopped: same batches, same RNG):
$ python train.py config/train_fineweb.py --init_from=resume

Fine-tune GPT-2 (from the hub, or a folder saved with GPT2LMHeadModel.save_pretrained):
$ python train.py config/train_fineweb.py --init_from=gpt2 --learning_rate=6e-5
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict

# before torch loads MKL and OpenMP: their dynamic threading may use fewer threads under load, which
# changes how sums are split, so a resumed run would not match an uninterrupted one bit for bit
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from kit.atomic import append_line
from kit.checkpoint import (build_checkpoint, changed_settings, check_model_fits, check_out_dir, check_resume_lr,
                        check_same_data, check_same_optimizer, checkpoint_path, gather_rank_states, load_checkpoint,
                        non_finite_part, restore_checkpoint, resume_model_args, rng_state, save_checkpoint,
                        saved_val_loss)
from configurator import config_globals, configure, fail, first_line
from kit.evaluation import estimate_loss, evaluate_hellaswag, generate_samples, load_hellaswag, render_examples
from kit.hf import check_init_from, load_gpt2
from kit.loader import TokenBatches, check_data_order, dataset_changed, file_identity, open_dataset
from model import GPT, GPTConfig, check_optimizer
from kit.progress import Progress
from kit.runtime import (StopSignal, SurvivesClosedPipe, autocast_context, compile_with_fallback, device_peak_flops,
                     estimate_mfu, fail_together, keep_freed_memory, launcher_gone, out_of_memory_hook, pick_device,
                     pick_dtype, setup_ddp, stop_at_once_on_signals, synchronize)
from kit.schedule import cooldown_start, get_lr, schedule_args
from kit.tokenizer import TokenizerUnavailable, get_encoding

# -----------------------------------------------------------------------------
# default config values, for a GPT-2 small (124M) on FineWeb; config/*.py and --key=value override
# I/O
out_dir = "out"
eval_interval = 2000  # evaluate, and save ckpt.pt (and best.pt if better), every this many iterations
log_interval = 1  # print and record metrics every this many iterations
eval_iters = 200  # batches per loss estimate
eval_only = False  # evaluate once and exit
hellaswag_interval = 0  # also score HellaSwag at evaluation steps every this many iterations (and the last); 0 = off
hellaswag_limit = 0  # the first this many HellaSwag examples (0 = all 10,042), split over the DDP ranks
hellaswag_file = ""  # hellaswag_val.jsonl; '' = downloaded once into data/hellaswag/ (see kit/evaluation.py)
sample_tokens = 0  # at each evaluation print (and record) two samples of this many tokens; 0 = off
sample_prompt = ""  # the samples' prompt; '' = start a new document
max_hours = 0.0  # time budget of this launch: save ckpt.pt and exit 0 before an iteration would pass it; 0 = off
init_from = "scratch"  # 'scratch', 'resume' (from out_dir), 'gpt2'...'gpt2-xl' or a Hugging Face GPT-2 folder
overwrite = False  # let a new run (init_from other than 'resume') replace the checkpoints already in out_dir
resume_from = "last"  # with init_from='resume': 'last' (ckpt.pt), 'best', 'stable' or a path
allow_lr_increase = False  # allow a resume whose schedule raises the learning rate (see README)
allow_new_data = False  # allow a resume on other bins than the checkpoint was trained on (e.g. for fine-tuning)
# wandb logging
wandb_log = False
wandb_project = "fineweb"
wandb_run_name = "gpt2"
# data
dataset = "fineweb"  # reads data/<dataset>/train.bin and val.bin
data_dir = ""  # if set, read the bins from here instead
val_file = ""  # val set instead of val.bin: a token file (ours or an llm.c shard) or 'standard' (kit/shards.py)
data_order = "random"  # 'random' windows (nanoGPT), 'shuffle' (every window once per epoch), 'document' (rows start at a document's start)
gradient_accumulation_steps = 40  # micro-steps per iteration, summed over all DDP ranks
batch_size = 12  # micro-batch size per rank
block_size = 1024
# model
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0  # 0 for pretraining, try 0.1+ for finetuning
bias = False  # biases in Linear and LayerNorm layers
rotary = False  # the architecture switches below default to GPT-2; see model.py
qk_norm = False
mlp = "gelu"
norm = "layernorm"
tie_embeddings = True
zero_init_proj = False
logit_softcap = 0.0  # > 0: cap * tanh(logits / cap) bounds every logit (0 = off)
zero_init_head = False  # lm_head starts at zero; needs tie_embeddings=False
# optimizer: AdamW, or Muon for the block matrices and AdamW for the rest (model.configure_optimizers)
optimizer = "adamw"  # 'adamw' or 'muon' (needs torch >= 2.9)
muon_lr = 0.02  # Muon's peak learning rate; it follows the same schedule as learning_rate
muon_momentum = 0.95
muon_weight_decay = None  # Muon's own weight decay; None = weight_decay
# AdamW
learning_rate = 6e-4  # peak learning rate
max_iters = 600000  # total iterations
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # clip gradients at this norm, or 0.0 to disable
# learning rate schedule, see kit/schedule.py
lr_schedule = "cosine"  # 'cosine', 'wsd' or 'constant'
warmup_iters = 2000
lr_decay_iters = 600000  # cosine: decay ends here (usually = max_iters)
min_lr = 6e-5  # ~learning_rate/10 per Chinchilla
cooldown_frac = 0.2  # wsd: the last fraction of max_iters decays linearly to min_lr
# system
device = "auto"  # 'auto', 'cpu', 'cuda', 'cuda:0', 'mps'
dtype = "auto"  # 'auto' (bf16 where native, fp16 on older GPUs, else fp32), 'bfloat16', 'float16', 'float32'
compile = True  # torch.compile the model (falls back to eager with a warning where it cannot)
chunked_loss = True  # the loss over the output layer a chunk of positions at a time; False: the full logits
activation_checkpointing = False  # recompute each block in the backward: far less memory, ~1/4 more compute
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 looks the GPU up in runtime.PEAK_TFLOPS
seed = 1337
# -----------------------------------------------------------------------------
if __name__ == "__settings__":  # bench.py takes the settings above as its own defaults; nothing below runs
    raise SystemExit
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)
sys.stdout, sys.stderr = SurvivesClosedPipe(sys.stdout), SurvivesClosedPipe(sys.stderr)  # `| head`: train on
sys.excepthook = out_of_memory_hook("lower batch_size (a larger gradient_accumulation_steps keeps the tokens per "
                                    "iteration) or the model (n_embd, n_layer, block_size); on a GPU, python "
                                    "bench.py with the same settings and --fit_memory=free finds the batch_size "
                                    "that fits")
malloc_note = keep_freed_memory()  # before the first large allocation
# -----------------------------------------------------------------------------

# DDP: torchrun sets RANK; each process drives one GPU (or one CPU process with gloo)
try:
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    ddp, ddp_rank, ddp_local_rank, world_size, device = setup_ddp(device, gradient_accumulation_steps)
except ValueError as e:
    fail(str(e))
master_process = ddp_rank == 0  # only rank 0 prints, logs and writes checkpoints
device_type = device.split(":")[0]

gradient_accumulation_steps //= world_size  # per rank from here on
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
lr_args = schedule_args(config)
stop_at_once_on_signals("while starting")  # nothing is trained or saved before the loop; StopSignal takes over there
try:  # every choice among names, the shape and out_dir, before any work: each checked where its facts live
    check_init_from(init_from)
    get_lr(0, **lr_args)  # lr_schedule, cooldown_frac
    checkpoint_path(out_dir, resume_from, key="resume_from")
    check_data_order(data_order)
    check_optimizer(optimizer, learning_rate)
    model_args = asdict(GPTConfig.from_dict(config))  # GPTConfig's fields of the config, padded vocabulary
    # eval_only saves nothing and takes no lock: it may run beside the training run; under DDP rank 0 locks
    out_dir_lock = check_out_dir(out_dir, init_from, overwrite or eval_only, lock=master_process and not eval_only)
    hellaswag_examples = None
    if hellaswag_interval:  # read (downloaded the first time) and tokenized once, by every rank
        hellaswag_examples = render_examples(load_hellaswag(hellaswag_file), block_size, hellaswag_limit)
    encoding = get_encoding() if sample_tokens and master_process else None  # the samples' tokenizer
    startup_problem = ""
except (ValueError, TokenizerUnavailable) as e:
    startup_problem = str(e)
fail_together(startup_problem, ddp, device)  # rank 0's lock is rank 0's alone: every rank exits 2 with it

torch.manual_seed(seed + ddp_rank)
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where they can
torch.backends.cudnn.allow_tf32 = True
ctx = autocast_context(device, dtype)

# data: uint16 token files written by data/<dataset>/prepare.py
data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
try:
    dataset_meta, train_path, val_path = open_dataset(data_dir, block_size, val_file)
    train_batches = TokenBatches(train_path, block_size, batch_size, data_order, seed, ddp_rank, world_size)
    dataset_files = {path: file_identity(path) for path in (train_path, val_path)}  # checked every iteration
except (FileNotFoundError, ValueError) as e:
    fail(str(e))
launcher_pid = os.getppid()  # under torchrun: torchrun (see launcher_gone)
iter_num, best_val_loss, ckpt, hf_state, tokens_seen = 0, float("inf"), None, None, 0
if init_from == "resume":
    resume_path = checkpoint_path(out_dir, resume_from)
    try:
        ckpt = load_checkpoint(resume_path, map_location="cpu")
        check_model_fits(ckpt, resume_path)
    except (FileNotFoundError, ValueError) as e:
        fail(f"cannot resume: {e}")
    try:
        model_args = resume_model_args(ckpt, model_args)  # the shape must match; dropout may change
        check_same_optimizer(ckpt, optimizer)
        check_same_data(ckpt, dataset_meta, data_dir, allow_new_data or eval_only)  # a look at other data is fine
    except ValueError as e:
        fail(f"cannot resume {resume_path}: {e}")
    iter_num = ckpt["iter_num"]
    saved_progress = ckpt.get("progress")  # the elapsed time and rates, for the time left
    best_val_loss = float(ckpt.get("best_val_loss", float("inf")))  # nanoGPT stores a 0-dim tensor
    # the true count even when this run's batch shape differs (older checkpoints: assume the same shape)
    tokens_seen = ckpt.get("tokens_seen", iter_num * tokens_per_iter)
    # resuming from stable.pt or another file: best.pt may hold a better model than it knows of
    best_val_loss = min(best_val_loss, saved_val_loss(checkpoint_path(out_dir, "best")) or float("inf"))
    if iter_num >= max_iters and not eval_only:
        fail(f"{resume_path} is at iteration {iter_num} and max_iters={max_iters}: nothing to train; "
             f"pass a larger --max_iters to continue (see docs/training.md)")
    try:
        check_resume_lr(ckpt, config)
    except ValueError as e:
        fail(str(e))
elif init_from != "scratch":  # GPT-2 weights, see kit/hf.py; the model's shape comes from them
    try:
        hf_args, hf_state = load_gpt2(init_from, block_size)
    except ValueError as e:
        fail(str(e))
    changed = [f"--{k}={v}" for k, v in hf_args.items() if k != "vocab_size" and model_args[k] != v]
    if master_process and changed:
        print(f"{init_from} sets the model's shape, overriding the config: {' '.join(changed)} "
              "(pass the same to resume this run)")
    model_args.update(hf_args)
gptconf = GPTConfig(**model_args)
model = GPT(gptconf)
model.chunked_loss, model.activation_checkpointing = chunked_loss, activation_checkpointing  # memory, not shape
if hf_state is not None:
    model.load_state_dict(hf_state)
    hf_state = None
model.to(device)
raw_model = model  # the plain module: for checkpoints, evaluation and FLOPs counting

scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # a no-op unless float16
# {checkpoint key: optimizer}: 'optimizer' (AdamW), and 'muon' with optimizer='muon'
optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                        muon_lr, muon_momentum, muon_weight_decay)
lr = get_lr(iter_num, **lr_args)
if ckpt is not None:
    try:  # weights, optimizer moments (by parameter name), scaler, this rank's RNG and data position
        warning = restore_checkpoint(ckpt, model, optimizers, scaler, train_batches, ddp_rank, world_size)
    except ValueError as e:
        fail(f"cannot resume {resume_path}: {e}")
    if master_process and warning:
        print(f"warning: {warning}")
    changed = changed_settings(ckpt, config)
    if master_process and changed:
        print(f"changed settings, applied from iteration {iter_num} on: {changed}")
    if master_process:
        print(f"resuming from {resume_path} at iteration {iter_num}, lr {lr:.3g}, best val loss {best_val_loss:.4f}")
ckpt = None  # free memory


def train_step(m, x, y):
    """Forward and backward of one micro-batch; returns the (unscaled) loss tensor."""
    with ctx:
        _, loss = m(x, y)
    scaler.scale(loss / gradient_accumulation_steps).backward()
    return loss.detach()


if compile:
    if master_process:
        print("compiling the model... (takes a minute)")
    x0 = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
    model = compile_with_fallback(model, lambda m: train_step(m, x0, x0))
    model.zero_grad(set_to_none=True)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

flops_per_token = raw_model.flops_per_token()
peak, peak_description = device_peak_flops(device, dtype, peak_flops)
if master_process:
    n_params = raw_model.get_num_params()
    train_tokens = train_batches.n_tokens
    print(f"model: {n_params / 1e6:.2f}M parameters (excluding position embeddings), "
          f"{flops_per_token / 1e6:.1f} MFLOPs/token")
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} rank(s) x {gradient_accumulation_steps} "
          f"micro-steps x {batch_size} x {block_size})")
    if not eval_only:
        print(f"planned: {max_iters:,} iterations = {max_iters * tokens_per_iter:,} tokens "
              f"= {max_iters * tokens_per_iter / train_tokens:.2f} epochs of train.bin ({train_tokens:,} tokens)")
    print(f"device {device}, dtype {dtype}, {peak_description}")
    if malloc_note:
        print(malloc_note)


def log_metrics(record):
    """One JSON line per log step or evaluation in out_dir/metrics.jsonl (and wandb if on). A failed append
    (a full disk) leaves the file whole and stops the run at the next iteration, after saving."""
    global stop_problem
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        append_line(path, json.dumps(record) + "\n")
    except OSError as e:
        stop_problem = stop_problem or f"cannot append to {path}: {e.strerror or first_line(e)}"
    if wandb_log:
        wandb.log(wandb_record(record), step=record["iter"])


def wandb_record(record):
    """wandb charts numbers; the samples go as a table, one row per sample."""
    return {k: wandb.Table(columns=["sample"], data=[[text] for text in v]) if k == "samples" else v
            for k, v in record.items() if k != "iter" and v is not None}


def save(val_loss, names):
    """Gather every rank's RNG and data state (collective: all ranks call this), then rank 0 writes,
    unless something non-finite would be saved (a step can ruin the weights while its own loss is finite)."""
    ranks = gather_rank_states({"rng": rng_state(), "data": train_batches.state_dict()}, world_size)
    bad = non_finite_part(raw_model, val_loss) if master_process else ""
    problem = non_finite_message(f"{bad} at iteration {iter_num}") if bad else ""
    if master_process and not problem:
        checkpoint = build_checkpoint(raw_model, optimizers, scaler, ranks, iter_num=iter_num,
                                      best_val_loss=best_val_loss, config=config, lr=lr, val_loss=val_loss,
                                      dataset_meta=dataset_meta, tokens_seen=tokens_seen,
                                      progress=progress.state_dict())
        try:
            # ckpt.pt last: a kill between the renames leaves a best.pt newer than ckpt.pt, whose val loss the
            # resumed run reads above (saved_val_loss), never a stale best.pt it believes holds its best
            save_checkpoint(checkpoint, *[checkpoint_path(out_dir, n) for n in sorted(names, key="last".__eq__)])
            saved_this_run.update(names)
        except OSError as e:  # a full disk: save_checkpoint left the previous files as they were
            problem = str(e)
    fail_together(problem, ddp, device, elsewhere="rank 0 could not save", status=1)  # rank 0 alone knows


def non_finite_message(what):
    """True because nothing non-finite is ever saved: the checkpoint on disk predates the damage."""
    last_ckpt = checkpoint_path(out_dir, "last")
    return (f"non-finite {what}; stopping without saving. Last good checkpoint, untouched: "
            f"{last_ckpt if os.path.exists(last_ckpt) else '(none saved yet)'}")


stop_signal = StopSignal(announce=master_process)  # Ctrl-C / SIGTERM: finish the iteration, save, exit 0

if wandb_log:  # checked on every rank, so that all of them stop together
    try:
        import wandb
    except ImportError:
        fail("wandb_log=True but wandb is not installed: pip install wandb (or --wandb_log=False)")
if wandb_log and master_process:
    wandb.init(project=wandb_project, name=wandb_run_name, config=config, resume="allow")

# training loop
start_iter, run_start, saved_this_run = iter_num, time.time(), set()
progress = Progress(iter_num, max_iters, eval_interval, saved_progress if init_from == "resume" else None)
stop_problem = ""  # set by log_metrics: stop, after saving, at the next iteration
t0, tokens_since_log, losses = time.time(), 0, []
last_eval = None
while True:
    # evaluate and save; skipped at the iteration a resumed run starts from (already done then); eval_only: at once
    if eval_only or (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num != start_iter or init_from != "resume"):
        last_eval = estimate_loss(raw_model, {"train": train_path, "val": val_path}, batch_size, eval_iters, device,
                                  ctx) if master_process else None
        hellaswag = None  # every rank scores its share of the examples
        if hellaswag_examples and (iter_num % hellaswag_interval == 0 or iter_num == max_iters):
            hellaswag = evaluate_hellaswag(raw_model, hellaswag_examples, device, ctx, batch_size, ddp_rank, world_size)
        names = ["last"]
        # their own generator and eval mode: training's RNG and batches are as without them
        samples = (generate_samples(raw_model, encoding, sample_prompt, sample_tokens, device, ctx, seed)
                   if encoding else None)
        if master_process:
            # the untrained model at iteration 0 is not saved, so it cannot be the best checkpoint
            is_best = iter_num > 0 and not eval_only and last_eval["val"] < best_val_loss
            best_val_loss = last_eval["val"] if is_best else best_val_loss
            print(f"step {iter_num}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}"
                  f"{' (best)' if is_best else ''}" + (f", hellaswag acc_norm {hellaswag['hellaswag_acc_norm']:.4f} "
                                                       f"({hellaswag['hellaswag_n']} examples)" if hellaswag else ""))
            for i, text in enumerate(samples or []):
                print(f"sample {i + 1}: {text!r}")
            if not eval_only:  # a look at a checkpoint (or GPT-2) is no part of the run's history: printed only
                log_metrics({"iter": iter_num, "tokens": tokens_seen, "train_loss": last_eval["train"],
                             "val_loss": last_eval["val"],
                             "best_val_loss": best_val_loss if math.isfinite(best_val_loss) else None,
                             **(hellaswag or {}), **({"samples": samples} if samples else {})})
            names += ["best"] if is_best else []
            if lr_schedule == "wsd" and iter_num <= cooldown_start(max_iters, cooldown_frac):
                names.append("stable")
        if iter_num > 0 and not eval_only:
            save(last_eval["val"] if last_eval else None, names if master_process else [])
        t0, tokens_since_log = time.time(), 0  # evaluation time is not training time: restart the window
        progress.evaluation_done()
    if eval_only or iter_num >= max_iters:
        break

    lr = get_lr(iter_num, **lr_args)
    for key, opt in optimizers.items():
        for param_group in opt.param_groups:  # Muon: the same schedule, scaled to its own peak muon_lr
            param_group["lr"] = lr if key == "optimizer" else lr * muon_lr / learning_rate
    for micro_step in range(gradient_accumulation_steps):
        if ddp:
            # sync gradients only on the last micro-step; the official way is the no_sync() context
            # manager, this flag is what it sets and keeps the loop flat
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        x, y = train_batches.next_batch()
        if device_type == "cuda":  # pinned memory lets the copy overlap the GPU's work
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        losses.append(train_step(model, x, y))
    for opt in optimizers.values():
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    for opt in optimizers.values():
        scaler.step(opt)
    scaler.update()
    model.zero_grad(set_to_none=True)
    iter_num += 1
    tokens_since_log += tokens_per_iter
    tokens_seen += tokens_per_iter

    loss_value = torch.stack(losses).mean().item()  # a host sync: the iteration's work is done
    grad_norm_value = grad_norm.item()
    progress.iteration_done()
    out_of_time = progress.next_would_pass(max_hours * 3600, iter_num)
    stop_signal.requested = stop_signal.requested or out_of_time  # stops as Ctrl-C does (all DDP ranks agree below)
    # a NaN/Inf loss, or gradient norm (with fp16, inf gradients are the GradScaler's business: it
    # skips that step and lowers the scale), means the weights are ruined: stop before saving them
    bad = ("loss" if not math.isfinite(loss_value) else
           "gradient norm" if not scaler.is_enabled() and not math.isfinite(grad_norm_value) else "")
    # stop after saving: a full disk for metrics.jsonl, new bins under data_dir, a launcher gone
    problem = (stop_problem or (dataset_changed(dataset_files) if master_process else "")
               or (launcher_gone(launcher_pid) if ddp else ""))
    stop_now = stop_signal.requested  # a signal arriving from here on is seen next iteration, by every rank
    if ddp:  # every rank stops together, else the others wait for it forever
        flags = torch.tensor([float(bool(bad)), float(stop_now), float(bool(problem))], device=device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = bad or ("loss or gradient norm on another rank" if flags[0].item() else "")
        stop_now = bool(flags[1].item())
        if flags[2].item() and not problem:  # a dead launcher re-parents every rank, but not all before one checks
            problem = launcher_gone(launcher_pid) or "another rank stopped the run"
    if bad:
        fail(non_finite_message(f"{bad} at iteration {iter_num} (loss {loss_value}, grad norm {grad_norm_value})"),
             status=1)
    losses = []
    if iter_num % log_interval == 0 and master_process:
        synchronize(device)
        dt = time.time() - t0
        tokens_per_sec = tokens_since_log / dt
        mfu = estimate_mfu(flops_per_token, tokens_per_sec, peak)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
        epoch = train_batches.epochs_done()
        ms_per_iter = dt * 1000 / (tokens_since_log / tokens_per_iter)
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm_value:.3f}, "
              f"{ms_per_iter:.0f} ms/iter, {tokens_per_sec:,.0f} tok/s"
              + (f", MFU {mfu * 100:.1f}%" if mfu is not None else "")
              + (f", mem {mem:.2f} GiB" if mem is not None else "") + f", epoch {epoch:.3f}"
              + progress.log_text(iter_num))
        log_metrics({"iter": iter_num, "tokens": tokens_seen, "epoch": epoch, "loss": loss_value,
                     "lr": lr, "grad_norm": grad_norm_value, "ms_per_iter": ms_per_iter,
                     "tokens_per_sec": tokens_per_sec, "mfu": mfu, "peak_mem_gib": mem,
                     "elapsed_s": progress.elapsed(), "eta_s": progress.eta(iter_num)})
        t0, tokens_since_log = time.time(), 0
    if master_process and progress.plan_due():
        print(f"plan: {progress.plan_text(iter_num)}")

    if stop_now or problem:  # under DDP agreed by all ranks above
        save(None, ["last"])
        if problem:
            fail(f"{problem}; stopped at iteration {iter_num}, checkpoint saved to {checkpoint_path(out_dir, 'last')}; "
                 "fix that, then continue with --init_from=resume", status=1)
        if master_process:
            print((f"max_hours={max_hours:g} would pass in the next iteration: " if out_of_time else "")
                  + f"stopped at iteration {iter_num}; checkpoint saved to {checkpoint_path(out_dir, 'last')}; "
                  "continue with --init_from=resume")
        break
# a failed append at the last evaluation (or an eval_only run's): the run ended, its record is missing
fail_together(stop_problem and f"{stop_problem}; the run ended without that record", ddp, device,
              elsewhere="rank 0 could not write metrics.jsonl", status=1)

if master_process:
    wall = time.time() - run_start
    trained = (iter_num - start_iter) * tokens_per_iter
    print(f"done: {iter_num - start_iter} iterations, {trained:,} tokens in {wall:.0f}s "
          f"({trained / max(wall, 1e-9):,.0f} tok/s overall); best val loss {best_val_loss:.4f}"
          + (f", final val loss {last_eval['val']:.4f}" if last_eval else ""))
    if saved_this_run:  # an eval_only run, or one that ended before its first save, points at no file
        best_path = checkpoint_path(out_dir, "best")
        print(f"checkpoints: {checkpoint_path(out_dir, 'last')} (latest)"
              + (f", {best_path} (best val)" if os.path.exists(best_path) else ""))
    if wandb_log:
        wandb.finish()
if ddp:  # leave together: a rank tearing gloo down while rank 0 still writes once aborted at exit, under load
    dist.barrier()
    del model  # DDP holds the process group: without this, destroy_process_group frees nothing and gloo's threads
    dist.destroy_process_group()  # meet the interpreter's teardown, where a finished rank 0 once aborted (SIGABRT)
