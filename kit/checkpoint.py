"""
The checkpoint format, in one place: build_checkpoint() makes the dict, restore_checkpoint() puts it
back into a model, its optimizers, the GradScaler, this rank's RNG and data loader. A checkpoint is a
dict saved with torch.save, readable with torch.load(weights_only=True) (plain containers and tensors
only, so loading one from a stranger cannot run code), in nanoGPT's layout so that nanoGPT's sample.py
and train.py read ours and we resume theirs:

    model_args      exactly nanoGPT's GPTConfig arguments: n_layer, n_head, n_embd, block_size, bias,
                    vocab_size, dropout (nanoGPT calls GPTConfig(**model_args))
    model           the uncompiled, unwrapped state dict (no '_orig_mod.' / 'module.' prefixes)
    optimizer       AdamW state dict, parameters in nanoGPT's order (decayed matrices, then the rest,
                    each in registration order); each group also lists its 'param_names' (torch's own
                    key), so that the moments are matched by name when read back
    muon            torch.optim.Muon state dict, only when config["optimizer"] == "muon" (the block
                    matrices' momentum; AdamW's above then covers the other parameters)
    iter_num        iterations completed; training resumes at this iteration
    best_val_loss   lowest validation loss seen so far in this run (best.pt holds that model)
    config          the full training config
  ours only (nanoGPT ignores them):
    model_switches  the architecture switches of model.py that differ from GPT-2 ({} for GPT-2); our
                    checkpoints before this key kept them in model_args, which is still read
    scaler          GradScaler state (fp16 only, else None)
    ranks           one entry per DDP rank (a single one without DDP), each {"rng": rng_state(),
                    "data": loader.TokenBatches.state_dict()}: RNG states (python, numpy, torch CPU,
                    CUDA) and the data loader's position
    lr              the learning rate of the last iteration (informative; check_resume_lr compares the
                    checkpoint's config schedule with the new one to catch jumps on resume)
    dataset_meta    the dataset's meta.json (None for a dataset without one)
    val_loss        this checkpoint's own validation loss (None when saved between evaluations)
    tokens_seen     training tokens so far, over every batch shape the run had (metrics.jsonl's tokens)
    checksum        CRC32 of every tensor's bytes, written by save_checkpoint and checked by
                    load_checkpoint (torch.load does not check the zip's own CRCs); files without
                    it (older ones, nanoGPT's) load unchecked
  and one more optimizer state per extra optimizer, under its own key (e.g. "muon").

Files in out_dir: ckpt.pt (always the latest), best.pt (lowest val loss), and for the wsd schedule
stable.pt (the last checkpoint before the cooldown, from which a run can be extended).
Writes go to a temporary file (<name>.tmp.<pid>) that replaces the old one only when complete; a crash
mid-write leaves at most that file, which the next run into out_dir removes once it holds the out_dir
lock (train.lock, lock_out_dir); a failed write (a full disk) removes it and names the file and the free
space. A save writes best.pt and stable.pt before ckpt.pt: a kill between the renames leaves a best.pt
newer than ckpt.pt, whose val_loss the resumed run reads (never a stale best.pt it believes is better).
"""
import glob
import io
import math
import os
import pickle
import random
import shutil
import zipfile
import zlib
from dataclasses import asdict, fields
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from kit.atomic import FolderInUse, atomic_write, check_writable, lock_folder
from configurator import first_line
from model import GPT, GPTConfig
from kit.schedule import get_lr, schedule_args

CHECKPOINT_NAMES = {"last": "ckpt.pt", "best": "best.pt", "stable": "stable.pt"}
LOCK_NAME = "train.lock"  # in out_dir, held by the run writing there (lock_out_dir)
REQUIRED_KEYS = ("model_args", "model", "iter_num")
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
GPT2_DEFAULTS = {f.name: f.default for f in fields(GPTConfig)}  # every switch at its default is GPT-2


