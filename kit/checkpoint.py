"""
The checkpoint format, in one place. A checkpoint is a dict saved with torch.save and read with
torch.load(weights_only=True) (tensors and plain values only: loading a stranger's file runs no code),
in nanoGPT's layout, so that nanoGPT's sample.py and train.py read ours and we resume theirs:

    model_args      exactly nanoGPT's GPTConfig arguments (n_layer, n_head, n_embd, block_size, bias,
                    vocab_size, dropout); model: the plain state dict (no '_orig_mod.' / 'module.')
    optimizer       AdamW's state dict, each group with its 'param_names': moments are matched by name
    iter_num, best_val_loss, config    as nanoGPT writes them
  ours only (nanoGPT ignores them): model_switches (model.py's switches that differ from GPT-2), muon
  (torch.optim.Muon's state with optimizer='muon'), scaler (fp16's GradScaler), ranks (each DDP rank's
  RNG and data position: exact resume), lr, val_loss (None between evaluations), dataset_meta (to refuse
  other data), tokens_seen, progress (for the time left), checksum (CRC32 of every tensor: torch.load
  does not check the zip's own CRCs). Files in out_dir: ckpt.pt (the latest), best.pt (lowest val loss), and
  for the wsd schedule stable.pt (the last evaluation before the cooldown, from which a run can be extended).
"""
import glob
import io
import os
import pickle
import random
import re
import shutil
import zipfile
import zlib
from dataclasses import asdict, fields
from itertools import chain

import numpy as np
import torch

from configurator import first_line
from kit.atomic import atomic_write
from model import GPT, GPTConfig

CHECKPOINT_NAMES = {"last": "ckpt.pt", "best": "best.pt", "stable": "stable.pt"}
NANOGPT_MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
GPT2_DEFAULTS = {f.name: f.default for f in fields(GPTConfig)}  # every switch at its default is GPT-2
# optimizer settings a resume may change (the moments are kept); the schedule is kit/schedule.py's business
OPTIMIZER_SETTINGS = ("weight_decay", "beta1", "beta2", "muon_lr", "muon_momentum", "grad_clip")


def checkpoint_path(out_dir, which="last", key="checkpoint"):
    """'last', 'best', 'stable', or a path to a .pt file; key names the setting in the error."""
    if which in CHECKPOINT_NAMES:
        return os.path.join(out_dir, CHECKPOINT_NAMES[which])
    if which.endswith(".pt"):
        return which
    raise ValueError(f"{key}={which!r}: allowed are {', '.join(CHECKPOINT_NAMES)} or a path to a .pt file")


