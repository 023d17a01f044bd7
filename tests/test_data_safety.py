"""Nothing lost around the data: a prepare.py run that is refused, fails or is interrupted leaves the finished
dataset as it was; publishing never pulls a file from under a reader; a dead tokenizer worker, Ctrl-C, SIGTERM
or SIGHUP ends the run in one line, keeping the finished sources; killed outright, prepare.py takes its workers
with it."""
import errno
import json
import os
import signal

import numpy as np
import psutil
import pytest

from kit import atomic
from conftest import DiskFullAfter, prepare_fails_with
from kit.loader import TokenBatches, open_dataset
from test_prepare import (bins_on_a_small_disk, on_each_task, prepare, start_paused, still_running,
                          synthetic_texts, write_parquet)


def dataset_bytes(folder):
    return {name: (folder / name).read_bytes() for name in ("train.bin", "val.bin", "meta.json")}


@pytest.fixture
def finished_dataset(tmp_path):
    """out/ holding a finished dataset (train.bin, val.bin, meta.json) and the bytes it holds."""
    old = write_parquet(tmp_path / "old.parquet", synthetic_texts(40, seed=7))
    prepare.main(["--input", str(old), "--out_dir", str(tmp_path / "out"), "--workers", "1", "--val_fraction", "0.2"])
    return tmp_path / "out", dataset_bytes(tmp_path / "out")