def checkpoint_path(out_dir, which="last", key="checkpoint"):
    """'last', 'best', 'stable', or a path to a .pt file; key names the setting in the error."""
    if which in CHECKPOINT_NAMES:
        return os.path.join(out_dir, CHECKPOINT_NAMES[which])
    if which.endswith(".pt"):
        return which
    raise ValueError(f"{key}={which!r}: allowed are {', '.join(CHECKPOINT_NAMES)} or a path to a .pt file")


def check_out_dir(out_dir, init_from, overwrite, lock=False):
    """Before any work: out_dir can be written; with lock, this process becomes its one writer (the lock
    is returned, held until the process ends); and a new run (init_from other than 'resume') does not
    replace any checkpoint already there, unless overwrite. ValueError in one line."""
    try:
        check_writable(out_dir)
    except OSError as e:
        raise ValueError(f"out_dir={out_dir!r} is not writable: {e.strerror}") from None
    out_dir_lock = lock_out_dir(out_dir) if lock else None
    existing = [path for path in (checkpoint_path(out_dir, name) for name in CHECKPOINT_NAMES) if os.path.exists(path)]
    if init_from != "resume" and existing and not overwrite:
        raise ValueError(f"out_dir holds {', '.join(existing)}: this run (init_from={init_from}) would replace them "
                         "or mix its own checkpoints with them; continue that run with --init_from=resume (and "
                         "--resume_from=best or stable if it has no ckpt.pt), replace them with --overwrite=True, "
                         "or use another out_dir")
    return out_dir_lock


def lock_out_dir(out_dir):
    """One training run per out_dir (a double launch, a requeue while the old job still runs): two would
    rename each other's half-written files and mix ckpt.pt and best.pt of different runs. Holding the
    lock, this run also removes the temporary files a killed run left (no one else is writing them)."""
    try:
        lock = lock_folder(out_dir, LOCK_NAME)
    except FolderInUse as e:
        raise ValueError(f"out_dir={out_dir!r} is in use by another training run ({e.holder}); wait for it to "
                         "end, stop it, or use another out_dir") from None
    for name in CHECKPOINT_NAMES.values():
        for leftover in glob.glob(os.path.join(glob.escape(out_dir), f"{name}.tmp*")):
            os.remove(leftover)
    return lock


def save_checkpoint(state, *paths):
    """Write state to each path atomically (kit/atomic.py): a crash, SIGKILL or full disk mid-write leaves the
    previous file intact. The checksum is computed once for all the paths (ckpt.pt, best.pt, stable.pt)."""
    if isinstance(state, dict):  # a re-saved checkpoint gets a fresh checksum, not one over the old
        state = {k: v for k, v in state.items() if k != "checksum"}
        state["checksum"] = tensors_checksum(state)
    for path in paths:
        try:
            with atomic_write(path, per_process=True) as f:  # a name no other process writes
                torch.save(state, f)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise OSError(f"cannot write checkpoint {path} ({free / 2**20:,.0f} MiB free on its disk; the previous "
                          f"file is intact): {type(e).__name__}: {first_line(e)}") from None


def tensors_checksum(obj):
    """CRC32 over the dtype, shape and bytes of every tensor in obj (dicts and lists walked in order).
    Cheap next to the save itself, and catches the flipped bytes torch.load would read silently."""
    crc = 0
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode())
        return zlib.crc32(t.view(torch.uint8).numpy(), crc)
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        crc = zlib.crc32(f"{key}:{tensors_checksum(value)}".encode(), crc)
    return crc


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, or a one-line error saying what is wrong with the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint; its run was killed or its disk was full")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip files; anything else is damaged, not unsafe
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): not a torch.save "
                             "zip file") from None
        raise ValueError(f"{path} holds something other than tensors and plain values, refused for "
                         f"safety (weights_only=True): {first_line(e)}") from None
    except Exception as e:  # truncated zip, garbage bytes: all mean the same to the user
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {first_line(e)}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a model checkpoint: missing {', '.join(missing)}")
    stored = ckpt.pop("checksum", None)
    if stored is not None and tensors_checksum(ckpt) != stored:
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them "
                         "(damaged on disk or in a copy); use another checkpoint (best.pt, stable.pt)")
    return ckpt


