"""
The checkpoint format, in one place. A checkpoint is a dict saved with torch.save, readable with
torch.load(weights_only=True) (plain containers and tensors only, so loading one from a stranger
cannot run code), under nanoGPT's key names so tools written for nanoGPT keep working:

    model_args      dict: the GPTConfig fields
    model           the uncompiled, unwrapped state dict (no '_orig_mod.' / 'module.' prefixes)
    optimizer       AdamW state dict
    muon            torch.optim.Muon state dict, only when config["optimizer"] == "muon" (the block
                    matrices' momentum; AdamW's above then covers the other parameters)
    iter_num        iterations completed; training resumes at this iteration
    best_val_loss   lowest validation loss seen so far in this run (best.pt holds that model)
    config          the full training config
  and for exact resume:
    scaler          GradScaler state (fp16 only, else None)
    ranks           one entry per DDP rank (a single one without DDP), each {"rng": rng_state(),
                    "data": loader.TokenBatches.state_dict()}: RNG states (python, numpy, torch CPU,
                    CUDA) and the data loader's position
    lr              the learning rate of the last iteration (informative; train.py compares the
                    checkpoint's config schedule with the new one to catch jumps on resume)
    dataset_meta    the dataset's meta.json (None for a dataset without one)
    val_loss        this checkpoint's own validation loss (None when saved between evaluations)

Files in out_dir: ckpt.pt (always the latest), best.pt (lowest val loss), and for the wsd schedule
stable.pt (the last checkpoint before the cooldown, from which a run can be extended).
Writes go to a temporary file (<name>.tmp) that replaces the old one only when complete; a crash
mid-write leaves at most that .tmp file, which the next save overwrites.
"""
import os
import pickle
import random
import zipfile

import numpy as np
import torch

from model import GPT, GPTConfig

CHECKPOINT_NAMES = {"last": "ckpt.pt", "best": "best.pt", "stable": "stable.pt"}
REQUIRED_KEYS = ("model_args", "model", "iter_num")


def checkpoint_path(out_dir, which="last"):
    """'last', 'best', 'stable', or a path to a .pt file."""
    if which in CHECKPOINT_NAMES:
        return os.path.join(out_dir, CHECKPOINT_NAMES[which])
    if which.endswith(".pt"):
        return which
    raise ValueError(f"checkpoint {which!r}: allowed are {', '.join(CHECKPOINT_NAMES)} or a path to a .pt file")


def save_checkpoint(state, path):
    """Write atomically: a crash or SIGKILL mid-write leaves the previous file intact. One fixed
    temporary name, so repeated crashes cannot pile up half-written files."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, or a one-line error saying what is wrong with the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):  # torch.save writes zip files; anything else is damaged, not unsafe
            raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): not a torch.save "
                             "zip file") from None
        raise ValueError(f"{path} holds something other than tensors and plain values, refused for "
                         f"safety (weights_only=True): {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # truncated zip, garbage bytes: all mean the same to the user
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path} is not a model checkpoint: missing {', '.join(missing)}")
    return ckpt


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
    checkpoints written by nanoGPT itself."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def model_from_checkpoint(ckpt):
    model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
    model.load_state_dict(clean_state_dict(ckpt["model"]))
    return model


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
