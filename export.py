"""
Export a checkpoint as a Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer):

$ python export.py --out_dir=out-fineweb --ckpt=best --to=hf_model
$ python -c "from transformers import pipeline; print(pipeline('text-generation', 'hf_model')('Hello')[0])"

Our documents start after <|endoftext|> (see tokenizer.py), so begin a prompt with it to start a
new document. The mapping and its choices (vocabulary trimmed to 50257, zero biases for bias=False)
are in hf.py. Only safetensors is needed to export; transformers only to use the result.
"""
import os
import shutil
import sys

from atomic import atomic_write
from checkpoint import check_model_fits, checkpoint_model_args, checkpoint_path, clean_state_dict, load_checkpoint
from configurator import config_globals, configure, fail
from hf import EXPORT_FILES, export_files

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
    """Write every file into a sibling temporary folder, then swap it in: no half-written export."""
    folder = os.path.normpath(folder)
    tmp = f"{folder}.tmp.{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, data in files.items():
            with atomic_write(os.path.join(tmp, name)) as f:  # fsynced before the folder swap below
                f.write(data)
        if os.path.exists(folder):
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


def main():
    check_destination(to)
    try:
        path = checkpoint_path(out_dir, ckpt, key="ckpt")
        checkpoint = load_checkpoint(path, map_location="cpu")
        check_model_fits(checkpoint, path)  # a broken folder must never be written
        files = export_files(checkpoint_model_args(checkpoint), clean_state_dict(checkpoint["model"]))
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
