"""Nothing lost, ever: no command destroys a file, a ruined or damaged model is never saved or
loaded as if it were good, and every mistake ends in one true line."""
import hashlib
import shutil

import pytest
import torch

from kit.checkpoint import save_checkpoint
from conftest import DiskFullAfter, train_args
from inprocess import run_inprocess
from model import GPT, GPTConfig

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50304)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error_line(code, stderr, status=2):
    lines = stderr.strip().splitlines()
    assert code == status and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    return lines[0]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """out_dir holding a ckpt.pt of a tiny random model."""
    out = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    save_checkpoint({"model_args": TINY, "model": GPT(GPTConfig(**TINY)).state_dict(), "iter_num": 3}, out / "ckpt.pt")
    return out


# ---------------------------------------------------------------------------------------------
# data loss


@pytest.mark.parametrize("to, present", [("", "notes.txt"), (".", "config.json")])
def test_export_to_an_empty_value_or_the_current_folder_deletes_nothing(tiny_ckpt, tmp_path, monkeypatch, to,
                                                                        present):
    """`--to=$UNSET` is `--to=`, which must not name the current directory and its files; nor may `--to=.`
    with --force where the folder holds only files an export writes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / present).write_text("a week of work")
    code, _, stderr = run_inprocess("export.py", f"--out_dir={tiny_ckpt}", f"--to={to}", "--force=True")
    assert [p.name for p in tmp_path.iterdir()] == [present]
    assert f"to={to!r}" in one_error_line(code, stderr)


def test_weights_ruined_just_before_an_evaluation_are_never_saved(cosine_run, data_dir, tmp_path):
    """lr 1e30: iteration 5's loss is still finite (computed before its update), but the update ruins
    the weights, so the evaluation at iteration 5 measures a NaN val loss. That model was once saved
    over ckpt.pt, and the next step's error called ckpt.pt untouched."""
    out = shutil.copytree(cosine_run, tmp_path / "out")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt")}
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=8", "--lr_decay_iters=8",
                                                                 "--learning_rate=1e30", "--allow_lr_increase=True",
                                                                 "--eval_interval=5", "--init_from=resume"))
    assert {name: sha(out / name) for name in before} == before
    assert "iter 5: loss" in stdout  # the step before the evaluation was finite
    line = one_error_line(code, stderr, status=1)
    assert line.startswith("error: non-finite val loss at iteration 5")
    assert line.endswith(f"Last good checkpoint, untouched: {out / 'ckpt.pt'}")


def test_a_non_finite_weight_is_never_saved_even_when_every_loss_is_finite(data_dir, tmp_path):
    """An Inf in an embedding row no token uses (the padding rows 50257..) leaves every loss and gradient
    norm finite (with an untied lm_head): only the weights themselves show it."""
    out = tmp_path / "out"
    untied = train_args(data_dir, out, "--tie_embeddings=False", "--eval_interval=2", "--lr_decay_iters=4")
    assert run_inprocess("train.py", *untied, "--max_iters=2")[0] == 0
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    ckpt["model"]["transformer.wte.weight"][50300] = float("inf")
    save_checkpoint(ckpt, out / "ckpt.pt")
    before = sha(out / "ckpt.pt")
    code, stdout, stderr = run_inprocess("train.py", *untied, "--max_iters=4", "--init_from=resume")
    assert "step 4: train loss" in stdout and "val loss nan" not in stdout
    assert one_error_line(code, stderr, status=1).startswith("error: non-finite weights at iteration 4")
    assert sha(out / "ckpt.pt") == before


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
                # the settings of the checkpoint's model_args: only the file is at fault
                "train.py": train_args(data_dir, out, "--init_from=resume", "--block_size=32", "--bias=True")}
        for script, args in runs.items():
            code, _, stderr = run_inprocess(script, *args)
            line = one_error_line(code, stderr)
            assert str(path) in line and EXPECTED_DAMAGE[what] in line, (script, line)
        # export wrote no folder, train.py nothing but its out_dir lock
        assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "train.lock"]