def check_model_fits(ckpt, path):
    """ValueError in one line unless the weights fit the model that model_args describes, for every
    script that builds or exports the model. Shapes only, on the meta device: no memory, no init."""
    try:
        with torch.device("meta"):
            model = GPT(GPTConfig.from_dict(checkpoint_model_args(ckpt)))
        model.load_state_dict(clean_state_dict(ckpt["model"]), assign=True)
    except (AttributeError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: its weights do not fit its model_args ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]})") from None


def saved_val_loss(path):
    """The val_loss recorded in the checkpoint at path, or None (no file, unreadable, or saved
    between evaluations). Memory-maps the file, so the tensors are not read."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("val_loss")
    except Exception:  # a missing or damaged best.pt holds no usable record
        return None
    return value if isinstance(value, float) else None


def clean_state_dict(state_dict):
    """Strip the prefixes torch.compile ('_orig_mod.') and DDP ('module.') add, e.g. in
    checkpoints written by nanoGPT itself. nanoGPT without flash attention also saves its causal
    mask as the buffer 'attn.bias' (our biases are attn.c_attn.bias, attn.c_proj.bias): dropped."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        if not k.endswith(".attn.bias"):
            out[k] = v
    return out


def checkpoint_model_args(ckpt):
    """GPTConfig's arguments from a checkpoint: nanoGPT's model_args plus our model_switches (our
    checkpoints before model_switches kept the switches in model_args: read as they are)."""
    return {**ckpt["model_args"], **(ckpt.get("model_switches") or {})}


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig.from_dict(checkpoint_model_args(ckpt)))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model


# ----------------------------------------------------------------------------------------------
# writing and reading a training run's state


def build_checkpoint(model, optimizers, scaler, ranks, **run_values):
    """The dict save_checkpoint writes, see the top of this file. model is the plain module (not compiled,
    not DDP); optimizers maps a checkpoint key to an optimizer: {"optimizer": adamw}, plus e.g. "muon";
    run_values (iter_num, best_val_loss, config, lr, val_loss, dataset_meta, tokens_seen) are stored as given."""
    args = asdict(model.config)
    checkpoint = {"model_args": {k: args[k] for k in NANOGPT_MODEL_ARGS},
                  "model_switches": {k: v for k, v in args.items()
                                     if k not in NANOGPT_MODEL_ARGS and v != GPT2_DEFAULTS[k]},
                  "model": model.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                  "ranks": ranks, **run_values}
    names = {id(p): name for name, p in model.named_parameters()}
    for key, optimizer in optimizers.items():
        state = optimizer.state_dict()
        for saved, group in zip(state["param_groups"], optimizer.param_groups):
            saved["param_names"] = [names[id(p)] for p in group["params"]]
        checkpoint[key] = state
    return checkpoint


def resume_model_args(ckpt, model_args):
    """model_args to resume ckpt with: the checkpoint's vocab_size (50257 for GPT-2 weights), every other
    field as configured, which must be the checkpoint's (dropout aside), else ValueError."""
    saved = checkpoint_model_args(ckpt)
    model_args = dict(model_args, vocab_size=saved.get("vocab_size", GPT2_DEFAULTS["vocab_size"]))
    changed = [f"{k} (checkpoint {saved.get(k)!r}, config {v!r})" for k, v in model_args.items()
               if k != "dropout" and saved.get(k, GPT2_DEFAULTS[k]) != v]
    if changed:
        raise ValueError(f"the model shape changed: {'; '.join(changed)}")
    return model_args


def check_same_optimizer(ckpt, optimizer):
    """ValueError unless the run resumes with the optimizer the checkpoint was trained with: AdamW's and
    Muon's states do not translate into each other (nanoGPT's checkpoints are AdamW's)."""
    saved = (ckpt.get("config") or {}).get("optimizer", "adamw")
    if saved != optimizer:
        raise ValueError(f"it was trained with optimizer={saved!r}, the config says optimizer={optimizer!r}; "
                         "keep the checkpoint's optimizer")


