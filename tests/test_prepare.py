"""data/fineweb/prepare.py: parquet in, train.bin/val.bin/meta.json out; each test is a usage example."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT, DiskFullAfter, prepare_fails_with, run_script
from kit.tokenizer import EOT_TOKEN, encode_documents, encode_documents_flat, get_encoding

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


def bins_on_a_small_disk(monkeypatch, room):
    """prepare.py's bins written through conftest's DiskFullAfter: `room` more bytes each, then ENOSPC.
    Returns the files as they are opened, so that a test can take their room away later."""
    files, real_open = [], open

    def open_bin(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if str(path).endswith(".bin") and mode == "ab":
            files.append(DiskFullAfter(f, room))
            return files[-1]
        return f

    monkeypatch.setattr(prepare, "open", open_bin, raising=False)  # shadows the builtin in prepare.py only
    return files


def on_each_task(monkeypatch, action):
    """action(number of the task, from 1) before prepare.py tokenizes each task (in-process: --workers 1)."""
    real_tokenize, calls = prepare.tokenize_task, []

    def tokenize(task):
        calls.append(task)
        action(len(calls))
        return real_tokenize(task)

    monkeypatch.setattr(prepare, "tokenize_task", tokenize)


def read_docs(bin_path):
    """The documents of a bin: the stream is EOT doc EOT doc ..., so split on EOT and drop the empty head."""
    ids = np.fromfile(bin_path, dtype=np.uint16)
    assert len(ids) and ids[0] == EOT_TOKEN
    starts = np.flatnonzero(ids == EOT_TOKEN)
    return [ENC.decode(ids[a + 1:b].tolist()) for a, b in zip(starts, list(starts[1:]) + [len(ids)])]


def expected_splits(texts_per_source, meta):
    """Train and val documents in order, by the rule in meta.json (recomputed here from its seed/threshold):
    document i of each source goes to val iff its score is below the threshold."""
    rule = meta["val_split"]
    split = {"train": [], "val": []}
    for k, texts in enumerate(texts_per_source):
        to_val = prepare.val_scores(rule["seed"], np.arange(len(texts))) < rule["threshold"]
        for text, is_val in zip(texts, to_val):
            if text is not None:
                split["val" if is_val else "train"].append(text)
    return split


def assert_bins_hold(out_dir, *texts_per_source):
    """The bins decode to exactly these documents (of one source, or several in order), each in one split,
    in order, with meta.json to match."""
    meta = prepare.read_dataset_meta(out_dir)
    expected = expected_splits(texts_per_source, meta)
    for split in ("train", "val"):
        docs = read_docs(out_dir / f"{split}.bin")
        assert docs == expected[split]
        assert meta["splits"][split]["documents"] == len(docs) > 0
        tokens = sum(len(ENC.encode_ordinary(d)) + 1 for d in docs)  # an independent count: + 1 EOT per doc
        assert meta["splits"][split]["tokens"] == tokens == (out_dir / f"{split}.bin").stat().st_size // 2
        assert meta["splits"][split]["max_token_id"] == int(np.fromfile(out_dir / f"{split}.bin", np.uint16).max())
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


def test_an_empty_val_split_is_refused(tmp_path, capsys):
    source = write_parquet(tmp_path / "tiny.parquet", ["one", "two", "three"])
    line = prepare_fails_with(capsys, "--input", source, "--out_dir", tmp_path / "out", "--val_fraction", 1e-9)
    assert "the val split came out empty (3 documents); change --val_fraction" in line
    assert not (tmp_path / "out" / "val.bin").exists()


def test_several_inputs_glob_and_folder_in_order(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    first, second = synthetic_texts(40, seed=1), synthetic_texts(30, seed=2)
    write_parquet(shards / "000.parquet", first, row_group_size=16)
    write_parquet(shards / "001.parquet", second, row_group_size=16)
    (shards / "notes.txt").write_text("not an input")
    for spec in (shards, shards / "*.parquet"):
        meta = run(tmp_path, "--input", spec, "--val_fraction", 0.2, "--force")
        assert_bins_hold(tmp_path / "out", first, second)
        assert [s["name"] for s in meta["sources"]] == [str(shards / "000.parquet"), str(shards / "001.parquet")]


class FakeHub:
    """The Hub as prepare.py sees it, offline: HfApi().list_repo_tree and hf_hub_download over
    {(repo, path in repo): local parquet}. Downloads are copied into a cache folder, as the real one does."""

    def __init__(self, tmp_path, files):
        self.files, self.cache, self.downloads, self.listings = files, tmp_path / "hub_cache", [], []
        self.cache.mkdir()

    def list_repo_tree(self, repo_id, path_in_repo, repo_type):
        from types import SimpleNamespace
        from huggingface_hub.utils import EntryNotFoundError
        assert repo_type == "dataset"
        self.listings.append((repo_id, path_in_repo))
        inside = [path for repo, path in self.files if repo == repo_id and path.startswith(path_in_repo + "/")]
        if not inside:
            raise EntryNotFoundError(f"404: {path_in_repo}")
        children = {path_in_repo + "/" + path[len(path_in_repo) + 1:].split("/")[0] for path in inside}
        entries = [SimpleNamespace(path=child) if child not in inside else  # a folder has no size
                   SimpleNamespace(path=child, size=self.files[repo_id, child].stat().st_size, blob_id="b-" + child)
                   for child in children]
        return reversed(sorted(entries, key=lambda entry: entry.path))  # the Hub promises no order

    def hf_hub_download(self, repo_id, repo_type, filename):
        self.downloads.append((repo_id, filename))
        copy = self.cache / f"{repo_id}/{filename}".replace("/", "--")
        copy.write_bytes(self.files[repo_id, filename].read_bytes())
        return str(copy)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Three shards of one FineWeb dump, a sample folder, FineWeb-Edu's sample; the listing cache in tmp_path."""
    import huggingface_hub
    texts = {name: synthetic_texts(40, seed=k) for k, name in enumerate(["a", "b", "c", "edu"])}
    files = {("HuggingFaceFW/fineweb", f"data/CC-MAIN-2013-20/000_0000{k}.parquet"): name
             for k, name in enumerate("abc")}
    files[("HuggingFaceFW/fineweb", "data/CC-MAIN-2024-10/000_00000.parquet")] = "a"
    files[("HuggingFaceFW/fineweb", "sample/10BT/000_00000.parquet")] = "b"
    files[("HuggingFaceFW/fineweb-edu", "sample/10BT/000_00000.parquet")] = "edu"
    hub = FakeHub(tmp_path, {key: write_parquet(tmp_path / f"{name}.parquet", texts[name], row_group_size=16)
                             for key, name in files.items()})
    hub.texts = texts
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub.cache))
    return hub