@pytest.mark.parametrize("fails_in", ["write", "fsync"])
def test_full_disk_during_a_save_keeps_every_checkpoint_and_leaves_no_tmp(cosine_run, data_dir, tmp_path,
                                                                         monkeypatch, fails_in):
    from kit import atomic  # where checkpoints are written
    out = shutil.copytree(cosine_run, tmp_path / "out")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt")}
    if fails_in == "write":
        monkeypatch.setattr(atomic, "open", lambda path, mode, **kw: DiskFullAfter(open(path, mode, **kw), 100_000),
                            raising=False)
    else:  # buffered writes that only fail when flushed to the disk
        def fsync(fd):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(atomic.os, "fsync", fsync)
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=6", "--lr_decay_iters=6",
                                                                 "--eval_interval=2", "--init_from=resume",
                                                                 "--allow_lr_increase=True"))
    line = one_error_line(code, stderr, status=1)
    # the evaluation at 6 is the best so far: best.pt is written first, before ckpt.pt
    assert line.startswith(f"error: cannot write checkpoint {out / 'best.pt'} (") and " MiB free on its disk" in line
    assert {name: sha(out / name) for name in before} == before
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_a_prompt_file_that_is_not_utf8(tiny_ckpt, tmp_path):
    (tmp_path / "prompt.txt").write_bytes("café".encode("latin-1"))
    code, _, stderr = run_inprocess("sample.py", f"--out_dir={tiny_ckpt}", "--device=cpu",
                                    f"--start=FILE:{tmp_path / 'prompt.txt'}")
    assert one_error_line(code, stderr) == (f"error: prompt file '{tmp_path / 'prompt.txt'}' is not UTF-8 text "
                                            "(byte 3: b'\\xe9'); save it as UTF-8")


# ---------------------------------------------------------------------------------------------
# every setting checked at start, before any model is built or data read


# one invalid value of the right type for every train.py key that has one; a new key must be added
# here (test_every_train_key_is_swept), or to ANY_VALUE if every value of its type is fine
INVALID_TRAIN_VALUES = {
    "out_dir": "", "eval_interval": 0, "log_interval": 0, "eval_iters": 0, "init_from": "gpt3",
    "resume_from": "latest", "dataset": "", "data_dir": "/no/such/folder", "data_order": "sequential",
    "gradient_accumulation_steps": 0, "batch_size": 0, "block_size": 0, "n_layer": 0, "n_head": 0, "n_embd": 0,
    "dropout": 1.0, "mlp": "swiglu", "norm": "batchnorm", "learning_rate": -6e-4, "max_iters": -1,
    "weight_decay": -0.1, "beta1": 1.0, "beta2": -0.5, "grad_clip": -1.0, "lr_schedule": "linear",
    "warmup_iters": -1, "lr_decay_iters": -1, "min_lr": -1e-5, "cooldown_frac": 1.5, "device": "tpu",
    "dtype": "fp8", "peak_flops": -1.0, "seed": -1, "hellaswag_interval": -1, "hellaswag_limit": -1,
    "optimizer": "sgd", "muon_lr": -0.02, "muon_momentum": 1.0, "muon_weight_decay": -0.4, "logit_softcap": -15.0,
    "zero_init_head": True,  # with the default tied head
    "sample_tokens": -1, "max_hours": -1.0,
}
ANY_VALUE = {"eval_only", "allow_lr_increase", "overwrite", "wandb_log", "wandb_project", "wandb_run_name", "bias",
             "rotary", "qk_norm", "tie_embeddings", "zero_init_proj", "compile", "allow_new_data", "chunked_loss",
             "activation_checkpointing",
             "hellaswag_file", "sample_prompt",  # read only when hellaswag_interval > 0: test_eval checks it then
             "val_file"}  # checked with the data it replaces part of: test_a_missing_val_file_is_one_line


def test_every_train_key_is_swept():
    from bench import train_defaults
    assert set(INVALID_TRAIN_VALUES) | ANY_VALUE == set(train_defaults())


