"""The token files train.py reads (train.bin / val.bin + meta.json): every id checked, files past 4 GiB,
and bins from other tools adopted."""
import json

import numpy as np
import pytest

import loader
import tokenizer
from conftest import make_token_dataset
from inprocess import run_inprocess, train_args


def expect_train_error(*args):
    code, stdout, stderr = run_inprocess("train.py", *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stdout, stderr)
    return lines[0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_bad_token_id_anywhere_is_refused_at_start(tmp_path, split):
    data = make_token_dataset(tmp_path / "data", n_train=(1 << 20) + 5000, n_val=(1 << 20) + 3000)
    tokens = np.fromfile(data / f"{split}.bin", dtype=np.uint16)
    tokens[-7] = 50300  # past the first 2**20 tokens, where the old check stopped looking
    tokens.tofile(data / f"{split}.bin")
    line = expect_train_error(*train_args(data, tmp_path / "out", "--max_iters=1"))
    assert f"{split}.bin holds token id 50300, not below vocab_size 50257" in line
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_max_token_id_reads_every_chunk(tmp_path):
    ids = np.zeros(10_000, dtype=np.uint16)
    ids[9_999] = 777  # in the last, partial chunk
    ids.tofile(tmp_path / "t.bin")
    assert tokenizer.max_token_id(tmp_path / "t.bin", chunk_tokens=4096) == 777
    (tmp_path / "empty.bin").write_bytes(b"")
    assert tokenizer.max_token_id(tmp_path / "empty.bin") == -1


def test_the_id_check_trusts_the_maximum_prepare_recorded(tmp_path, monkeypatch):
    np.array([1, 2, 60000], dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match="holds token id 60000"):
        loader.check_token_ids(tmp_path / "t.bin", 50257)  # nothing recorded: the file is read
    monkeypatch.setattr(loader, "max_token_id", lambda path: pytest.fail("re-read a file prepare.py checked"))
    loader.check_token_ids(tmp_path / "t.bin", 50257, recorded_max=2)
    with pytest.raises(ValueError, match="holds token id 50300"):
        loader.check_token_ids(tmp_path / "t.bin", 50257, recorded_max=50300)