def test_default_source_is_the_first_file_of_the_default_dump(tmp_path, fake_hub):
    meta = run(tmp_path, "--val_fraction", 0.2)
    assert fake_hub.listings == [("HuggingFaceFW/fineweb", "data/CC-MAIN-2013-20")]
    assert fake_hub.downloads == [("HuggingFaceFW/fineweb", "data/CC-MAIN-2013-20/000_00000.parquet")]
    assert meta["sources"][0]["name"] == "hf://datasets/HuggingFaceFW/fineweb/data/CC-MAIN-2013-20/000_00000.parquet"
    assert meta["sources"][0]["blob_id"] == "b-data/CC-MAIN-2013-20/000_00000.parquet"
    assert_bins_hold(tmp_path / "out", fake_hub.texts["a"])


def test_shard_numbers_index_the_sorted_listing(tmp_path, fake_hub):
    run(tmp_path, "--shard", 1, "--val_fraction", 0.2)
    assert fake_hub.downloads[-1][1] == "data/CC-MAIN-2013-20/000_00001.parquet"  # not "001_00000.parquet"
    assert_bins_hold(tmp_path / "out", fake_hub.texts["b"])
    meta = run(tmp_path, "--shards", "0-2", "--val_fraction", 0.2)
    assert [name for _, name in fake_hub.downloads[-3:]] == [f"data/CC-MAIN-2013-20/000_0000{k}.parquet"
                                                             for k in range(3)]
    assert [s["documents"] for s in meta["sources"]] == [40, 40, 40]
    assert_bins_hold(tmp_path / "out", fake_hub.texts["a"], fake_hub.texts["b"], fake_hub.texts["c"])


