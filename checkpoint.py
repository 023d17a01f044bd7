"""
The checkpoint format, in one place. A checkpoint is a dict saved with torch.save, readable with
torch.load(weights_only=True) (plain containers and tensors only, so loading one from a stranger
cannot run code), under nanoGPT's key names so tools written for nanoGPT keep working:

    model_args      dict: the GPTConfig fields
    model           the uncompiled, unwrapped state dict (no '_orig_mod.' / 'module.' prefixes)
    optimizer       AdamW state dict
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
    tokens_seen     training tokens so far, over every batch shape the run had (metrics.jsonl's tokens)
    checksum        CRC32 of every tensor's bytes, written by save_checkpoint and checked by
                    load_checkpoint (torch.load does not check the zip's own CRCs); files without
                    it (older ones, nanoGPT's) load unchecked

Files in out_dir: ckpt.pt (always the latest), best.pt (lowest val loss), and for the wsd schedule
stable.pt (the last checkpoint before the cooldown, from which a run can be extended).
Writes go to a temporary file (<name>.tmp) that replaces the old one only when complete; a crash
mid-write leaves at most that .tmp file, which the next save overwrites; a failed write (a full
disk) removes it and names the file and the free space.
"""
import os
import pickle
import random
import shutil
import zipfile
import zlib

import numpy as np
import torch

from atomic import atomic_write
from model import GPT, GPTConfig

CHECKPOINT_NAMES = {"last": "ckpt.pt", "best": "best.pt", "stable": "stable.pt"}
REQUIRED_KEYS = ("model_args", "model", "iter_num")


def checkpoint_path(out_dir, which="last", key="checkpoint"):
    """'last', 'best', 'stable', or a path to a .pt file; key names the setting in the error."""
    if which in CHECKPOINT_NAMES:
        return os.path.join(out_dir, CHECKPOINT_NAMES[which])
    if which.endswith(".pt"):
        return which
    raise ValueError(f"{key}={which!r}: allowed are {', '.join(CHECKPOINT_NAMES)} or a path to a .pt file")


def save_checkpoint(state, path):
    """Write atomically (atomic.py): a crash, SIGKILL or full disk mid-write leaves the previous file intact."""
    if isinstance(state, dict):  # a re-saved checkpoint gets a fresh checksum, not one over the old
        state = {k: v for k, v in state.items() if k != "checksum"}
        state["checksum"] = tensors_checksum(state)
    try:
        with atomic_write(path) as f:
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


def first_line(e):
    return (str(e).splitlines() or [""])[0][:200]


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
            model = GPT(GPTConfig.from_dict(ckpt["model_args"]))
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
