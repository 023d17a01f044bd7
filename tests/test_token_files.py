"""The token files train.py reads (train.bin / val.bin + meta.json): every id checked, files past 4 GiB,
and bins from other tools adopted."""
import json

import sys

import numpy as np
import pytest
import torch

from kit import loader
from kit import tokenizer
from conftest import REPO_ROOT, make_token_dataset, train_args
from inprocess import run_inprocess

sys.path.insert(0, str(REPO_ROOT / "data" / "fineweb"))  # prepare.py, for --adopt


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


# ---------------------------------------------------------------------------------------------
# bins past 4 GiB / 2**31 tokens, as a sparse file: the size is real, the disk holds almost nothing

BIG = 2**31 + 2**21  # tokens: 4 GiB + 4 MiB


@pytest.fixture
def sparse_dataset(tmp_path):
    """train.bin of BIG tokens, zeros except ids 1000..1099 at token 2**31 + 10; val.bin small."""
    data = make_token_dataset(tmp_path / "data")
    with open(data / "train.bin", "r+b") as f:
        f.truncate(BIG * 2)
        f.seek((2**31 + 10) * 2)
        f.write(np.arange(1000, 1100, dtype=np.uint16).tobytes())
    meta = json.loads((data / "meta.json").read_text())
    meta["splits"]["train"]["tokens"] = BIG
    (data / "meta.json").write_text(json.dumps(meta))
    return data


def test_a_bin_past_4_gib_is_read_at_its_far_end(sparse_dataset, monkeypatch):
    assert tokenizer.read_dataset_meta(sparse_dataset)["splits"]["train"]["tokens"] == BIG
    batches = loader.TokenBatches(sparse_dataset / "train.bin", block_size=16, batch_size=1)
    assert batches.n_tokens == BIG
    monkeypatch.setattr(batches, "_starts", lambda: torch.tensor([2**31 + 8]))  # a window past 2**31 tokens
    x, y = batches.next_batch()
    assert x[0, :4].tolist() == [0, 0, 1000, 1001] and y[0, :3].tolist() == [0, 1000, 1001]


@pytest.mark.slow  # reads 4 GiB (of holes): seconds
def test_the_id_check_reads_past_4_gib(sparse_dataset):
    with open(sparse_dataset / "train.bin", "r+b") as f:
        f.seek((BIG - 3) * 2)
        f.write(np.array([50300], dtype=np.uint16).tobytes())
    with pytest.raises(ValueError, match="holds token id 50300"):
        loader.check_token_ids(sparse_dataset / "train.bin", 50257)


def test_train_py_trains_on_a_bin_past_4_gib(sparse_dataset, tmp_path):
    meta = json.loads((sparse_dataset / "meta.json").read_text())
    for split in ("train", "val"):  # as prepare.py records it, so the check does not read 4 GiB again
        meta["splits"][split]["max_token_id"] = tokenizer.VOCAB_SIZE - 1
    (sparse_dataset / "meta.json").write_text(json.dumps(meta))
    code, stdout, stderr = run_inprocess("train.py", *train_args(sparse_dataset, tmp_path / "out", "--max_iters=2"))
    assert code == 0, stdout + stderr


# ---------------------------------------------------------------------------------------------
# bins from another tool (nanoGPT's prepare scripts write train.bin / val.bin, no meta.json)

def nanogpt_bins(data_dir):
    data_dir = make_token_dataset(data_dir)
    (data_dir / "meta.json").unlink()
    return data_dir


def test_bins_without_meta_json_are_refused_with_the_adopt_command(tmp_path):
    data = nanogpt_bins(tmp_path / "data")
    line = expect_train_error(*train_args(data, tmp_path / "out"))
    assert f"python data/fineweb/prepare.py --adopt={data}" in line


def test_adopted_bins_train_and_meta_json_says_what_is_unknown(tmp_path, capsys):
    import prepare
    data = nanogpt_bins(tmp_path / "data")
    meta = prepare.main([f"--adopt={data}"])
    assert "not known (not recorded): document count, split rule, EOT placement" in capsys.readouterr().out
    assert meta["splits"]["train"] == {"documents": None, "tokens": 20_000, "file": "train.bin",
                                       "max_token_id": int(np.fromfile(data / "train.bin", np.uint16).max())}
    assert meta["val_split"] is None and "split rule" in meta["adopted"] and meta["eot_placement"] == "unknown"
    assert sorted(p.name for p in data.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    code, stdout, stderr = run_inprocess("train.py", *train_args(data, tmp_path / "out", "--max_iters=2"))
    assert code == 0, stdout + stderr


@pytest.mark.parametrize("damage, message", [
    ("odd size", "val.bin: 8001 bytes, not a non-empty file of uint16 tokens"),
    ("id beyond the vocabulary", "train.bin holds token id 60000, not below GPT-2's vocabulary of 50257"),
    ("meta.json exists", "meta.json exists already: --adopt is for bins without one"),
])
def test_adopt_refuses_what_it_cannot_vouch_for(tmp_path, capsys, damage, message):
    import prepare
    data = nanogpt_bins(tmp_path / "data")
    if damage == "odd size":
        with open(data / "val.bin", "ab") as f:
            f.write(b"\0")
    elif damage == "id beyond the vocabulary":
        np.array([60000], dtype=np.uint16).tofile(data / "train.bin")
    else:
        (data / "meta.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([f"--adopt={data}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and message in err
    if damage != "meta.json exists":
        assert not (data / "meta.json").exists()