def test_subsets_and_other_repos(tmp_path, fake_hub):
    run(tmp_path, "--subset", "sample-10BT", "--val_fraction", 0.2)
    assert fake_hub.downloads[-1] == ("HuggingFaceFW/fineweb", "sample/10BT/000_00000.parquet")
    assert_bins_hold(tmp_path / "out", fake_hub.texts["b"])
    run(tmp_path, "--repo", "HuggingFaceFW/fineweb-edu", "--subset", "sample-10BT", "--val_fraction", 0.2)
    assert fake_hub.downloads[-1] == ("HuggingFaceFW/fineweb-edu", "sample/10BT/000_00000.parquet")
    assert_bins_hold(tmp_path / "out", fake_hub.texts["edu"])


def test_unknown_dump_subset_or_shard_is_one_line_pointing_to_the_valid_ones(tmp_path, fake_hub, capsys):
    out = ["--out_dir", tmp_path / "out"]
    line = prepare_fails_with(capsys, *out, "--dump", "CC-MAIN-1999-01")
    assert line == ("error: HuggingFaceFW/fineweb has no folder data/CC-MAIN-1999-01; the valid names are the folders "
                    "at https://huggingface.co/datasets/HuggingFaceFW/fineweb/tree/main/data")
    assert prepare_fails_with(capsys, *out, "--subset", "sample-1T").endswith("/HuggingFaceFW/fineweb/tree/main/sample")
    assert "has 3 files (shards 0-2); --shard/--shards asks for 2-5" in prepare_fails_with(capsys, *out, "--shards", "2-5")
    assert "not a range A-B" in prepare_fails_with(capsys, *out, "--shards", "5-2")
    assert fake_hub.downloads == [] and not list((tmp_path / "out").iterdir())


def test_the_listing_is_cached_for_offline_runs(tmp_path, fake_hub, monkeypatch, capsys):
    import huggingface_hub

    class Offline:
        def list_repo_tree(self, *args, **kwargs):
            raise ConnectionError("no network")

    run(tmp_path, "--shard", 2, "--val_fraction", 0.2)
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    meta = run(tmp_path, "--shard", 2, "--val_fraction", 0.2, "--force")  # the listing from the first run
    assert meta["sources"][0]["name"].endswith("data/CC-MAIN-2013-20/000_00002.parquet")
    line = prepare_fails_with(capsys, "--out_dir", tmp_path / "out", "--dump", "CC-MAIN-2024-10")
    assert "cannot list HuggingFaceFW/fineweb/data/CC-MAIN-2024-10 (ConnectionError: no network)" in line
    assert "no earlier run cached its listing" in line and "--input" in line


def test_the_next_shard_downloads_while_this_one_is_tokenized(tmp_path, fake_hub, monkeypatch):
    import threading
    next_shard_asked = threading.Event()
    real_download = fake_hub.hf_hub_download

    def download(repo_id, repo_type, filename):
        if filename.endswith("000_00001.parquet"):
            next_shard_asked.set()
        return real_download(repo_id, repo_type, filename)

    def wait_for_shard_1(task):  # shard 0's first task waits for shard 1's download to start: it must
        if task == 1:
            assert next_shard_asked.wait(timeout=10), "shard 1 was not asked for while shard 0 was tokenized"

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    on_each_task(monkeypatch, wait_for_shard_1)
    run(tmp_path, "--shards", "0-1", "--val_fraction", 0.2)
    assert_bins_hold(tmp_path / "out", fake_hub.texts["a"], fake_hub.texts["b"])