@pytest.mark.parametrize("key", sorted(INVALID_TRAIN_VALUES))
def test_an_invalid_value_of_any_train_key_stops_before_any_work(key, tmp_path):
    """No data exists at data_dir (a real run would read it first thing) and out_dir stays empty: the
    value is refused before the data is read or a model built."""
    value = INVALID_TRAIN_VALUES[key]
    args = {"data_dir": tmp_path / "no_data", "out_dir": tmp_path / "out", key: value}
    code, stdout, stderr = run_inprocess("train.py", *(f"--{k}={v}" for k, v in args.items()))
    line = one_error_line(code, stderr)
    assert key in line and (repr(value) in line or str(value) in line), line
    # nothing in out_dir but the lock taken before the data is read
    assert "model:" not in stdout and [p.name for p in tmp_path.glob("out/*")] in ([], ["train.lock"])


@pytest.mark.parametrize("args, message", [
    (["--batch_size=0"], "error: batch_size=0: must be at least 1\n"),
    (["--resume_from=latest"], "error: resume_from='latest': allowed are last, best, stable or a path to a .pt file\n"),
    (["--device=mps"], "error: device='mps' but MPS (Apple GPU) is not available here; use --device=cpu (or auto)\n"),
])
def test_invalid_values_in_a_real_process(tmp_path, args, message):
    """The same through the interpreter: the exit status and the whole stderr a user sees."""
    from conftest import run_script
    proc = run_script("train.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}", *args, check=False)
    assert proc.returncode == 2 and proc.stderr == message


@pytest.mark.parametrize("script, args, fragment", [
    ("sample.py", ["--num_samples=0"], "num_samples=0: must be at least 1"),
    ("sample.py", ["--top_k=-1"], "top_k=-1: must be >= 0"),
    ("sample.py", ["--temperature=-0.5"], "temperature=-0.5: must be >= 0"),
    ("sample.py", ["--ckpt=final"], "ckpt='final': allowed are last, best, stable"),
    ("sample.py", ["--device=mps"], "device='mps' but MPS"),
    ("export.py", ["--ckpt=final"], "ckpt='final': allowed are last, best, stable"),
    ("export.py", ["--to= "], "to=' ': must not be empty"),
    ("bench.py", ["--bench_iters=0"], "bench_iters=0: must be at least 1"),
    ("bench.py", ["--n_head=0"], "n_head=0: must be at least 1"),
    ("bench.py", ["--fit_memory=lots"], "fit_memory='lots'"),
])
def test_sample_export_and_bench_check_their_settings_before_loading(tmp_path, monkeypatch, script, args, fragment):
    """out_dir holds no checkpoint: the setting's own error comes first. Run from an empty folder: an
    hf_model/ a user exported into the project must not change what export.py says first."""
    monkeypatch.chdir(tmp_path)
    extra = ["--compile=False"] if script == "bench.py" else []
    code, stdout, stderr = run_inprocess(script, f"--out_dir={tmp_path}", *extra, *args)
    assert fragment in one_error_line(code, stderr) and "model:" not in stdout


@pytest.mark.parametrize("change, fragment", [
    ({"n_embd": "768"}, "n_embd='768' (a positive integer)"),
    ({"n_layer": 1.5}, "n_layer=1.5 (a positive integer)"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings='yes' (true or false)"),
    (None, "is not valid JSON"),
])
def test_a_hugging_face_folder_with_a_wrong_config_json(data_dir, tmp_path, change, fragment):
    import json
    from kit.hf import export_files
    folder = tmp_path / "hf"
    folder.mkdir()
    for name, data in export_files(TINY, GPT(GPTConfig(**TINY)).state_dict()).items():
        (folder / name).write_bytes(data)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}) if change else "{'n_embd': 32")
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "out", f"--init_from={folder}"))
    assert fragment in one_error_line(code, stderr)


# ---------------------------------------------------------------------------------------------
# messages that must be true


def test_eval_only_prints_no_plan_and_no_checkpoint_path(data_dir, tmp_path):
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "out", "--eval_only=True"))
    assert code == 0, stderr
    assert "step 0: train loss" in stdout and "planned:" not in stdout and "checkpoints:" not in stdout
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_new_run_into_an_out_dir_with_a_checkpoint_needs_overwrite(cosine_run, data_dir, tmp_path):
    out = shutil.copytree(cosine_run, tmp_path / "out")
    before = sha(out / "ckpt.pt")
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    assert one_error_line(code, stderr) == (
        f"error: out_dir holds {out / 'ckpt.pt'}, {out / 'best.pt'}: this run (init_from=scratch) would replace "
        "them or mix its own checkpoints with them; continue that run with --init_from=resume (and "
        "--resume_from=best or stable if it has no ckpt.pt), replace them with --overwrite=True, or use another out_dir")
    assert sha(out / "ckpt.pt") == before
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", "--eval_interval=2",
                                                                 "--overwrite=True"))
    assert code == 0, stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2