def corrupt_second_row_group(path):
    """A parquet whose footer reads fine (so the run starts) but whose second row group is garbage."""
    import pyarrow.parquet as pq
    row_group = pq.ParquetFile(path).metadata.row_group(1)
    start = row_group.column(0).data_page_offset
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(b"\xff" * 64)
    return path


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failure", ["an empty train split", "corrupt row group", "disk full", "Ctrl-C"])
def test_a_refused_or_failed_run_leaves_the_finished_dataset_byte_identical(tmp_path, finished_dataset, monkeypatch,
                                                                            capsys, failure):
    out_dir, before = finished_dataset
    new = write_parquet(tmp_path / "new.parquet", synthetic_texts(60, seed=8), row_group_size=20)
    args = ["--input", str(new), "--out_dir", str(out_dir), "--workers", "1", "--val_fraction",
            "0.999999" if failure == "an empty train split" else "0.2"]  # refused after tokenizing, or not
    if failure == "corrupt row group":
        corrupt_second_row_group(new)
    if failure == "disk full":
        bins_on_a_small_disk(monkeypatch, room=0)
    if failure == "Ctrl-C":
        monkeypatch.setattr(prepare, "verify_split_file", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as exit_info:
        prepare.main(args)
    line = capsys.readouterr().err.strip()
    assert exit_info.value.code == (130 if failure == "Ctrl-C" else 2) and len(line.splitlines()) == 1, line
    assert line.endswith(f"the dataset already in {out_dir} is unchanged")
    assert "removed" not in line
    assert dataset_bytes(out_dir) == before
    assert prepare.read_dataset_meta(out_dir)["sources"][0]["name"].endswith("old.parquet")


def test_while_a_new_dataset_is_written_the_old_one_stays_readable(tmp_path, finished_dataset, monkeypatch):
    """A train.py started during a run into its data_dir still opens the finished dataset, and one already
    running keeps finding its bins under their names (it re-opens train.bin per batch)."""
    out_dir, before = finished_dataset
    new = write_parquet(tmp_path / "new.parquet", synthetic_texts(60, seed=8), row_group_size=20)
    seen_during_the_run = []
    on_each_task(monkeypatch, lambda task: seen_during_the_run.append(
        (dataset_bytes(out_dir), open_dataset(out_dir, 4)[0]["sources"][0]["name"])))
    prepare.main(["--input", str(new), "--out_dir", str(out_dir), "--workers", "1", "--val_fraction", "0.2"])
    assert seen_during_the_run and all(files == before and name.endswith("old.parquet")
                                       for files, name in seen_during_the_run)
    assert prepare.read_dataset_meta(out_dir)["sources"][0]["name"].endswith("new.parquet")


def test_publishing_renames_over_the_old_files_and_never_pairs_new_bins_with_old_meta(tmp_path, finished_dataset,
                                                                                     monkeypatch):
    """A reader holding an old bin open (a memmap, a file) reads the old bytes after the new dataset is in;
    a reader that opens the bins by path batch after batch (as train.py does) finds them at each rename;
    while the bins are being replaced there is no meta.json, so no reader can take new bins for old ones."""
    out_dir, before = finished_dataset
    old_memmap = np.memmap(out_dir / "train.bin", dtype=np.uint16, mode="r")
    old_file = open(out_dir / "val.bin", "rb")
    batches = TokenBatches(open_dataset(out_dir, 8)[1], 8, 4)
    meta_at_each_bin_rename = []
    real_replace = os.replace

    def replace_and_look(source, target):
        if str(target).endswith(".bin") and os.path.dirname(target) == str(out_dir):
            meta_at_each_bin_rename.append((out_dir / "meta.json").exists())
            batches.next_batch()  # FileNotFoundError if a bin were deleted before its new one is in
        real_replace(source, target)
        batches.next_batch()

    monkeypatch.setattr(os, "replace", replace_and_look)
    new = write_parquet(tmp_path / "new.parquet", synthetic_texts(60, seed=8))
    prepare.main(["--input", str(new), "--out_dir", str(out_dir), "--workers", "1", "--val_fraction", "0.2"])
    assert old_memmap.tobytes() == before["train.bin"] and old_file.read() == before["val.bin"]
    assert (out_dir / "train.bin").read_bytes() != before["train.bin"]
    assert meta_at_each_bin_rename == [False, False]
    old_file.close()


def as_in_a_terminal():
    """SIGHUP at its default in the child even when the suite runs under nohup, which ignores it."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["a worker is SIGKILLed", "Ctrl-C", "SIGTERM", "the terminal is closed"])
def test_a_dead_worker_or_a_stop_signal_ends_the_run_in_one_line_and_keeps_the_finished_sources(tmp_path, capsys,
                                                                                              stop):
    """With its first source done: a tokenizer worker killed (the out-of-memory killer's SIGKILL), Ctrl-C in
    the terminal (SIGINT to the whole process group), a scheduler's SIGTERM, a closed terminal (SIGHUP to the
    group). prepare.py stops its workers, its output ends with its one line and nothing else (no warning from
    a pool or multiprocessing's resource tracker), and the same command continues from the finished source."""
    sources = [write_parquet(tmp_path / f"{k}.parquet", synthetic_texts(40, seed=k), row_group_size=10)
               for k in range(2)]
    args = ["--input", *sources, "--out_dir", tmp_path / "out", "--val_fraction", 0.2, "--workers", 2]
    pause = tmp_path / "pause"
    proc, _ = start_paused(args, "source_done", pause, preexec_fn=as_in_a_terminal)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2
    if stop == "a worker is SIGKILLed":
        workers[0].kill()
        assert not still_running(workers[:1])
        pause.unlink()  # the run goes on, into the dead worker
    elif stop == "SIGTERM":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT if stop == "Ctrl-C" else signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=60)
    kept = f"the 1 finished source(s) are kept in {tmp_path / 'out' / 'prepare.work'}: the same command continues from there"
    status, line = {
        "a worker is SIGKILLed": (1, f"error: a tokenizer worker process died (killed, e.g. by the out-of-memory "
                                     f"killer, or crashed); {kept}; fewer --workers need less memory"),
        "Ctrl-C": (130, f"error: interrupted; {kept}"),
        "SIGTERM": (143, f"error: interrupted by SIGTERM; {kept}"),
        "the terminal is closed": (129, f"error: interrupted by SIGHUP; {kept}")}[stop]
    assert (proc.returncode, stdout.splitlines(), stderr.splitlines()) == (
        status, [f"tokenizing 2 source(s) with 2 worker(s) -> {tmp_path / 'out'}"], [line])
    assert not still_running(workers)
    prepare.main(list(map(str, [*args[:-1], 1])))  # the same command (one worker here: no processes to start)
    assert "continuing an unfinished run: 1 of 2 source(s) already done" in capsys.readouterr().out


@pytest.mark.slow
def test_prepare_killed_outright_takes_its_workers_with_it(tmp_path):
    """SIGKILL to prepare.py's main process alone (what the out-of-memory killer does) while a worker is in the
    middle of a task: every process prepare.py started ends within seconds, the busy worker included. On Linux
    the kernel ends them (their parent-death signal); the fallback elsewhere, a worker ending after its task
    when it finds the pipes closed, is not what this test sees."""
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(40), row_group_size=10)
    proc, waiting = start_paused(["--input", source, "--out_dir", tmp_path / "out", "--workers", 2], "tokenizing",
                                 tmp_path / "pause")
    started = psutil.Process(proc.pid).children(recursive=True)
    assert len(started) == 2 and waiting in [p.pid for p in started]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not still_running(started)


