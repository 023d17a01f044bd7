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
