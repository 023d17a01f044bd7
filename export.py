"""
Export a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer):

$ python export.py --out_dir=out-fineweb --ckpt=best --to=hf_model
$ python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf_model')('Hello')[0])"

Our documents start after <|endoftext|> (see kit/tokenizer.py), so begin a prompt with it to start a
new document. The mapping and its choices (vocabulary trimmed to 50257, zero biases for bias=False)
are in kit/hf.py. Only safetensors is needed to export; transformers only to use the result.
"""
import glob
import os
import shutil
import sys

import psutil

from kit.atomic import atomic_write
from kit.checkpoint import load_model
from configurator import config_globals, configure, fail
from kit.hf import EXPORT_FILES, export_files

# -----------------------------------------------------------------------------
out_dir = "out"  # where train.py wrote its checkpoints
ckpt = "last"  # 'last' (ckpt.pt), 'best' (best.pt), 'stable' or a path to a .pt file
to = "hf_model"  # the folder to write; must not exist (or be empty) unless force
force = False  # replace an earlier export in `to` (a folder holding other files is never deleted)
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)


def check_destination(folder):
    """Refuse to overwrite anything but an earlier export, and that only with --force."""
    if not folder.strip():  # `--to=$UNSET`: replacing "" would mean replacing the current folder
        fail(f"to={folder!r}: name the folder to write, e.g. --to=hf_model")
    target, here = os.path.realpath(folder), os.path.realpath(os.getcwd())
    if os.path.commonpath([target, here]) == target:
        fail(f"to={folder!r} is the current folder or one above it; name a new folder, e.g. --to=hf_model")
    finish_interrupted_swap(folder)
    if not os.path.exists(folder):
        return
    if not os.path.isdir(folder):
        fail(f"to={folder!r} is a file, not a folder")
    present = os.listdir(folder)
    if present and not force:
        fail(f"to={folder!r} already exists and is not empty; pass --force=True to replace it")
    foreign = sorted(set(present) - set(EXPORT_FILES))
    if foreign:
        fail(f"to={folder!r} holds files an export does not write ({', '.join(foreign[:5])}); "
             "not deleting them, choose another folder")


def write_folder(folder, files):
    """Write every file into a sibling temporary folder, then swap it in: the old export is renamed aside,
    the new one renamed in, and only then is the old one deleted, so a kill at any moment leaves one whole
    export, under its name or aside (finish_interrupted_swap puts it back)."""
    folder = os.path.normpath(folder)
    tmp, aside = f"{folder}.tmp.{os.getpid()}", f"{folder}.old.{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with atomic_write(os.path.join(tmp, name)) as f:  # fsynced before the folder swap below
                f.write(data)
        if os.path.exists(folder):
            os.replace(folder, aside)
        os.replace(tmp, folder)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        if os.path.exists(aside) and not os.path.exists(folder):
            os.replace(aside, folder)  # the new one did not make it: the old one goes back


def finish_interrupted_swap(folder):
    """What an export killed in write_folder left beside `folder`: a half-written <folder>.tmp.<pid> is
    deleted; an old export set aside (<folder>.old.<pid>) goes back if `folder` is missing (killed between
    the two renames), else it was already replaced and is deleted. Folders of a live export are left alone."""
    folder = os.path.normpath(folder)
    for kind in ("old", "tmp"):
        for leftover in sorted(glob.glob(f"{glob.escape(folder)}.{kind}.*")):
            pid = leftover.rsplit(".", 1)[1]
            if pid.isdigit() and not psutil.pid_exists(int(pid)):
                finish_leftover(folder, kind, leftover)


def finish_leftover(folder, kind, leftover):
    if kind == "old" and not os.path.exists(folder):
        os.replace(leftover, folder)
        print(f"{folder}: restored the export an interrupted run had set aside ({leftover})")
    else:
        shutil.rmtree(leftover, ignore_errors=True)


def main():
    check_destination(to)
    try:
        model, checkpoint, path = load_model(out_dir, ckpt)  # weights that fit: a broken folder is never written
        files = export_files(vars(model.config), model.state_dict())
    except (FileNotFoundError, ValueError) as e:
        fail(f"cannot export: {e}")
    try:
        write_folder(to, files)
    except OSError as e:
        fail(f"cannot write {to!r}: {e.strerror or e}")
    size = len(files["model.safetensors"]) / 2**20
    print(f"exported {path} (iteration {checkpoint['iter_num']}) to {to}/ ({size:.1f} MiB of fp32 weights); "
          f"load it with transformers.GPT2LMHeadModel.from_pretrained({to!r})")


if __name__ == "__main__":
    main()
