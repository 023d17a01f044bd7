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
import os
import sys
import time

# before torch loads MKL and OpenMP: their dynamic threading may use fewer threads under load, which
# changes how sums are split, so a resumed run would not match an uninterrupted one bit for bit
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import config_globals, configure, fail
from kit.checkpoint import checkpoint_path, restore_checkpoint
from kit.evaluation import estimate_loss, evaluate_hellaswag, generate_samples
from kit.guard import Stopper, fail_together, resume_checkpoint, save_run, start_checks
from kit.hf import load_gpt2
from kit.loader import TokenBatches, open_dataset
from kit.progress import Metrics, Progress
from kit.runtime import (autocast_context, compile_with_fallback, device_peak_flops, estimate_mfu, setup_device,
                         setup_process, synchronize)
from kit.schedule import lr_multiplier
from model import GPT, GPTConfig

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
peak_flops = 0.0  # device peak FLOP/s for MFU; 0 looks the GPU up in kit/runtime.py's PEAK_TFLOPS
seed = 1337
# -----------------------------------------------------------------------------
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)
malloc_note = setup_process("lower batch_size (a larger gradient_accumulation_steps keeps the tokens per iteration) "
                            "or the model (n_embd, n_layer, block_size); on a GPU, python bench.py with the same "
                            "settings and --fit_memory=free finds the batch_size that fits", training=True)
# -----------------------------------------------------------------------------

# DDP: torchrun sets RANK; each process drives one GPU (or one CPU process with gloo)
try:
    device, dtype, ddp, ddp_rank, ddp_local_rank, world_size = setup_device(device, dtype, gradient_accumulation_steps)
except ValueError as e:
    fail(str(e))
master_process = ddp_rank == 0  # only rank 0 prints, logs and writes checkpoints
device_type = device.split(":")[0]
gradient_accumulation_steps //= world_size  # per rank from here on
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
model_args, out_dir_lock, hellaswag_examples, encoding = start_checks(config, ddp, device, master_process)

torch.manual_seed(seed + ddp_rank)
torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores where they can
torch.backends.cudnn.allow_tf32 = True
ctx = autocast_context(device, dtype)

# data: uint16 token files written by data/<dataset>/prepare.py
data_dir = data_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", dataset)
try:
    dataset_meta, train_path, val_path = open_dataset(data_dir, block_size, val_file)
    train_batches = TokenBatches(train_path, block_size, batch_size, data_order, seed, ddp_rank, world_size)
except (FileNotFoundError, ValueError) as e:
    fail(str(e))

# model: from scratch, from a checkpoint of this run, or from GPT-2's weights
iter_num, best_val_loss, ckpt, hf_state, tokens_seen = 0, float("inf"), None, None, 0
if init_from == "resume":
    try:  # the shape, optimizer, data and schedule must fit this run's; dropout may change
        ckpt, resume_path, model_args = resume_checkpoint(out_dir, config, model_args, dataset_meta)
    except ValueError as e:
        fail(str(e))
    iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    tokens_seen = ckpt.get("tokens_seen", iter_num * tokens_per_iter)  # nanoGPT's: as if of this batch shape
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
model = GPT(GPTConfig(**model_args))
model.chunked_loss, model.activation_checkpointing = chunked_loss, activation_checkpointing  # memory, not shape
if hf_state is not None:
    model.load_state_dict(hf_state)
model.to(device)
raw_model = model  # the plain module: for checkpoints, evaluation and FLOPs counting

# optimizer: {checkpoint key: optimizer}, 'optimizer' (AdamW), and 'muon' with optimizer='muon'
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))  # a no-op unless float16
optimizers = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type, optimizer,
                                        muon_lr, muon_momentum, muon_weight_decay)
lr = learning_rate * lr_multiplier(iter_num, config)
if ckpt is not None:
    try:  # weights, optimizer moments (by parameter name), scaler, this rank's RNG and data position
        notes = restore_checkpoint(ckpt, config, model, optimizers, scaler, train_batches, ddp_rank, world_size)
    except ValueError as e:
        fail(f"cannot resume {resume_path}: {e}")
    if master_process:
        print("\n".join(notes + [f"resuming from {resume_path} at iteration {iter_num}, lr {lr:.3g}, "
                                 f"best val loss {best_val_loss:.4f}"]))
saved_progress = ckpt.get("progress") if ckpt else None  # elapsed time and rates, for the time left
ckpt = hf_state = None  # free memory


