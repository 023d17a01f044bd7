"""data/fineweb/prepare.py: parquet in, train.bin/val.bin/meta.json out; each test is a usage example."""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, run_script
from tokenizer import EOT_TOKEN, encode_documents, encode_documents_flat, get_encoding

sys.path.insert(0, str(REPO_ROOT / "data" / "fineweb"))
import prepare  # noqa: E402

PREPARE = REPO_ROOT / "data" / "fineweb" / "prepare.py"
ENC = get_encoding()
TRICKY_DOCS = [
    "Hello world.",
    "",  # an empty document still gets its EOT
    "Ünïcödé: 日本語のテキスト, emoji 🚀, Ελληνικά.",
    "A document that mentions <|endoftext|> as plain text must not split here.",
    "  leading and trailing whitespace\n\n",
    "word " * 500,
]


def write_parquet(path, texts, row_group_size=None, token_count=True):
    """A parquet in FineWeb's layout: text (+ token_count, GPT-2 encode_ordinary counts, as FineWeb has)."""
    columns = {"text": pa.array(texts, type=pa.string()), "id": [f"doc-{i}" for i in range(len(texts))]}
    if token_count:
        columns["token_count"] = [None if t is None else len(ENC.encode_ordinary(t)) for t in texts]
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def synthetic_texts(n_docs, words_per_doc=60, seed=0):
    rng = np.random.default_rng(seed)
    vocab = np.array("the of and a to in is was for on that with as by at from his her it an be this are".split()
                     + [f"word{i}" for i in range(300)])
    return [f"doc {i}: " + " ".join(rng.choice(vocab, words_per_doc)) for i in range(n_docs)]


def run(tmp_path, *args):
    """prepare.py in-process (one worker: no pool start-up), outputs in tmp_path/out."""
    return prepare.main(["--out_dir", str(tmp_path / "out"), "--workers", "1", *map(str, args)])


def read_docs(bin_path):
    """The documents of a bin: the stream is EOT doc EOT doc ..., so split on EOT and drop the empty head."""
    ids = np.fromfile(bin_path, dtype=np.uint16)
    assert len(ids) and ids[0] == EOT_TOKEN
    starts = np.flatnonzero(ids == EOT_TOKEN)
    return [ENC.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(ids)])]


def expected_splits(texts, meta):
    """Train and val documents in order, by the rule in meta.json (recomputed here from its seed/threshold)."""
    rule = meta["val_split"]
    to_val = prepare.val_scores(rule["seed"], np.arange(len(texts))) < rule["threshold"]
    if rule["forced_last_doc"]:
        to_val[-1] = True
    split = {"train": [], "val": []}
    for text, is_val in zip(texts, to_val):
        if text is not None:
            split["val" if is_val else "train"].append(text)
    return split


def assert_bins_hold(out_dir, texts):
    """The bins decode to exactly these documents, each in one split, in order, with meta.json to match."""
    meta = prepare.read_dataset_meta(out_dir)
    expected = expected_splits(texts, meta)
    for split in ("train", "val"):
        docs = read_docs(out_dir / f"{split}.bin")
        assert docs == expected[split]
        assert meta["splits"][split]["documents"] == len(docs) > 0
        tokens = sum(len(ENC.encode_ordinary(d)) + 1 for d in docs)  # an independent count: + 1 EOT per doc
        assert meta["splits"][split]["tokens"] == tokens == (out_dir / f"{split}.bin").stat().st_size // 2
    return meta


def test_flat_encoding_is_the_documents_concatenated():
    flat = encode_documents_flat(ENC, TRICKY_DOCS)
    assert flat.tolist() == [i for doc in encode_documents(ENC, TRICKY_DOCS) for i in doc]
    assert encode_documents_flat(ENC, []).size == 0


def test_tricky_documents_round_trip(tmp_path):
    texts = TRICKY_DOCS * 3 + [f"document number {i}" for i in range(20)]
    source = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=7)
    meta = run(tmp_path, "--input", source, "--val_fraction", 0.3)
    assert_bins_hold(tmp_path / "out", texts)
    assert {k: meta[k] for k in ("tokenizer", "vocab_size", "eot_token", "eot_placement", "dtype")} == {
        "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "eot_placement": "prepend", "dtype": "uint16"}
    assert meta["splits"]["train"]["file"] == "train.bin" and meta["splits"]["val"]["file"] == "val.bin"
    assert meta["sources"][0]["name"] == str(source) and meta["sources"][0]["size"] == source.stat().st_size
    assert meta["val_split"]["seed"] == 1337 and meta["val_split"]["val_fraction"] == 0.3
    assert "splitmix64" in meta["val_split"]["rule"]
    assert meta["token_count_diff"] == 0 and meta["null_texts_skipped"] == 0
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_shared_corpus_round_trip(tmp_path, small_corpus):
    texts = pq.read_table(small_corpus, columns=["text"]).column("text").to_pylist()
    meta = run(tmp_path, "--input", small_corpus)
    assert_bins_hold(tmp_path / "out", texts)
    train, val = read_docs(tmp_path / "out" / "train.bin"), read_docs(tmp_path / "out" / "val.bin")
    assert not set(train) & set(val) and len(set(train) | set(val)) == len(set(texts))  # the corpus has no duplicates
    assert meta["token_count_diff"] == 0
    token_count = pq.read_table(small_corpus, columns=["token_count"]).column("token_count").to_numpy().sum()
    assert sum(s["tokens"] for s in meta["splits"].values()) == token_count + len(texts)


def test_split_depends_on_seed_only(tmp_path):
    texts = synthetic_texts(300, words_per_doc=5)
    source = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=50)

    def val_docs(seed, out):
        prepare.main(["--input", str(source), "--out_dir", str(tmp_path / out), "--workers", "1",
                      "--seed", str(seed), "--val_fraction", "0.1"])
        return read_docs(tmp_path / out / "val.bin")

    assert val_docs(1, "a") == val_docs(1, "b")
    assert val_docs(1, "a") != val_docs(2, "c")
    assert (tmp_path / "a" / "train.bin").read_bytes() == (tmp_path / "b" / "train.bin").read_bytes()