def test_a_message_cut_halfway_is_a_dead_worker_not_a_hang():
    """A worker killed while sending its result leaves half a message in its pipe: the reader gets EOFError
    (then prepare.py says the worker died) instead of waiting forever for the rest."""
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as reader:
        with open(write_end, "wb") as writer:
            writer.write((1000).to_bytes(8, "little") + b"x" * 10)
        with pytest.raises(EOFError):
            prepare.receive(reader)


def test_a_full_disk_at_start_is_one_line_and_leaves_no_lock(tmp_path, monkeypatch, capsys):
    """An out_dir on a disk with no room left: creating a file still works there, writing a byte does not.
    One line, exit status 2, and no empty prepare.lock left behind (the lock's holder line cannot be written
    either: lock_folder removes the file it could not fill)."""
    source = write_parquet(tmp_path / "docs.parquet", synthetic_texts(10))
    real_temporary_file = atomic.tempfile.TemporaryFile
    monkeypatch.setattr(atomic.tempfile, "TemporaryFile", lambda **kw: DiskFullAfter(real_temporary_file(**kw), 0))
    line = prepare_fails_with(capsys, "--input", source, "--out_dir", tmp_path / "out", "--workers", 1)
    assert line == f"error: {tmp_path / 'out'}: the output folder is not writable (No space left on device)"
    monkeypatch.undo()
    (tmp_path / "out").mkdir(exist_ok=True)
    monkeypatch.setattr(atomic.os, "write", disk_full)  # the disk fills up between the check and the lock
    with pytest.raises(OSError):
        atomic.lock_folder(tmp_path / "out", prepare.LOCK_NAME)
    monkeypatch.undo()
    assert list((tmp_path / "out").iterdir()) == []
    atomic.unlock_folder(atomic.lock_folder(tmp_path / "out", prepare.LOCK_NAME))  # and the folder is free