def train_step(m, x, y):
    """Forward and backward of one micro-batch; returns the (unscaled) loss tensor."""
    with ctx:
        _, loss = m(x, y)
    scaler.scale(loss / gradient_accumulation_steps).backward()
    return loss.detach()


if compile:
    x0 = torch.zeros(batch_size, block_size, dtype=torch.long, device=device)
    model = compile_with_fallback(model, lambda m: train_step(m, x0, x0), announce=master_process)
    model.zero_grad(set_to_none=True)
if ddp:
    model = DDP(model, device_ids=[ddp_local_rank] if device_type == "cuda" else None)

flops_per_token = raw_model.flops_per_token()
peak, peak_description = device_peak_flops(device, dtype, peak_flops)
if master_process:
    train_tokens = train_batches.n_tokens
    print(f"model: {raw_model.get_num_params() / 1e6:.2f}M parameters (excluding position embeddings), "
          f"{flops_per_token / 1e6:.1f} MFLOPs/token")
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} rank(s) x {gradient_accumulation_steps} "
          f"micro-steps x {batch_size} x {block_size})")
    if not eval_only:
        print(f"planned: {max_iters:,} iterations = {max_iters * tokens_per_iter:,} tokens "
              f"= {max_iters * tokens_per_iter / train_tokens:.2f} epochs of train.bin ({train_tokens:,} tokens)")
    print(f"device {device}, dtype {dtype}, {peak_description}")
    if malloc_note and device_type == "cpu":  # a CPU step's time depends on it; a GPU's does not
        print(malloc_note)


def save(val_loss, names):
    """Every rank calls this (it gathers their RNG and data positions); rank 0 writes names. Whatever stops
    rank 0's save (a full disk, non-finite weights) stops every rank, with exit status 1."""
    problem = save_run(out_dir, names if master_process else [], raw_model, optimizers, scaler, train_batches,
                       world_size, iter_num=iter_num, best_val_loss=best_val_loss, config=config, lr=lr,
                       val_loss=val_loss, dataset_meta=dataset_meta, tokens_seen=tokens_seen,
                       progress=progress.state_dict())
    fail_together(problem, ddp, device, elsewhere="rank 0 could not save", status=1)
    saved_this_run.update(names)