def test_val_is_never_empty(tmp_path):
    texts = ["one", "two", "three"]
    meta = run(tmp_path, "--input", write_parquet(tmp_path / "tiny.parquet", texts), "--val_fraction", 1e-9)
    assert meta["val_split"]["forced_last_doc"]
    assert read_docs(tmp_path / "out" / "val.bin") == ["three"]
    assert_bins_hold(tmp_path / "out", texts)


def test_val_tokens_takes_the_fewest_documents_in_score_order(tmp_path):
    texts = synthetic_texts(200)
    source = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=64)
    meta = run(tmp_path, "--input", source, "--val_tokens", 1000)
    assert_bins_hold(tmp_path / "out", texts)
    assert meta["val_split"]["val_tokens"] == 1000 and "val_fraction" not in meta["val_split"]
    val_tokens = meta["splits"]["val"]["tokens"]
    scores = prepare.val_scores(meta["val_split"]["seed"], np.arange(len(texts)))
    last_in = int(np.argmax(np.where(scores < meta["val_split"]["threshold"], scores, -1)))
    assert val_tokens >= 1000 > val_tokens - (len(ENC.encode_ordinary(texts[last_in])) + 1)


def test_val_tokens_needs_token_count(tmp_path):
    source = write_parquet(tmp_path / "plain.parquet", ["a", "b"], token_count=False)
    with pytest.raises(SystemExit, match="token_count column"):
        run(tmp_path, "--input", source, "--val_tokens", 1)


def test_several_inputs_glob_and_folder_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first, second = synthetic_texts(40, seed=1), synthetic_texts(30, seed=2)
    write_parquet(shards / "000.parquet", first, row_group_size=16)
    write_parquet(shards / "001.parquet", second, row_group_size=16)
    (shards / "notes.txt").write_text("not an input")
    for spec in (shards, shards / "*.parquet"):
        meta = run(tmp_path, "--input", spec, "--val_fraction", 0.2, "--force")
        assert_bins_hold(tmp_path / "out", first + second)
        assert [s["name"] for s in meta["sources"]] == [str(shards / "000.parquet"), str(shards / "001.parquet")]


def test_default_source_downloads_through_the_hub(tmp_path, monkeypatch):
    import huggingface_hub
    local_shard = write_parquet(tmp_path / "cached.parquet", TRICKY_DOCS)
    calls = []

    def fake_hf_hub_download(**kwargs):
        calls.append(kwargs)
        return str(local_shard)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    meta = run(tmp_path)
    assert calls == [{"repo_id": "HuggingFaceFW/fineweb", "repo_type": "dataset",
                      "filename": "data/CC-MAIN-2013-20/000_00000.parquet"}]
    assert meta["sources"][0]["name"] == "hf://datasets/HuggingFaceFW/fineweb/data/CC-MAIN-2013-20/000_00000.parquet"
    assert_bins_hold(tmp_path / "out", TRICKY_DOCS)
    run(tmp_path, "--dump", "CC-MAIN-2024-10", "--shard", 7)
    assert calls[-1]["filename"] == "data/CC-MAIN-2024-10/007_00000.parquet"