def save_checkpoint(state, *paths):
    """Serialise state once, with a fresh checksum, and write the bytes to each path atomically: a crash,
    SIGKILL or full disk mid-write leaves the previous file intact."""
    state = {k: v for k, v in state.items() if k != "checksum"}
    state["checksum"] = tensors_checksum(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for path in paths:
        try:
            with atomic_write(path, per_process=True) as f:  # a name no other process writes
                f.write(buffer.getbuffer())
        except OSError as e:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
            raise OSError(f"cannot write checkpoint {path} ({free / 2**20:,.0f} MiB free on its disk; the previous "
                          f"file is intact): {type(e).__name__}: {first_line(e)}") from None


def tensors_checksum(obj):
    """CRC32 over the dtype, shape and bytes of every tensor in obj (dicts and lists walked in order)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        return zlib.crc32(t.view(torch.uint8).numpy(), zlib.crc32(f"{t.dtype}{tuple(obj.shape)}".encode()))
    crc = 0
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        crc = zlib.crc32(f"{key}:{tensors_checksum(value)}".encode(), crc)
    return crc


def load_checkpoint(path):
    """The checkpoint dict (on the CPU), or a one-line error saying what is wrong with the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): not a checkpoint; its run was killed or its disk was full")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip files; anything else is damaged, not unsafe
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): not a torch.save "
                             "zip file") from None
        raise ValueError(f"{path} holds something other than tensors and plain values, refused for "
                         f"safety (weights_only=True): {first_line(e)}") from None
    except Exception as e:  # truncated zip, garbage bytes: all mean the same to the user
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {first_line(e)}") from None
    missing = [k for k in ("model_args", "model", "iter_num") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a model checkpoint: missing {', '.join(missing)}")
    stored = ckpt.pop("checksum", None)  # nanoGPT's files have none
    if stored is not None and tensors_checksum(ckpt) != stored:
        raise ValueError(f"{path} is corrupt: its tensors do not match the checksum written with them "
                         "(damaged on disk or in a copy); use another checkpoint (best.pt, stable.pt)")
    return ckpt


def model_args_of(ckpt):  # GPTConfig's arguments: nanoGPT's model_args plus our model_switches
    return {**ckpt["model_args"], **(ckpt.get("model_switches") or {})}


def load_weights(model, state_dict):
    """model.load_state_dict without the prefixes torch.compile and DDP add ('_orig_mod.', 'module.', as in
    nanoGPT's files) and without nanoGPT's causal-mask buffers ('.attn.bias', no weight of ours); the one
    check that the weights fit the model, ValueError in one line."""
    clean = {re.sub(r"^((_orig_mod|module)\.)+", "", k): v for k, v in state_dict.items()
             if not k.endswith(".attn.bias")}
    try:
        model.load_state_dict(clean)
    except RuntimeError as e:
        raise ValueError(f"its weights do not fit its model_args (RuntimeError: {' '.join(str(e).split())[:300]})") \
            from None


def model_from_checkpoint(ckpt):
    """The model a checkpoint dict describes, with its weights."""
    model = GPT(GPTConfig.from_dict(model_args_of(ckpt)))
    load_weights(model, ckpt["model"])
    return model


def load_model(out_dir, which="last"):
    """(model, checkpoint, path) for sample.py, eval.py and export.py: which is 'last', 'best', 'stable' or a
    path. ValueError (FileNotFoundError) in one line naming the file when it cannot be loaded."""
    path = checkpoint_path(out_dir, which, key="ckpt")
    if not os.path.exists(path):  # the runs beside it: the out_dir the user most likely meant
        runs = [os.path.dirname(r) for r in sorted(glob.glob(os.path.join(os.path.dirname(out_dir), "*", "ckpt.pt")))]
        raise FileNotFoundError(f"no checkpoint at {path}; --out_dir names a training run's folder"
                                + (f", e.g. {', '.join(runs[:3])}" if runs else ""))
    ckpt = load_checkpoint(path)
    try:
        return model_from_checkpoint(ckpt), ckpt, path
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def saved_val_loss(path):
    """The val_loss recorded in the checkpoint at path, or None (no file, unreadable, or saved between
    evaluations). Memory-maps the file, so the tensors are not read."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("val_loss")
    except Exception:  # a missing or damaged best.pt holds no usable record
        return None
    return value if isinstance(value, float) else None


def build_checkpoint(model, optimizers, scaler, ranks, **run_values):
    """The dict save_checkpoint writes (see the top of this file). model is the plain module; optimizers maps
    a checkpoint key to an optimizer ({"optimizer": adamw}, plus "muon"); run_values are stored as given."""
    args = asdict(model.config)
    checkpoint = {"model_args": {k: args[k] for k in NANOGPT_MODEL_ARGS},
                  "model_switches": {k: v for k, v in args.items()
                                     if k not in NANOGPT_MODEL_ARGS and v != GPT2_DEFAULTS[k]},
                  "model": model.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                  "ranks": ranks, **run_values}
    names = {id(p): name for name, p in model.named_parameters()}
    for key, optimizer in optimizers.items():
        checkpoint[key] = optimizer.state_dict()
        for saved, group in zip(checkpoint[key]["param_groups"], optimizer.param_groups):
            saved["param_names"] = [names[id(p)] for p in group["params"]]
    return checkpoint


def restore_checkpoint(ckpt, config, model, optimizers, scaler, batches, rank, world_size):
    """Load ckpt into the model, its optimizers (moments by parameter name; the hyperparameters are config's),
    the GradScaler, this rank's RNG and data loader. Returns the lines to print: a warning when the RNG and
    data order cannot come back, the optimizer settings that changed. ValueError, one line, when it does not fit."""
    load_weights(model, ckpt["model"])
    for key, optimizer in optimizers.items():
        if key not in ckpt:
            raise ValueError(f"it holds no {key!r} state for this run's optimizer")
        try:
            load_optimizer_by_name(optimizer, ckpt[key], model)
        except (KeyError, TypeError, AttributeError) as e:  # not an optimizer's state dict at all
            raise ValueError(f"its {key!r} is not an optimizer state ({type(e).__name__}: {e})") from None
    if ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    saved, ranks, lines = ckpt.get("config") or {}, ckpt.get("ranks"), []
    changed = [f"{k} {saved[k]!r} -> {config[k]!r}" for k in OPTIMIZER_SETTINGS if k in saved and saved[k] != config[k]]
    if changed:
        lines.append(f"changed settings, applied from iteration {ckpt['iter_num']} on: {', '.join(changed)}")
    if not ranks:
        lines.append("warning: the checkpoint holds no RNG or data loader state (nanoGPT does not save them): "
                     "batches and dropout masks start afresh (not an exact resume)")
    elif len(ranks) != world_size:
        lines.append(f"warning: the checkpoint was written by {len(ranks)} rank(s), this run has {world_size}: "
                     "data order and RNG start afresh (not an exact resume)")
    else:
        set_rng_state(ranks[rank]["rng"])
        batches.load_state_dict(ranks[rank]["data"])
    return lines


def load_optimizer_by_name(optimizer, saved, model):
    """optimizer.load_state_dict(saved) with each parameter's moments matched by name, not position: the writer
    may have registered its parameters in another order. nanoGPT stores positions only, of AdamW groups built as
    it builds them: matrices (decayed), then the rest, each in registration order, which is ours."""
    params = dict(model.named_parameters())
    name_of = {id(p): name for name, p in params.items()}
    ours = [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    theirs = [group.get("param_names") for group in saved["param_groups"]]
    if None in theirs:
        theirs = [[n for n in params if params[n].dim() >= 2], [n for n in params if params[n].dim() < 2]]
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
    # this run's hyperparameters (a resume with --weight_decay=0.05 applies it) and this machine's way of
    # computing them (fused, foreach): a GPU's fused AdamW resumes on a CPU
    groups = [dict(group, params=[position[n] for n in names], param_names=names)
              for group, names in zip(optimizer.param_groups, ours)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state():
    """This process's RNG states, as plain values and tensors (weights_only-loadable)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