# training loop
metrics = Metrics(out_dir, config if wandb_log and master_process else None)
stopper = Stopper(config, ddp, device, master_process, [train_path, val_path], metrics, dtype != "float16")
progress = Progress(iter_num, max_iters, eval_interval, saved_progress)
start_iter, run_start, saved_this_run, last_eval = iter_num, time.time(), set(), None
t0, tokens_since_log, losses = time.time(), 0, []
while True:
    # evaluate and save; skipped at the iteration a resumed run starts from (already done then); eval_only: at once
    if eval_only or (iter_num % eval_interval == 0 or iter_num == max_iters) and (iter_num != start_iter or init_from != "resume"):
        last_eval = estimate_loss(raw_model, {"train": train_path, "val": val_path}, batch_size, eval_iters, device,
                                  ctx) if master_process else None
        hellaswag = None  # every rank scores its share of the examples
        if hellaswag_examples and (iter_num % hellaswag_interval == 0 or iter_num == max_iters):
            hellaswag = evaluate_hellaswag(raw_model, hellaswag_examples, device, ctx, batch_size, ddp_rank, world_size)
        # their own generator and eval mode: training's RNG and batches are as without them
        samples = (generate_samples(raw_model, encoding, sample_prompt, sample_tokens, device, ctx, seed)
                   if encoding else None)
        names = []
        if master_process:
            # the untrained model at iteration 0 is not saved, so it cannot be the best checkpoint
            is_best = iter_num > 0 and not eval_only and last_eval["val"] < best_val_loss
            best_val_loss = last_eval["val"] if is_best else best_val_loss
            names = ["last", "best"] if is_best else ["last"]
            print(f"step {iter_num}: train loss {last_eval['train']:.4f}, val loss {last_eval['val']:.4f}"
                  + (" (best)" if is_best else "") + (f", hellaswag acc_norm {hellaswag['hellaswag_acc_norm']:.4f} "
                                                     f"({hellaswag['hellaswag_n']} examples)" if hellaswag else ""))
            for i, text in enumerate(samples or []):
                print(f"sample {i + 1}: {text!r}")
            if not eval_only:  # a look at a checkpoint (or GPT-2) is no part of the run's history: printed only
                metrics.log({"iter": iter_num, "tokens": tokens_seen, "train_loss": last_eval["train"],
                             "val_loss": last_eval["val"],
                             "best_val_loss": best_val_loss if best_val_loss < float("inf") else None,
                             **(hellaswag or {}), **({"samples": samples} if samples else {})})
        if iter_num > 0 and not eval_only:
            save(last_eval["val"] if last_eval else None, names)
        t0, tokens_since_log = time.time(), 0  # evaluation time is not training time: restart the window
        progress.evaluation_done()
    if eval_only or iter_num >= max_iters:
        break

    # each param group runs at its own peak (initial_lr: learning_rate for AdamW, muon_lr for Muon) x the schedule
    multiplier = lr_multiplier(iter_num, config)
    for opt in optimizers.values():
        for param_group in opt.param_groups:
            param_group["lr"] = param_group["initial_lr"] * multiplier
    lr = learning_rate * multiplier
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

    loss_value, losses = torch.stack(losses).mean().item(), []  # a host sync: the iteration's work is done
    grad_norm_value = grad_norm.item()
    progress.iteration_done()
    stop = stopper.check(iter_num, loss_value, grad_norm_value, progress)  # every rank agrees; a NaN exits here
    if iter_num % log_interval == 0 and master_process:
        synchronize(device)
        dt = time.time() - t0
        tokens_per_sec = tokens_since_log / dt
        mfu = estimate_mfu(flops_per_token, tokens_per_sec, peak)
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == "cuda" else None
        epoch = train_batches.epochs_done()
        ms_per_iter = dt * 1000 / (tokens_since_log / tokens_per_iter)
        print(f"iter {iter_num}: loss {loss_value:.4f}, lr {lr:.2e}, grad norm {grad_norm_value:.3f}, "
              f"{ms_per_iter:.0f} ms/iter, {tokens_per_sec:,.0f} tok/s" + (f", MFU {mfu * 100:.1f}%" if mfu else "")
              + (f", mem {mem:.2f} GiB" if mem is not None else "") + f", epoch {epoch:.3f}"
              + progress.log_text(iter_num))
        metrics.log({"iter": iter_num, "tokens": tokens_seen, "epoch": epoch, "loss": loss_value, "lr": lr,
                     "grad_norm": grad_norm_value, "ms_per_iter": ms_per_iter, "tokens_per_sec": tokens_per_sec,
                     "mfu": mfu, "peak_mem_gib": mem, "elapsed_s": progress.elapsed(), "eta_s": progress.eta(iter_num)})
        t0, tokens_since_log = time.time(), 0
    if master_process and progress.plan_due() and iter_num < max_iters:
        print(f"plan: {progress.plan_text(iter_num)}")
    if stop:  # a signal, max_hours or a problem: save, then exit 0 (1 for a problem)
        save(None, ["last"])
        stopper.stopped(iter_num)
        break
# a failed append at the last evaluation (or an eval_only run's): the run ended, its record is missing
fail_together(metrics.problem and f"{metrics.problem}; the run ended without that record", ddp, device,
              elsewhere="rank 0 could not write metrics.jsonl", status=1)

if master_process:
    wall, trained = time.time() - run_start, (iter_num - start_iter) * tokens_per_iter
    print(f"done: {iter_num - start_iter} iterations, {trained:,} tokens in {wall:.0f}s "
          f"({trained / max(wall, 1e-9):,.0f} tok/s overall); best val loss {best_val_loss:.4f}"
          + (f", final val loss {last_eval['val']:.4f}" if last_eval else ""))
    if saved_this_run:  # an eval_only run, or one that ended before its first save, points at no file
        best_path = checkpoint_path(out_dir, "best")
        print(f"checkpoints: {checkpoint_path(out_dir, 'last')} (latest)"
              + (f", {best_path} (best val)" if os.path.exists(best_path) else ""))
    if iter_num >= max_iters and not eval_only:  # the next question: is a longer run worth its hours?
        print(f"what training on would buy: python forecast.py --out_dir={out_dir} --max_iters={2 * max_iters}"
              + (" --resume_from=stable" if lr_schedule == "wsd" else "") + " (docs/forecast.md)")
    metrics.close()
if ddp:  # leave together: a rank tearing gloo down while rank 0 still writes can abort at exit
    dist.barrier()
    del model  # DDP holds the process group: without this destroy_process_group frees nothing
    dist.destroy_process_group()
    # a thread of the distributed runtime can still meet C++'s static destructors and abort the finished rank
    # (SIGABRT under load): everything is saved and closed, so the rank leaves without that teardown
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