# -----------------------------------------------------------------------------
# every value a user can write: meta.json fields, parquet text types, pipes and devices, symlinked folders

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A folder prepare.py wrote (train.bin, val.bin, meta.json) and the parquet it came from."""
    folder = tmp_path_factory.mktemp("prepared")
    source = write_parquet(folder / "docs.parquet", synthetic_texts(40, seed=3))
    prepare.main(["--input", str(source), "--out_dir", str(folder / "data"), "--workers", "1", "--val_fraction", "0.2"])
    return folder / "data", source


META_FIELDS = [(), ("tokenizer",), ("dtype",), ("eot_placement",), ("adopted",), ("splits",), ("splits", "train"),
               ("splits", "train", "file"), ("splits", "train", "tokens"), ("splits", "val", "max_token_id"),
               ("sources",), ("sources", 0), ("val_split",), ("max_tokens",)]
JSON_VALUES = [None, True, 0, -1, 1.5, 10**30, float("nan"), "", "text", [], [1, "x"], {}, {"a": None}]


@pytest.mark.parametrize("field", META_FIELDS, ids=lambda field: ".".join(map(str, field)) or "the whole file")
def test_any_json_value_in_any_meta_json_field_works_or_is_one_line(prepared, tmp_path, field):
    """train.py's open_dataset and prepare.py's no-op check, with each field of meta.json set to each JSON type:
    the dataset is accepted (and batches come out of it) or refused with one line naming the problem."""
    import shutil
    data, source = prepared
    args = prepare.parse_args(["--input", str(source), "--val_fraction", "0.2"])
    sources = [prepare.local_source(source)]
    for value in JSON_VALUES:
        folder = shutil.copytree(data, tmp_path / "data", dirs_exist_ok=True)
        meta = json.loads((folder / "meta.json").read_text())
        if field:
            parent = meta
            for key in field[:-1]:
                parent = parent[key]
            parent[field[-1]] = value
        else:
            meta = value
        (folder / "meta.json").write_text(json.dumps(meta))
        try:
            _, train_path, _ = open_dataset(folder, 8)
            TokenBatches(train_path, 8, 2).next_batch()
        except (FileNotFoundError, ValueError) as e:  # what train.py, sample.py and eval.py turn into `error: ...`
            assert "\n" not in str(e) and "meta.json" in str(e), (value, e)
        prepare.already_done(folder, sources, args)  # a match or not (then it is prepared again), never a traceback


def write_text_column(path, texts, arrow_type):
    import pyarrow as pa
    import pyarrow.parquet as pq
    if arrow_type == "dictionary":
        column = pa.array(texts, pa.string()).dictionary_encode()
    elif arrow_type in ("binary", "large_binary"):
        column = pa.array([None if t is None else t.encode() for t in texts], getattr(pa, arrow_type)())
    else:
        column = pa.array(texts, getattr(pa, arrow_type)())
    pq.write_table(pa.table({"text": column}), path)
    return path


@pytest.mark.parametrize("arrow_type", ["string", "large_string", "string_view", "dictionary", "null", "binary",
                                        "large_binary"])
def test_every_arrow_string_type_in_the_text_column_works_or_is_one_line(tmp_path, capsys, arrow_type):
    texts = synthetic_texts(15, seed=4) + [None] + synthetic_texts(15, seed=5)
    reference = write_text_column(tmp_path / "reference.parquet", texts, "string")
    settings = ["--workers", "1", "--val_fraction", "0.3"]
    prepare.main(["--input", str(reference), "--out_dir", str(tmp_path / "reference"), *settings])
    if arrow_type == "null":
        texts = [None] * len(texts)
    source = write_text_column(tmp_path / "typed.parquet", texts, arrow_type)
    args = ["--input", source, "--out_dir", tmp_path / "out", *settings]
    if arrow_type in ("binary", "large_binary"):
        assert f"column 'text' holds {arrow_type}, expected strings (bytes, not text: decode it" in prepare_fails_with(
            capsys, *args)
    elif arrow_type == "null":
        assert "every text is null (31 rows): there is nothing to tokenize" in prepare_fails_with(capsys, *args)
    else:
        prepare.main(list(map(str, args)))
        for name in ("train.bin", "val.bin"):
            assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()


class NoHang:
    """A hang in Python's own open() fails the test after `seconds` instead of stalling the suite (opening a
    FIFO waits for a writer). Arrow's C++ open of a FIFO cannot be interrupted so: there the fix is that
    prepare.py never opens one."""

    def __init__(self, seconds=10):
        self.seconds = seconds

    def __enter__(self):
        def hang(*args):
            raise TimeoutError(f"still waiting after {self.seconds} s")
        self.previous = signal.signal(signal.SIGALRM, hang)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def pipes_and_devices(tmp_path):
    """(prepare.py arguments, words of its one-line error) for inputs and folders that are not what they seem."""
    os.mkfifo(tmp_path / "fifo.parquet")
    (tmp_path / "shards").mkdir()
    os.mkfifo(tmp_path / "shards" / "000.parquet")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "bins").mkdir()
    os.mkfifo(tmp_path / "bins" / "train.bin")
    return {
        "--input /dev/zero": (["--input", "/dev/zero"], "/dev/zero: not a regular file"),
        "--input a FIFO": (["--input", tmp_path / "fifo.parquet"], "fifo.parquet: not a regular file"),
        "a FIFO in an --input folder": (["--input", tmp_path / "shards"], "000.parquet: not a regular file"),
        "a FIFO matched by a glob": (["--input", tmp_path / "*.parquet"], "fifo.parquet: not a regular file"),
        "--out_dir /dev/null": (["--out_dir", "/dev/null"], "/dev/null: not a folder"),
        "--out_dir a symlink loop": (["--out_dir", tmp_path / "loop"], "loop: cannot resolve the folder"),
        "--adopt bins that are a FIFO": (["--adopt", tmp_path / "bins"], "train.bin: not a regular file"),
    }


@pytest.mark.parametrize("case", ["--input /dev/zero", "--input a FIFO", "a FIFO in an --input folder",
                                  "a FIFO matched by a glob", "--out_dir /dev/null", "--out_dir a symlink loop",
                                  "--adopt bins that are a FIFO"])
def test_pipes_devices_and_symlink_loops_end_in_one_line(tmp_path, capsys, prepared, case):
    args, message = pipes_and_devices(tmp_path)[case]
    if "--out_dir" not in args and "--adopt" not in args:
        args = [*args, "--out_dir", tmp_path / "out"]
    elif "--out_dir" in args:
        args = ["--input", prepared[1], *args]
    with NoHang():
        assert message in prepare_fails_with(capsys, *args, "--workers", 1)


@pytest.mark.parametrize("meta_json", ["/dev/zero", "a FIFO"])
def test_a_meta_json_that_is_a_pipe_or_device_is_refused_without_reading_it(prepared, tmp_path, meta_json):
    import shutil
    folder = shutil.copytree(prepared[0], tmp_path / "data")
    (folder / "meta.json").unlink()
    if meta_json == "a FIFO":
        os.mkfifo(folder / "meta.json")
    else:
        (folder / "meta.json").symlink_to("/dev/zero")
    with NoHang(), pytest.raises(ValueError, match="meta.json: not a regular file"):
        open_dataset(folder, 8)


def test_symlinked_folders_work(prepared, tmp_path, capsys):
    """prepare.py's --out_dir and --input, train.py's data_dir and out_dir, each a symlink to a folder."""
    from conftest import train_args
    from inprocess import run_inprocess
    (tmp_path / "real_data").mkdir()
    (tmp_path / "data").symlink_to(tmp_path / "real_data")
    (tmp_path / "inputs").symlink_to(prepared[1].parent)
    prepare.main(["--input", str(tmp_path / "inputs"), "--out_dir", str(tmp_path / "data"), "--workers", "1",
                  "--val_fraction", "0.2"])
    assert (tmp_path / "data").is_symlink() and (tmp_path / "real_data" / "meta.json").exists()
    prepare.main(["--input", str(prepared[1]), "--out_dir", str(tmp_path / "real_data"), "--workers", "1",
                  "--val_fraction", "0.2"])
    assert "nothing to do" in capsys.readouterr().out  # the same folder and inputs under their real names
    (tmp_path / "real_out").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real_out")
    code, _, stderr = run_inprocess("train.py", *train_args(tmp_path / "data", tmp_path / "out", "--max_iters=1",
                                                            "--block_size=8"))
    assert code == 0, stderr
    assert (tmp_path / "real_out" / "ckpt.pt").exists()