def test_missing_remote_file_names_dump_and_shard(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    def fake_hf_hub_download(**kwargs):
        raise EntryNotFoundError("404")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    with pytest.raises(SystemExit, match="no file data/CC-MAIN-1999-01/002_00000.parquet: check --dump"):
        run(tmp_path, "--dump", "CC-MAIN-1999-01", "--shard", 2)


def test_unreachable_network_points_to_input(tmp_path):
    # the real hf_hub_download, offline (conftest sets HF_HUB_OFFLINE=1) with an empty cache
    proc = run_script(PREPARE, "--out_dir", tmp_path / "out", check=False, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode != 0
    assert "network is unreachable" in proc.stderr and "--input PATH" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").iterdir())


def test_rerun_is_a_no_op_and_force_redoes(tmp_path, capsys):
    source = write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS)
    run(tmp_path, "--input", source)
    written = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    run(tmp_path, "--input", source)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == written
    run(tmp_path, "--input", source, "--force")
    assert "tokenizing" in capsys.readouterr().out
    run(tmp_path, "--input", source, "--force", "--seed", 5)  # other settings: redone, not "nothing to do"
    run(tmp_path, "--input", source, "--seed", 6)
    assert "nothing to do" not in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_mid_run_leaves_nothing_accepted_and_rerun_completes(tmp_path):
    texts = synthetic_texts(3000, words_per_doc=300)
    source = write_parquet(tmp_path / "big.parquet", texts, row_group_size=100, token_count=False)
    out_dir = tmp_path / "out"
    args = [sys.executable, str(PREPARE), "--input", str(source), "--out_dir", str(out_dir), "--workers", "2"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp_train = out_dir / "train.bin.tmp"
    deadline = time.time() + 60
    while not (tmp_train.exists() and tmp_train.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "prepare.py finished before it could be killed: make the input bigger"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: the worker processes too
    proc.wait()
    with pytest.raises(FileNotFoundError):
        prepare.read_dataset_meta(out_dir)
    assert not (out_dir / "train.bin").exists() and not (out_dir / "meta.json").exists()
    run_script(*args[1:])
    assert_bins_hold(out_dir, texts)
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_one_and_two_workers_write_identical_bins(tmp_path):
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(400), row_group_size=50)
    for workers in (1, 2):
        prepare.main(["--input", str(source), "--out_dir", str(tmp_path / f"w{workers}"), "--workers", str(workers)])
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_null_texts_are_skipped_and_counted(tmp_path, capsys):
    texts = ["first", None, "third", None, "fifth"]
    meta = run(tmp_path, "--input", write_parquet(tmp_path / "nulls.parquet", texts), "--val_fraction", 0.3)
    assert meta["null_texts_skipped"] == 2
    assert "skipped 2 documents with a null text" in capsys.readouterr().out
    assert_bins_hold(tmp_path / "out", texts)


def bad_inputs(tmp_path):
    """(input path, words its one-line error must contain), one per kind of bad input."""
    (tmp_path / "notes.parquet").write_text("just some text, not a parquet")
    pq.write_table(pa.table({"body": ["x"], "url": ["u"]}), tmp_path / "no_text.parquet")
    pq.write_table(pa.table({"text": pa.array([], type=pa.string())}), tmp_path / "empty.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "numbers.parquet")
    (tmp_path / "no_shards").mkdir()
    return {
        "missing": (tmp_path / "absent.parquet", "no such file"),
        "not parquet": (tmp_path / "notes.parquet", "not a parquet file"),
        "no text column": (tmp_path / "no_text.parquet", "no 'text' column; it has: body, url"),
        "empty": (tmp_path / "empty.parquet", "empty (0 rows)"),
        "non-string text": (tmp_path / "numbers.parquet", "column 'text' holds int64, expected strings"),
        "glob matches nothing": (tmp_path / "nothing*.parquet", "matches no files"),
        "folder without parquet": (tmp_path / "no_shards", "the folder holds no .parquet files"),
    }


@pytest.mark.parametrize("case", ["missing", "not parquet", "no text column", "empty", "non-string text",
                                  "glob matches nothing", "folder without parquet"])
def test_bad_input_fails_in_one_line_with_no_outputs(tmp_path, case):
    path, message = bad_inputs(tmp_path)[case]
    proc = run_script(PREPARE, "--input", path, "--out_dir", tmp_path / "out", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert message in proc.stderr and path.name in proc.stderr
    assert not list((tmp_path / "out").iterdir())


def test_output_folder_not_writable(tmp_path):
    source = write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match="a_file/out: the output folder is not writable"):
        prepare.main(["--input", str(source), "--out_dir", str(tmp_path / "a_file" / "out")])
    if os.geteuid() != 0:  # root writes through permission bits, so this half only runs as a normal user
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(SystemExit, match="read_only: the output folder is not writable"):
            prepare.main(["--input", str(source), "--out_dir", str(read_only)])


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing_step", ["append_tokens", "write_json_atomically"])
def test_disk_full_leaves_no_outputs(tmp_path, monkeypatch, failing_step):
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(100), row_group_size=20)
    monkeypatch.setattr(prepare, failing_step, disk_full)  # the bins' writes, or meta.json after the bins' rename
    with pytest.raises(SystemExit, match="out: writing failed \\(No space left on device\\); partial outputs removed"):
        run(tmp_path, "--input", source)
    assert not list((tmp_path / "out").iterdir())


def test_read_meta_rejects_missing_and_inconsistent_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        prepare.read_dataset_meta(tmp_path)
    run(tmp_path, "--input", write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS))
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train.bin holds .* bytes but meta.json says"):
        prepare.read_dataset_meta(tmp_path / "out")


def test_bad_option_value_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--val_fraction 1.5: must be between 0 and 1"):
        prepare.main(["--input", "x.parquet", "--val_fraction", "1.5"])
