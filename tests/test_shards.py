"""llm.c's token shards (kit/shards.py, data/fineweb/pretokenized.py): the header rules, one line per bad
file; shards downloaded from a stand-in of the Hub (resumed after a kill, a missing shard named); ours -> llm.c
-> ours with identical tokens; eval.py on an llm.c val file equal to the same tokens in our format."""
import json
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, make_token_dataset, prepare_fails_with, random_model, train_args
from inprocess import read_metrics, run_inprocess
from kit import shards
from kit.checkpoint import save_checkpoint
from kit.loader import TokenBatches, open_dataset
from kit.tokenizer import EOT_TOKEN, read_dataset_meta

sys.path.insert(0, str(REPO_ROOT / "data" / "fineweb"))
import prepare  # noqa: E402
import pretokenized  # noqa: E402

REPO = "kjj0/fineweb10B-gpt2"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50304, bias=False)
CPU_FP32 = ["--device=cpu", "--dtype=float32", "--eval_hellaswag=False"]


def documents_stream(n_tokens, seed):
    """GPT-2 ids as llm.c writes them: an EOT before each document; the stream cut anywhere."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, EOT_TOKEN, n_tokens, dtype=np.uint16)
    tokens[rng.random(n_tokens) < 0.02] = EOT_TOKEN
    return tokens


def llmc_header(magic=20240520, version=1, count=0):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, count
    return header.tobytes()


# -----------------------------------------------------------------------------
# the header rules

def test_a_written_shard_reads_back_as_llmc_reads_it(tmp_path):
    tokens = documents_stream(1000, seed=0)
    shards.write_shard(tmp_path / "s.bin", tokens)
    raw = (tmp_path / "s.bin").read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")  # llm.c's dataloader.h: 256 int32, then uint16 tokens
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()
    assert len(raw) == 1024 + 2 * 1000 and (np.frombuffer(raw[1024:], dtype="<u2") == tokens).all()
    assert shards.check_shard(tmp_path / "s.bin") == (1000, int(tokens.max()))
    assert shards.token_span(tmp_path / "s.bin") == (1024, 1000)
    tokens.tofile(tmp_path / "ours.bin")  # our format: the same ids, no header
    assert shards.token_span(tmp_path / "ours.bin") == (0, 1000)
    assert (shards.open_tokens(tmp_path / "ours.bin") == shards.open_tokens(tmp_path / "s.bin")).all()


@pytest.mark.parametrize("case, content, message", [
    ("wrong magic", llmc_header(magic=12345, count=3) + bytes(6), "magic 12345, not llm.c's 20240520"),
    ("short header", llmc_header(count=3)[:500], "500 bytes, shorter than llm.c's 1,024-byte header: truncated"),
    ("truncated", llmc_header(count=1000) + bytes(600), "counts 1,000 tokens (3,024 bytes with the header) but the "
                                                        "file holds 1,624 bytes: truncated"),
    ("count too small", llmc_header(count=10) + bytes(600), "counts 10 tokens (1,044 bytes with the header) but the "
                                                            "file holds 1,624 bytes: the header and the data disagree"),
    ("llama-3", llmc_header(magic=20240801, version=7, count=3) + bytes(12), "Llama 3 tokens (uint32)"),
    ("version", llmc_header(version=2, count=3) + bytes(6), "version 2; llm.c's gpt2 shards are version 1"),
    ("id too large", llmc_header(count=3) + np.array([5, 50257, 7], "<u2").tobytes(),
     "holds token id 50257, not below gpt2's vocabulary of 50,257"),
])
def test_each_bad_shard_is_refused_in_one_line(tmp_path, capsys, case, content, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    shards.write_shard(folder / "fineweb_train_000001.bin", documents_stream(100, seed=1))
    (folder / "fineweb_val_000000.bin").write_bytes(content)
    with pytest.raises(shards.ShardError, match=message.replace("(", r"\(").replace(")", r"\)")):
        shards.check_shard(folder / "fineweb_val_000000.bin")
    line = prepare_fails_with(capsys, "--pretokenized", folder, "--out_dir", tmp_path / "out")
    assert message in line and "fineweb_val_000000.bin" in line
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_llama3_val_file_is_refused_by_training_in_one_line(tmp_path):
    data = make_token_dataset(tmp_path / "data", n_train=200, n_val=100)
    (tmp_path / "llama.bin").write_bytes(llmc_header(20240801, 7, 40) + bytes(160))
    with pytest.raises(ValueError, match="Llama 3 tokens"):
        open_dataset(data, 16, val_file=str(tmp_path / "llama.bin"))


# -----------------------------------------------------------------------------
# the download, against a stand-in of the Hub

class FakeHub:
    """hf_hub_download over {(repo, file): local file}, copying into a cache folder as the real one does;
    kill_at names a file whose download is interrupted (KeyboardInterrupt, as Ctrl-C or SIGTERM in prepare.py)."""

    def __init__(self, tmp_path, files):
        self.files, self.cache, self.downloads, self.kill_at = files, tmp_path / "hub_cache", [], None
        self.cache.mkdir()

    def hf_hub_download(self, repo_id, repo_type, filename):
        from huggingface_hub.utils import EntryNotFoundError
        assert repo_type == "dataset"
        self.downloads.append(filename)
        if (repo_id, filename) not in self.files:
            raise EntryNotFoundError(f"404 Client Error. Entry Not Found for url: .../{filename}")
        copy = self.cache / filename
        data = self.files[repo_id, filename].read_bytes()
        if filename == self.kill_at:
            raise KeyboardInterrupt("SIGTERM")
        copy.write_bytes(data)
        return str(copy)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """kjj0/fineweb10B-gpt2 in miniature: a val shard and 4 train shards of a few thousand tokens."""
    import huggingface_hub
    folder = tmp_path / "hub_files"
    folder.mkdir()
    files, hub_tokens = {}, {}
    for k, name in enumerate(["fineweb_val_000000.bin"] + [f"fineweb_train_{k:06d}.bin" for k in range(1, 5)]):
        hub_tokens[name] = documents_stream(3000 + 100 * k, seed=k)
        shards.write_shard(folder / name, hub_tokens[name])
        files[REPO, name] = folder / name
    hub = FakeHub(tmp_path, files)
    hub.tokens = hub_tokens
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    return hub


def assert_bins_hold(out_dir, hub, train_shards):
    """val.bin is the val shard's tokens, train.bin the train shards' in order, meta.json to match."""
    val = hub.tokens["fineweb_val_000000.bin"]
    train = np.concatenate([hub.tokens[f"fineweb_train_{k:06d}.bin"] for k in train_shards])
    meta = read_dataset_meta(out_dir)  # checks meta.json against the bins as train.py does
    for split, tokens in (("val", val), ("train", train)):
        assert (np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16) == tokens).all()
        info = meta["splits"][split]
        assert (info["tokens"], info["documents"], info["max_token_id"]) == (
            len(tokens), int((tokens == EOT_TOKEN).sum()), int(tokens.max()))
    return meta


def test_pretokenized_download_takes_the_val_shard_and_train_shards_a_to_b(tmp_path, fake_hub, capsys):
    out = tmp_path / "out"
    prepare.main(["--pretokenized", REPO, "--shards", "2-3", "--out_dir", str(out)])
    assert fake_hub.downloads == ["fineweb_val_000000.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    meta = assert_bins_hold(out, fake_hub, [2, 3])
    assert [s["name"] for s in meta["sources"]] == [f"hf://datasets/{REPO}/{name}" for name in fake_hub.downloads]
    assert sorted(p.name for p in fake_hub.cache.iterdir()) == ["fineweb_val_000000.bin"]  # train shards: in train.bin
    assert not (out / pretokenized.WORK_NAME).exists()
    capsys.readouterr()
    prepare.main(["--pretokenized", REPO, "--shards", "2-3", "--out_dir", str(out)])
    assert "nothing to do" in capsys.readouterr().out and len(fake_hub.downloads) == 3


def test_a_killed_download_continues_with_the_shard_it_was_in(tmp_path, fake_hub, capsys):
    out, args = tmp_path / "out", ["--pretokenized", REPO, "--shards", "1-4", "--out_dir", str(tmp_path / "out")]
    fake_hub.kill_at = "fineweb_train_000003.bin"
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(args)
    assert exit_info.value.code == 128 + 15
    err = capsys.readouterr().err.strip()
    assert err == (f"error: interrupted by SIGTERM; 3 of 5 shard(s) are kept in {out / pretokenized.WORK_NAME}: "
                   f"the same command continues from there")
    assert not (out / "meta.json").exists()
    with open(out / pretokenized.WORK_NAME / "train.bin", "ab") as f:  # killed while appending: half a shard more
        f.write(bytes(1000))
    fake_hub.kill_at, fake_hub.downloads = None, []
    prepare.main(args)
    assert "continuing an unfinished run: 3 of 5 shard(s) already in" in capsys.readouterr().out
    assert fake_hub.downloads == ["fineweb_train_000003.bin", "fineweb_train_000004.bin"]
    assert_bins_hold(out, fake_hub, [1, 2, 3, 4])


def test_a_missing_shard_is_named_in_one_line(tmp_path, fake_hub, capsys):
    line = prepare_fails_with(capsys, "--pretokenized", REPO, "--shards", "3-5", "--out_dir", tmp_path / "out")
    assert line == (f"error: {REPO} has no file fineweb_train_000005.bin; the 3 shard(s) before it are kept in "
                    f"{tmp_path / 'out' / pretokenized.WORK_NAME}, for a command that takes them again")
    assert not (tmp_path / "out" / "meta.json").exists()
    fake_hub.downloads = []
    prepare.main(["--pretokenized", REPO, "--shards", "3-4", "--out_dir", str(tmp_path / "out")])
    assert fake_hub.downloads == []  # the shards before the missing one were kept
    assert_bins_hold(tmp_path / "out", fake_hub, [3, 4])
    line = prepare_fails_with(capsys, "--pretokenized", REPO, "--shards", "0-2", "--out_dir", tmp_path / "out")
    assert "train shards are numbered from 1" in line
    assert "train shards are numbered from 1" in prepare_fails_with(capsys, "--pretokenized", REPO, "--shard", "0")
    line = prepare_fails_with(capsys, "--pretokenized", REPO, "--input", "x.parquet")
    assert "--input does not go with --pretokenized" in line


def test_offline_and_not_cached_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    # the real huggingface_hub, offline (conftest sets HF_HUB_OFFLINE=1), with an empty cache
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    line = prepare_fails_with(capsys, "--pretokenized", REPO, "--out_dir", tmp_path / "out")
    assert f"cannot download fineweb_val_000000.bin from {REPO}: the network is unreachable" in line


# -----------------------------------------------------------------------------
# the other direction, and back

def test_ours_to_llmc_and_back_gives_identical_tokens(tmp_path, monkeypatch, capsys):
    data = make_token_dataset(tmp_path / "fineweb", n_train=25_000, n_val=4_000)
    monkeypatch.setattr(pretokenized, "LLMC_SHARD_TOKENS", 10_000)  # llm.c's 100M, in miniature: 3 train shards
    prepare.main(["--out_dir", str(data), "--to_llmc", str(tmp_path / "llmc")])
    written = sorted(p.name for p in (tmp_path / "llmc").iterdir())
    assert written == ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin",
                       "fineweb_val_000000.bin"]
    assert [shards.check_shard(tmp_path / "llmc" / name)[0] for name in written] == [10_000, 10_000, 5_000, 4_000]
    prepare.main(["--pretokenized", str(tmp_path / "llmc"), "--shards", "1-3", "--out_dir", str(tmp_path / "back")])
    for split in ("train", "val"):
        assert (tmp_path / "back" / f"{split}.bin").read_bytes() == (data / f"{split}.bin").read_bytes()
    with pytest.raises(SystemExit):  # llm.c reads every shard its pattern matches: no mixing with old ones
        prepare.main(["--out_dir", str(data), "--to_llmc", str(tmp_path / "llmc")])
    with pytest.raises(SystemExit):  # a shard missing from a folder is named before anything is copied
        prepare.main(["--pretokenized", str(tmp_path / "llmc"), "--shards", "2-4", "--out_dir", str(tmp_path / "b2")])
    assert not (tmp_path / "b2" / pretokenized.WORK_NAME).exists()
    capsys.readouterr()
    line = prepare_fails_with(capsys, "--out_dir", tmp_path / "nothing", "--to_llmc", tmp_path / "llmc2")
    assert "meta.json not found" in line and not (tmp_path / "llmc2").exists()


# -----------------------------------------------------------------------------
# evaluating on an llm.c val file

def test_eval_on_an_llmc_val_file_equals_the_same_tokens_in_our_format(tmp_path, monkeypatch):
    data = make_token_dataset(tmp_path / "data", n_train=100, n_val=300)
    shards.write_shard(tmp_path / "fineweb_val_000000.bin", np.fromfile(data / "val.bin", dtype=np.uint16))
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint({"model_args": TINY, "model": random_model(**TINY).state_dict(), "iter_num": 7,
                     "config": {"data_dir": str(data)}}, out / "ckpt.pt")
    monkeypatch.setattr(shards, "STANDARD_VAL_TOKENS", 100)  # the standard 10,485,760, in miniature
    runs = [["--val_tokens=101"], [f"--val_file={tmp_path / 'fineweb_val_000000.bin'}"],
            [f"--val_file={data / 'val.bin'}"], [], [f"--val_file={tmp_path / 'fineweb_val_000000.bin'}",
                                                    "--val_tokens=0"]]
    for args in runs:
        code, _, err = run_inprocess("eval.py", f"--out_dir={out}", *args, *CPU_FP32)
        assert code == 0, err
    records = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    # inputs at tokens 0..99, each predicting the next: the first 101 tokens of val.bin, in either format
    assert [r["val_tokens"] for r in records] == [100, 100, 100, 299, 100]
    assert records[0]["val_loss"] == records[1]["val_loss"] == records[2]["val_loss"] == records[4]["val_loss"]
    assert records[0]["val_bpb"] == records[1]["val_bpb"]
    assert records[3]["val_loss"] != records[0]["val_loss"]  # val.bin whole is other windows: a real difference


def test_training_reads_an_llmc_val_file_as_its_val_set(tmp_path):
    data = make_token_dataset(tmp_path / "data", n_train=2000, n_val=500)
    tokens = np.fromfile(data / "val.bin", dtype=np.uint16)
    shards.write_shard(tmp_path / "val_shard.bin", tokens)
    meta, _, val_path = open_dataset(data, 16, val_file=str(tmp_path / "val_shard.bin"))
    assert val_path == str(tmp_path / "val_shard.bin")
    ours, theirs = TokenBatches(data / "val.bin", 16, 4, seed=3), TokenBatches(val_path, 16, 4, seed=3)
    for _ in range(3):
        (x1, y1), (x2, y2) = ours.next_batch(), theirs.next_batch()
        assert (x1 == x2).all() and (y1 == y2).all()


def test_train_py_takes_its_val_set_from_a_val_file_in_either_format(tmp_path):
    data = make_token_dataset(tmp_path / "data", n_train=2000, n_val=500)
    other = documents_stream(600, seed=5)  # a val set other than val.bin
    other.tofile(tmp_path / "other.bin")
    shards.write_shard(tmp_path / "other_shard.bin", other)
    runs = {"val.bin": [], "ours": [f"--val_file={tmp_path / 'other.bin'}"],
            "llmc": [f"--val_file={tmp_path / 'other_shard.bin'}"]}
    val_losses = {}
    for name, extra in runs.items():
        code, _, err = run_inprocess("train.py", *train_args(data, tmp_path / name, "--max_iters=2", "--eval_interval=2",
                                                             *extra))
        assert code == 0, err
        val_losses[name] = [r["val_loss"] for r in read_metrics(tmp_path / name)[1]]
    assert val_losses["ours"] == val_losses["llmc"] != val_losses["val.bin"] and len(val_losses["ours"]) == 2