def test_metrics_tokens_stay_cumulative_when_a_resume_changes_the_batch_shape(data_dir, tmp_path):
    from inprocess import read_metrics
    out = tmp_path / "out"
    first = train_args(data_dir, out, "--max_iters=2", "--eval_interval=2", "--lr_decay_iters=4", "--batch_size=2")
    assert run_inprocess("train.py", *first)[0] == 0  # 2 x 2 x 16 = 64 tokens per iteration
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--eval_interval=2",
                                                            "--lr_decay_iters=4", "--batch_size=4",
                                                            "--init_from=resume"))  # 128 per iteration
    assert code == 0, stderr
    steps, evals = read_metrics(out)
    assert [(r["iter"], r["tokens"]) for r in steps] == [(1, 64), (2, 128), (3, 256), (4, 384)]
    assert [(r["iter"], r["tokens"]) for r in evals] == [(0, 0), (2, 128), (4, 384)]


def test_the_readme_pipeline_line_works_on_the_quick_start_model(tmp_path, monkeypatch):
    """The quick start's block_size is 128; transformers' pipeline generates 256 new tokens by default."""
    import re
    import subprocess
    import sys
    from conftest import REPO_ROOT
    pytest.importorskip("transformers")
    quick_start = {}
    exec((REPO_ROOT / "config" / "train_fineweb_cpu.py").read_text(), quick_start)
    args = dict(TINY, **{k: quick_start[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "bias")})
    save_checkpoint({"model_args": args, "model": GPT(GPTConfig(**args)).state_dict(), "iter_num": 150},
                    tmp_path / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    assert run_inprocess("export.py", f"--out_dir={tmp_path}", "--to=hf_model")[0] == 0
    readme = (REPO_ROOT / "docs" / "interop.md").read_text()
    readme_line = re.search(r'^ +(python -c "from transformers import pipeline.*)$', readme, re.MULTILINE).group(1)
    proc = subprocess.run(readme_line.replace("python", sys.executable, 1), shell=True, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("{'generated_text': ") and "<|endoftext|>The" in proc.stdout


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    from kit.atomic import atomic_write
    path = tmp_path / "meta.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]
    with atomic_write(path, "w", per_process=True) as f:
        f.write("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_sample_without_the_tokenizer_files_names_the_way_out(tiny_ckpt, monkeypatch):
    from kit import tokenizer

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tokenizer.tiktoken, "get_encoding", offline)
    code, _, stderr = run_inprocess("sample.py", f"--out_dir={tiny_ckpt}", "--device=cpu")
    line = one_error_line(code, stderr)
    assert "cannot load the gpt2 tokenizer" in line and "TIKTOKEN_CACHE_DIR" in line


def test_a_record_after_a_line_cut_by_a_crash_starts_a_line_of_its_own(tmp_path):
    import json
    from kit.atomic import append_line
    path = tmp_path / "metrics.jsonl"
    append_line(path, json.dumps({"iter": 1}) + "\n")
    append_line(path, json.dumps({"iter": 2}) + "\n")
    path.write_bytes(path.read_bytes()[:-5])  # the crash: the last record cut short
    append_line(path, json.dumps({"iter": 2, "resumed": True}) + "\n")
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"iter": 1} and json.loads(lines[-1]) == {"iter": 2, "resumed": True}
    assert len(lines) == 3 and path.read_text().endswith("\n")


def test_a_missing_val_file_is_one_line(data_dir, tmp_path):
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "out", "--val_file=nope.bin"))
    assert one_error_line(code, stderr) == ("error: val_file='nope.bin' not found: a token file (ours or an llm.c "
                                            "shard) or 'standard'") and "model:" not in stdout
