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