def test_keep_parquet_false_deletes_each_shard_once_tokenized(tmp_path, fake_hub):
    run(tmp_path, "--shards", "0-1", "--val_fraction", 0.2)
    assert len(list(fake_hub.cache.iterdir())) == 2  # kept by default, in the Hugging Face cache
    run(tmp_path, "--shards", "0-2", "--val_fraction", 0.2, "--keep_parquet", "False")
    assert list(fake_hub.cache.iterdir()) == []
    assert_bins_hold(tmp_path / "out", fake_hub.texts["a"], fake_hub.texts["b"], fake_hub.texts["c"])
    run(tmp_path, "--shards", "0-2", "--val_fraction", 0.2, "--keep_parquet", "False")  # a no-op: no download
    assert len(fake_hub.downloads) == 5


def test_unreachable_network_points_to_input(tmp_path):
    # the real huggingface_hub, offline (conftest sets HF_HUB_OFFLINE=1) with an empty cache
    proc = run_script(PREPARE, "--out_dir", tmp_path / "out", check=False, env={"HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 2
    assert "cannot list HuggingFaceFW/fineweb/data/CC-MAIN-2013-20" in proc.stderr and "--input" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not list((tmp_path / "out").iterdir())


def test_missing_tokenizer_files_name_the_download_and_the_cache_variable(tmp_path):
    # no cached BPE files, and a proxy that refuses every connection: the download fails at once, online or not
    source = write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS)
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    proc = run_script(PREPARE, "--input", source, "--out_dir", tmp_path / "out", check=False, env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot load the gpt2 tokenizer: tiktoken downloads its BPE files" in proc.stderr
    assert "set TIKTOKEN_CACHE_DIR" in proc.stderr and "writing failed" not in proc.stderr
    assert not list((tmp_path / "out").iterdir())


def test_a_datasets_stream_gives_the_same_bins_as_the_parquet_path(tmp_path, small_corpus):
    pytest.importorskip("datasets")
    by_datasets = run(tmp_path, "--hf_dataset", "parquet", "--hf_data_files", small_corpus, "--out_dir", tmp_path / "d")
    by_pyarrow = run(tmp_path, "--input", small_corpus, "--out_dir", tmp_path / "p")
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "d" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()
    assert by_datasets["splits"] == by_pyarrow["splits"]
    assert by_datasets["sources"][0]["name"] == "hf-datasets://parquet/train"


def test_max_tokens_stops_after_the_batch_that_reaches_it(tmp_path):
    texts = synthetic_texts(100)
    source = write_parquet(tmp_path / "docs.parquet", texts, row_group_size=10)
    full = run(tmp_path, "--input", source, "--val_fraction", 0.1, "--out_dir", tmp_path / "full")
    cut = run(tmp_path, "--input", source, "--val_fraction", 0.1, "--max_tokens", 3000, "--out_dir", tmp_path / "cut")
    tokens = sum(split["tokens"] for split in cut["splits"].values())
    per_row_group = sum(len(ENC.encode_ordinary(t)) + 1 for t in texts[:10])
    assert 3000 <= tokens < 3000 + 2 * per_row_group and cut["max_tokens"] == 3000
    assert cut["sources"][0]["documents"] % 10 == 0 < cut["sources"][0]["documents"] < 100
    for name in ("train.bin", "val.bin"):  # the first row groups of the full run, exactly
        assert (tmp_path / "full" / name).read_bytes().startswith((tmp_path / "cut" / name).read_bytes())
    assert sum(split["tokens"] for split in full["splits"].values()) > tokens


def test_rerun_is_a_no_op_and_force_redoes(tmp_path, capsys):
    source = write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS)
    run(tmp_path, "--input", source, "--val_fraction", 0.5)
    written = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    run(tmp_path, "--input", source, "--val_fraction", 0.5)
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == written
    run(tmp_path, "--input", source, "--val_fraction", 0.5, "--force")
    assert "tokenizing" in capsys.readouterr().out
    run(tmp_path, "--input", source, "--val_fraction", 0.5, "--force", "--seed", 5)  # redone, not "nothing to do"
    run(tmp_path, "--input", source, "--val_fraction", 0.5, "--seed", 6)
    assert "nothing to do" not in capsys.readouterr().out


def start_paused(args, point, pause, **popen_args):
    """prepare.py started as a user starts it (its own process group), told by FINEWEB_GPT_TEST_PAUSE_AT to
    wait at `point` (prepare.pause_at); returns the process once it waits there, and the pid that waits."""
    env = dict(os.environ, FINEWEB_GPT_TEST_PAUSE_AT=f"{point}:{pause}")
    proc = subprocess.Popen([sys.executable, str(PREPARE), *map(str, args)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen_args)
    deadline = time.time() + 60
    while not (pause.exists() and pause.read_text().endswith("\n")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    return proc, int(pause.read_text())


def still_running(processes, seconds=5):
    """Those of processes still running after up to `seconds` (a zombie, dead but not reaped, is not)."""
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.time() + seconds
    while any(map(running, processes)) and time.time() < deadline:
        time.sleep(0.01)
    return [p for p in processes if running(p)]


@pytest.mark.slow
def test_sigkill_mid_run_leaves_nothing_accepted_and_rerun_continues(tmp_path):
    """prepare.py's main process SIGKILLed (as the out-of-memory killer does) at three points of a four-source
    run: after its first batch is written (the bins then hold more than the manifest counts), after one and
    after two finished sources. Each time its workers end with it and nothing train.py accepts is left; each
    next run continues where the manifest says, and the end result is byte for byte an uninterrupted run's."""
    texts = [synthetic_texts(200, seed=k) for k in range(4)]
    sources = [write_parquet(tmp_path / f"{k}.parquet", texts[k], row_group_size=100) for k in range(4)]
    out_dir, work, pause = tmp_path / "out", tmp_path / "out" / "prepare.work", tmp_path / "pause"
    args = ["--input", *sources, "--out_dir", out_dir, "--workers", 2]
    for point, done_before, done_after in (("batch_written", 0, 0), ("source_done", 0, 1), ("source_done", 1, 2)):
        proc, _ = start_paused(args, point, pause)
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) == 2 and (work / "train.bin").stat().st_size > 0
        os.kill(proc.pid, signal.SIGKILL)
        output = proc.communicate()[0]
        assert not still_running(workers)
        assert ("continuing an unfinished run: 1 of 4 source(s) already done" in output) == (done_before == 1)
        assert len(json.loads((work / "manifest.json").read_text())["done"]) == done_after
        with pytest.raises(FileNotFoundError):
            prepare.read_dataset_meta(out_dir)
        pause.unlink()
    finished = run_script(PREPARE, *args).stdout
    assert "continuing an unfinished run: 2 of 4 source(s) already done" in finished
    assert_bins_hold(out_dir, *texts)
    assert sorted(p.name for p in out_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    prepare.main(list(map(str, [*args[:-4], "--out_dir", tmp_path / "uninterrupted", "--workers", 1])))
    for name in ("train.bin", "val.bin"):
        assert (out_dir / name).read_bytes() == (tmp_path / "uninterrupted" / name).read_bytes()


@pytest.mark.parametrize("failure", ["disk full in the third source", "Ctrl-C in the third source",
                                     "Ctrl-C while publishing"])
def test_a_failed_run_keeps_its_finished_sources_and_the_same_command_continues(tmp_path, monkeypatch, capsys, failure):
    texts = [synthetic_texts(30, seed=k) for k in range(3)]
    sources = [write_parquet(tmp_path / f"{k}.parquet", texts[k], row_group_size=10) for k in range(3)]
    args = ["--input", *sources, "--out_dir", tmp_path / "out", "--workers", 1, "--val_fraction", 0.2]
    bins = bins_on_a_small_disk(monkeypatch, room=10**9)

    def fail_in_the_third_source(task):
        if task == 3 * 2 + 1:  # 3 row groups per source: the third source's first task
            if failure.startswith("Ctrl-C"):
                raise KeyboardInterrupt
            for file in bins:  # the disk fills up: the task's tokens do not fit
                file.room = 0

    def interrupt(*args):
        raise KeyboardInterrupt

    if failure.endswith("publishing"):
        monkeypatch.setattr(prepare, "verify_split_file", interrupt)
    else:
        on_each_task(monkeypatch, fail_in_the_third_source)
    if failure.startswith("disk"):
        line = prepare_fails_with(capsys, *args)
        assert line.endswith("writing failed (No space left on device); the 2 finished source(s) are kept in "
                             f"{tmp_path / 'out' / 'prepare.work'}: the same command continues from there")
    else:  # Ctrl-C: a clean stop, exit 130, one line saying what was kept
        with pytest.raises(SystemExit) as exit_info:
            prepare.main(list(map(str, args)))
        assert exit_info.value.code == 130
        kept = 3 if failure.endswith("publishing") else 2
        assert capsys.readouterr().err.strip() == (f"error: interrupted; the {kept} finished source(s) are kept in "
                                                   f"{tmp_path / 'out' / 'prepare.work'}: the same command "
                                                   f"continues from there")
    with pytest.raises(FileNotFoundError):
        prepare.read_dataset_meta(tmp_path / "out")
    monkeypatch.undo()
    prepare.main(list(map(str, args)))
    done = 3 if failure.endswith("publishing") else 2
    assert f"continuing an unfinished run: {done} of 3 source(s) already done" in capsys.readouterr().out
    assert_bins_hold(tmp_path / "out", *texts)
    prepare.main(list(map(str, [*args[:-6], "--out_dir", tmp_path / "uninterrupted", *args[-4:]])))
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "uninterrupted" / name).read_bytes()


def test_several_sources_are_the_concatenation_of_single_source_runs(tmp_path):
    texts = [synthetic_texts(50, seed=k) for k in range(3)]
    sources = [write_parquet(tmp_path / f"{k}.parquet", texts[k], row_group_size=16) for k in range(3)]
    settings = ["--workers", "1", "--val_fraction", "0.2"]  # val documents by the rule, not the empty-val fallback
    prepare.main(["--input", *map(str, sources), "--out_dir", str(tmp_path / "all"), *settings])
    for k, source in enumerate(sources):
        prepare.main(["--input", str(source), "--out_dir", str(tmp_path / f"single{k}"), *settings])
    for name in ("train.bin", "val.bin"):
        assert (tmp_path / "all" / name).read_bytes() == b"".join((tmp_path / f"single{k}" / name).read_bytes()
                                                                  for k in range(3))


@pytest.mark.parametrize("texts, message", [
    ([None, None, None], "every text is null (3 rows): there is nothing to tokenize"),
    (["the only document"], "a single document (1 rows, 0 null); a train and a val split need at least two"),
    ([None, "one document", None], "the input holds a single document (3 rows, 2 null)"),
])
def test_inputs_too_small_to_split_say_so(tmp_path, capsys, texts, message):
    source = write_parquet(tmp_path / "small.parquet", texts)
    line = prepare_fails_with(capsys, "--input", source, "--out_dir", tmp_path / "out", "--workers", 1)
    assert line.startswith(f"error: {source}: ") and message in line and "--val_fraction" not in line
    assert not list((tmp_path / "out").iterdir())


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
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # exactly one line
    assert message in proc.stderr and path.name in proc.stderr
    assert not list((tmp_path / "out").iterdir())


def test_output_folder_not_writable(tmp_path, capsys):
    source = write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS)
    (tmp_path / "a_file").write_text("")
    assert "a_file/out: the output folder is not writable" in prepare_fails_with(
        capsys, "--input", source, "--out_dir", tmp_path / "a_file" / "out")
    if os.geteuid() != 0:  # root writes through permission bits, so this half only runs as a normal user
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        line = prepare_fails_with(capsys, "--input", source, "--out_dir", read_only)
        assert "read_only: the output folder is not writable" in line


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_in_the_first_source_leaves_no_outputs(tmp_path, monkeypatch, capsys):
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(100), row_group_size=20)
    bins_on_a_small_disk(monkeypatch, room=1000)
    assert "out: writing failed (No space left on device); nothing was published" in prepare_fails_with(
        capsys, "--input", source, "--out_dir", tmp_path / "out", "--workers", 1)
    assert not list((tmp_path / "out").iterdir())