def check_resume_lr(ckpt, config):
    """ValueError when the new config's schedule would raise the learning rate above the one the
    checkpoint's own schedule planned for its iteration (a larger max_iters, lr_decay_iters or learning_rate
    by accident); the user allows it with allow_lr_increase."""
    iter_num = ckpt["iter_num"]
    try:
        planned_lr = get_lr(iter_num, **schedule_args(ckpt["config"]))
    except (KeyError, TypeError, ValueError):  # a checkpoint from another tool (nanoGPT): nothing to compare
        return
    lr = get_lr(iter_num, **schedule_args(config))
    if lr > planned_lr * (1 + 1e-6) and not config["allow_lr_increase"]:
        raise ValueError(
            f"resuming at iteration {iter_num} would raise the learning rate from {planned_lr:.3g} (the "
            f"checkpoint's schedule) to {lr:.3g} (lr_schedule={config['lr_schedule']}, max_iters="
            f"{config['max_iters']}, lr_decay_iters={config['lr_decay_iters']}); "
            + ("to extend a wsd run, resume from before its cooldown (--resume_from=stable); "
               if config["lr_schedule"] == "wsd" else "")
            + "see docs/training.md, 'Training past the plan', or pass --allow_lr_increase=True")


def check_same_data(ckpt, dataset_meta, data_dir, allow_new_data):
    """ValueError when the bins now opened are not those the checkpoint was trained on (another data_dir, or a
    dataset prepared anew): a mistyped --data_dir would otherwise go on silently on other data; the user asks for
    it with allow_new_data. Compared: each split's tokens and documents (meta.json's timings may differ)."""
    saved = (ckpt.get("dataset_meta") or {}).get("splits")
    if not saved or allow_new_data:  # nanoGPT's checkpoints record no dataset
        return

    def sizes(splits):
        return {split: (splits[split].get("tokens"), splits[split].get("documents")) for split in ("train", "val")}

    def describe(splits):  # an older or adopted meta.json may lack a count
        return ", ".join(f"{split}.bin {tokens if tokens is None else f'{tokens:,}'} tokens"
                         + ("" if docs is None else f" in {docs:,} documents") for split, (tokens, docs) in
                         sizes(splits).items())

    if sizes(saved) != sizes(dataset_meta["splits"]):
        config = ckpt.get("config") or {}
        where = config.get("data_dir") or f"dataset={config.get('dataset')!r}"
        raise ValueError(f"it was trained on other data ({where}: {describe(saved)}) than {data_dir} holds "
                         f"({describe(dataset_meta['splits'])}); resume with the run's own data, or pass "
                         "--allow_new_data=True to continue on this one")


def restore_checkpoint(ckpt, model, optimizers, scaler, batches, rank, world_size):
    """Load ckpt into a model and optimizers built from resume_model_args, the GradScaler, and this rank's
    RNG and data loader. Returns a warning when part of the run's state cannot come back (then RNG and
    data order start afresh), else None. ValueError, one line, when the checkpoint does not fit."""
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        details = " ".join(str(e).split("\n", 1)[-1].split())  # past "Error(s) in loading state_dict for GPT:"
        raise ValueError(f"its weights do not fit the model: {details[:300]}") from None
    for key, optimizer in optimizers.items():
        if key not in ckpt:
            raise ValueError(f"it holds no {key!r} state for this run's optimizer")
        try:
            load_optimizer_by_name(optimizer, ckpt[key], model, ckpt["model"])
        except (KeyError, TypeError, AttributeError) as e:  # not an optimizer's state dict at all
            raise ValueError(f"its {key!r} is not an optimizer state ({type(e).__name__}: {e})") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt.get("ranks")
    if not ranks:
        return ("the checkpoint holds no RNG or data loader state (nanoGPT does not save them): batches "
                "and dropout masks start afresh (not an exact resume)")
    if len(ranks) != world_size:
        return (f"the checkpoint was written by {len(ranks)} rank(s), this run has {world_size}: "
                "data order and RNG start afresh (not an exact resume)")
    set_rng_state(ranks[rank]["rng"])
    batches.load_state_dict(ranks[rank]["data"])
    return None


