"""Nothing lost, ever: no command destroys a file, a ruined or damaged model is never saved or
loaded as if it were good, and every mistake ends in one true line."""
import hashlib
import os
import shutil

import pytest
import torch

from checkpoint import save_checkpoint
from conftest import make_token_dataset
from inprocess import run_inprocess, train_args
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error_line(code, stderr, status=2):
    lines = stderr.strip().splitlines()
    assert code == status and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_token_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """out_dir holding a ckpt.pt of a tiny random model."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint({"model_args": TINY, "model": GPT(GPTConfig(**TINY)).state_dict(), "iter_num": 3}, out / "ckpt.pt")
    return out


# ---------------------------------------------------------------------------------------------
# data loss


@pytest.mark.parametrize("to", ["", "."])
def test_export_to_an_empty_value_or_the_current_folder_deletes_nothing(tiny_ckpt, tmp_path, monkeypatch, to):
    """`--to=$UNSET` is `--to=`: it once removed every file of the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a week of work")
    code, _, stderr = run_inprocess("export.py", f"--out_dir={tiny_ckpt}", f"--to={to}", "--force=True")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    assert f"to={to!r}" in one_error_line(code, stderr)


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """out_dir of a cosine run finished at iteration 4: ckpt.pt and best.pt."""
    out = tmp_path_factory.mktemp("run") / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4",
                                                                 "--eval_interval=2"))
    assert code == 0, stdout + stderr
    return out


def test_weights_ruined_just_before_an_evaluation_are_never_saved(finished_run, data_dir, tmp_path):
    """lr 1e30: iteration 5's loss is still finite (computed before its update), but the update ruins
    the weights, so the evaluation at iteration 5 measures a non-finite val loss. It once saved that
    model over ckpt.pt, and the next step's error called ckpt.pt untouched."""
    out = shutil.copytree(finished_run, tmp_path / "out")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt")}
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=8", "--lr_decay_iters=8",
                                                                 "--learning_rate=1e30", "--allow_lr_increase=True",
                                                                 "--eval_interval=5", "--init_from=resume"))
    assert {name: sha(out / name) for name in before} == before
    assert "iter 5: loss" in stdout  # the step before the evaluation was finite
    line = one_error_line(code, stderr, status=1)
    assert line.startswith("error: non-finite val loss at iteration 5")
    assert line.endswith(f"Last good checkpoint, untouched: {out / 'ckpt.pt'}")


# ---------------------------------------------------------------------------------------------
# checkpoints: damaged, mismatched, or not written for lack of space


def damaged_copies(tiny_ckpt, folder):
    """{what: out_dir holding a damaged ckpt.pt}: empty, one flipped byte in a tensor, a weight whose
    shape disagrees with model_args."""
    ckpt = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)
    copies = {name: folder / name for name in ("empty", "flipped", "shape")}
    for out in copies.values():
        out.mkdir()
    (copies["empty"] / "ckpt.pt").write_bytes(b"")
    data = bytearray((tiny_ckpt / "ckpt.pt").read_bytes())
    wte = ckpt["model"]["transformer.wte.weight"].numpy().tobytes()  # 6 MiB of the 7 MiB file
    data[bytes(data).index(wte) + len(wte) // 2] ^= 0x10
    (copies["flipped"] / "ckpt.pt").write_bytes(bytes(data))
    ckpt["model"]["transformer.wpe.weight"] = ckpt["model"]["transformer.wpe.weight"][:16]
    ckpt.pop("checksum", None)
    save_checkpoint(ckpt, copies["shape"] / "ckpt.pt")
    return copies


EXPECTED_DAMAGE = {"empty": "is empty (0 bytes)", "flipped": "is corrupt: its tensors do not match the checksum",
                   "shape": "its weights do not fit its model_args (RuntimeError: Error(s) in loading state_dict"}


def test_flipped_bytes_load_silently_without_the_checksum(tiny_ckpt, tmp_path):
    """Why the checksum exists: torch.load itself does not notice a flipped byte in the tensor data."""
    flipped = damaged_copies(tiny_ckpt, tmp_path)["flipped"] / "ckpt.pt"
    good = torch.load(tiny_ckpt / "ckpt.pt", weights_only=True)["model"]["transformer.wte.weight"]
    bad = torch.load(flipped, weights_only=True)["model"]["transformer.wte.weight"]
    assert (good != bad).sum().item() == 1


def test_damaged_or_mismatched_checkpoints_are_refused_in_one_line(tiny_ckpt, data_dir, tmp_path):
    for what, out in damaged_copies(tiny_ckpt, tmp_path).items():
        path = out / "ckpt.pt"
        runs = {"sample.py": (f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2"),
                "export.py": (f"--out_dir={out}", f"--to={out / 'hf'}"),
                "train.py": train_args(data_dir, out, "--init_from=resume", "--block_size=32")}
        for script, args in runs.items():
            code, _, stderr = run_inprocess(script, *args)
            line = one_error_line(code, stderr)
            assert str(path) in line and EXPECTED_DAMAGE[what] in line, (script, line)
        assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"]  # export wrote no folder, train nothing


class DiskFullAfter:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(28, "No space left on device")
        self.room -= size
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("fails_in", ["write", "fsync"])
def test_full_disk_during_a_save_keeps_every_checkpoint_and_leaves_no_tmp(finished_run, data_dir, tmp_path,
                                                                         monkeypatch, fails_in):
    import checkpoint
    out = shutil.copytree(finished_run, tmp_path / "out")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt")}
    if fails_in == "write":
        monkeypatch.setattr(checkpoint, "open", lambda path, mode: DiskFullAfter(open(path, mode), 100_000),
                            raising=False)
    else:  # buffered writes that only fail when flushed to the disk
        def fsync(fd):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=6", "--lr_decay_iters=6",
                                                                 "--eval_interval=2", "--init_from=resume",
                                                                 "--allow_lr_increase=True"))
    line = one_error_line(code, stderr, status=1)
    assert line.startswith(f"error: cannot write checkpoint {out / 'ckpt.pt'} (") and " MiB free on its disk" in line
    assert {name: sha(out / name) for name in before} == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_prompt_file_that_is_not_utf8(tiny_ckpt, tmp_path):
    (tmp_path / "prompt.txt").write_bytes("café".encode("latin-1"))
    code, _, stderr = run_inprocess("sample.py", f"--out_dir={tiny_ckpt}", "--device=cpu",
                                    f"--start=FILE:{tmp_path / 'prompt.txt'}")
    assert one_error_line(code, stderr) == (f"error: prompt file '{tmp_path / 'prompt.txt'}' is not UTF-8 text "
                                            "(byte 3: b'\\xe9'); save it as UTF-8")