def test_disk_full_at_meta_json_moves_nothing_and_the_same_command_publishes(tmp_path, monkeypatch, capsys):
    import kit.tokenizer
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(100), row_group_size=20)
    args = ["--input", source, "--out_dir", tmp_path / "out", "--workers", 1, "--val_fraction", 0.2]
    monkeypatch.setattr(kit.tokenizer, "atomic_write", disk_full)  # publish_dataset writes meta.json before any move
    assert prepare_fails_with(capsys, *args).endswith("out: writing failed (No space left on device); the 1 finished "
                                              f"source(s) are kept in {tmp_path / 'out' / 'prepare.work'}: the same "
                                              f"command continues from there")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["prepare.work"]
    monkeypatch.undo()
    prepare.main([*map(str, args)])
    assert "continuing an unfinished run: 1 of 1 source(s) already done" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_read_meta_rejects_missing_and_inconsistent_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json not found"):
        prepare.read_dataset_meta(tmp_path)
    run(tmp_path, "--input", write_parquet(tmp_path / "docs.parquet", TRICKY_DOCS), "--val_fraction", 0.5)
    with open(tmp_path / "out" / "train.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="train.bin holds .* bytes but meta.json says"):
        prepare.read_dataset_meta(tmp_path / "out")


def test_bad_option_value_is_one_line(capsys):
    line = prepare_fails_with(capsys, "--input", "x.parquet", "--val_fraction", 1.5)
    assert "--val_fraction 1.5: must be between 0 and 1" in line


def test_second_run_into_the_same_folder_is_refused_and_the_first_stays_intact(tmp_path, monkeypatch):
    """Two prepare.py runs into one out_dir: the second is refused in one line and touches nothing (before
    the lock its clean-up deleted the first run's files); once the first is done, the folder is free again."""
    first_texts, second_texts = synthetic_texts(60, seed=1), synthetic_texts(50, seed=2)
    first = write_parquet(tmp_path / "first.parquet", first_texts, row_group_size=20)
    second = write_parquet(tmp_path / "second.parquet", second_texts)
    second_run = []

    def start_a_second_run(task):
        if task == 2:  # the first run is writing its bins: a second one starts into the same folder
            second_run.append(run_script(PREPARE, "--input", second, "--out_dir", tmp_path / "out", "--workers", 1,
                                         check=False))

    on_each_task(monkeypatch, start_a_second_run)
    run(tmp_path, "--input", first, "--val_fraction", 0.2)
    refused = second_run[0]
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "another prepare.py" in refused.stderr and "--out_dir" in refused.stderr
    assert_bins_hold(tmp_path / "out", first_texts)
    monkeypatch.undo()
    run(tmp_path, "--input", second, "--val_fraction", 0.2)
    assert_bins_hold(tmp_path / "out", second_texts)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]