def saved_param_names(saved, state_dict, model):
    """Each saved optimizer group's parameter names. Ours are stored; nanoGPT (and this kit before
    model_switches) stored positions only, of AdamW groups built as nanoGPT builds them: the parameters in registration
    order, which is the state dict's order less the tied lm_head, matrices (decayed) first."""
    if all("param_names" in group for group in saved["param_groups"]):
        return [group["param_names"] for group in saved["param_groups"]]
    params = dict(model.named_parameters())
    names = [k for k in clean_state_dict(state_dict) if k in params]
    return [[n for n in names if params[n].dim() >= 2], [n for n in names if params[n].dim() < 2]]


def load_optimizer_by_name(optimizer, saved, model, state_dict):
    """optimizer.load_state_dict(saved) with each parameter's moments matched by name, not position:
    the writer may have registered its parameters in another order. ValueError when they do not map."""
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    ours = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    theirs = saved_param_names(saved, state_dict, model)
    sizes = [len(g["params"]) for g in saved["param_groups"]]
    if sizes != [len(g) for g in theirs] or [sorted(g) for g in theirs] != [sorted(g) for g in ours]:
        raise ValueError(f"its optimizer state holds groups of {sizes} parameters that do not map by name "
                         f"onto this model's groups of {[len(g) for g in ours]}")
    position = {name: i for i, name in enumerate(chain(*ours))}
    state = {}
    for saved_id, name in zip(chain(*(g["params"] for g in saved["param_groups"])), chain(*theirs)):
        moments = saved["state"].get(saved_id, {})
        wrong = [k for k, v in moments.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape != params[name].shape]
        if wrong:
            raise ValueError(f"its optimizer state for {name} has shape {tuple(moments[wrong[0]].shape)}, "
                             f"the parameter {tuple(params[name].shape)}")
        if moments:
            state[position[name]] = moments
    # the moments are the checkpoint's; the hyperparameters (betas, weight_decay, momentum...) are this run's
    # settings, so that `--weight_decay=0.05 --init_from=resume` applies it (train.py names what changed), and
    # how to compute them (fused, foreach) is this machine's business: a GPU's fused AdamW resumes on a CPU
    groups = [dict(group, params=[position[n] for n in names], param_names=names)
              for group, names in zip(optimizer.param_groups, ours)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# the settings train.py reads into its optimizers (load_optimizer_by_name keeps them on resume) or uses at every
# step; learning_rate and its schedule are check_resume_lr's, the optimizer itself check_same_optimizer's
OPTIMIZER_SETTINGS = ("weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum", "grad_clip")


def changed_settings(ckpt, config, keys=OPTIMIZER_SETTINGS):
    """'weight_decay 0.1 -> 0.05, ...' for each of keys this config sets otherwise than the checkpoint's
    (absent from its config, as in a checkpoint of another tool: not compared); '' when none."""
    saved = ckpt.get("config") or {}
    return ", ".join(f"{k} {saved[k]!r} -> {config[k]!r}" for k in keys if k in saved and saved[k] != config[k])


def gather_rank_states(state, world_size):
    """Every rank's state (RNG, data position) on every rank, in rank order: a collective under DDP.
    Sent as torch.save bytes: all_gather_object's own pickling of tensors fails to unpickle (torch 2.13:
    "UntypedStorage has no attribute 'dtype'")."""
    if world_size == 1:
        return [state]
    buffer, gathered = io.BytesIO(), [None] * world_size
    torch.save(state, buffer)
    dist.all_gather_object(gathered, buffer.getvalue())
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]


def non_finite_part(model, val_loss):
    """'weights', 'val loss' or '': what must not be saved because it is NaN or Inf."""
    if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all().item():
        return "weights"
    return "val loss" if val_loss is not None and not math.isfinite(val_loss) else ""


def rng_state():
    """This process's RNG states, as plain values and tensors (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
