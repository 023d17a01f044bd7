"""Runs that meet an unusual case end truthfully: an eval_only run leaves the run's history alone, plot.py says
what it drew, changed optimizer settings on resume are applied, another dataset on resume is refused unless
asked, Ctrl-C while compiling, out of memory and a closed stdout end in one line, and boundary values of
every setting work or end in one line."""
import hashlib
import json
import shutil

import pytest

import plot
from conftest import train_args
from kit.checkpoint import load_checkpoint
from inprocess import run_inprocess


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error_line(code, stderr, status=2):
    assert code == status, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    return stderr.strip()


# ---------------------------------------------------------------------------------------------
# eval_only is a look, not part of the run's history; plot.py says what it drew


def test_eval_only_leaves_the_runs_metrics_alone(cosine_run, data_dir, tmp_path):
    out = shutil.copytree(cosine_run, tmp_path / "out")
    before = sha(out / "metrics.jsonl")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4",
                                                                 "--init_from=resume", "--eval_only=True"))
    assert code == 0, stderr
    assert "step 4: train loss" in stdout  # the result is printed
    assert sha(out / "metrics.jsonl") == before
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "fresh", "--eval_only=True"))
    assert code == 0 and "step 0: train loss" in stdout, stderr
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_plot_says_when_a_resume_replaces_records(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [{"iter": i, "tokens": 100 * i, "loss": 5.0} for i in range(1, 13)]  # stopped at 12
    records += [{"iter": i, "tokens": 100 * i, "loss": 4.0} for i in range(9, 15)]  # resumed from 8
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, _ = plot.read_metrics(path)
    assert train == [(100 * i, 5.0) for i in range(1, 9)] + [(100 * i, 4.0) for i in range(9, 15)]
    assert capsys.readouterr().out == (
        f"note: {path}: the iteration goes back (12 -> 9: a resume from an older checkpoint, or a new run); "
        "drawn: the later run, in place of the earlier run's 4 record(s) from there on\n")
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    plot.read_metrics(path)
    assert capsys.readouterr().out == ""  # nothing replaced, nothing said


# ---------------------------------------------------------------------------------------------
# resuming with other optimizer settings applies them


def test_a_resume_applies_the_new_optimizer_settings_to_the_saved_moments():
    """AdamW's betas and weight decay, Muon's momentum: after loading a checkpoint's state, a step is the step
    of optimizers built with the new values and given the saved moments by plain torch (not the saved values)."""
    import copy
    import torch
    from kit.checkpoint import build_checkpoint, load_optimizer_by_name
    from conftest import random_model
    model = random_model(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64).train()
    x = torch.randint(64, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(model, optimizers):
        for optimizer in optimizers.values():
            optimizer.zero_grad()
        model(x, x)[1].backward()
        for optimizer in optimizers.values():
            optimizer.step()

    old = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu", "muon", 0.02, 0.95)
    step(model, old)
    saved = copy.deepcopy(build_checkpoint(model, old, torch.amp.GradScaler("cpu", enabled=False), ranks=[]))
    new_settings = (0.5, 1e-2, (0.5, 0.6), "cpu", "muon", 0.02, 0.5)
    resumed_model, reference_model = copy.deepcopy(model), copy.deepcopy(model)
    resumed = resumed_model.configure_optimizers(*new_settings)
    for key, optimizer in resumed.items():
        load_optimizer_by_name(optimizer, copy.deepcopy(saved[key]), resumed_model)
    reference = reference_model.configure_optimizers(*new_settings)
    for key, optimizer in reference.items():  # the same model and order: the saved state by position, new groups
        groups = [dict(saved_group, **{k: v for k, v in group.items() if k != "params"})
                  for saved_group, group in zip(saved[key]["param_groups"], optimizer.param_groups)]
        optimizer.load_state_dict({"state": saved[key]["state"], "param_groups": groups})
    assert [g["weight_decay"] for g in resumed["optimizer"].param_groups] == [0.5, 0.0]  # norms stay undecayed
    assert resumed["optimizer"].param_groups[0]["betas"] == (0.5, 0.6)
    assert resumed["muon"].param_groups[0]["momentum"] == 0.5
    step(resumed_model, resumed)
    step(reference_model, reference)
    for (name, p), q in zip(resumed_model.named_parameters(), reference_model.parameters()):
        assert torch.equal(p, q), name


def test_resume_with_a_new_weight_decay_and_betas_says_so_and_saves_them(cosine_run, data_dir, tmp_path):
    import torch
    out = shutil.copytree(cosine_run, tmp_path / "out")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=5", "--lr_decay_iters=4",
                                                                 "--eval_interval=5", "--init_from=resume",
                                                                 "--weight_decay=0.05", "--beta2=0.99"))
    assert code == 0, stderr
    assert "changed settings, applied from iteration 4 on: weight_decay 0.1 -> 0.05, beta2 0.95 -> 0.99\n" in stdout
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and groups[0]["betas"] == (0.9, 0.99)
    assert ckpt["config"]["weight_decay"] == 0.05 and ckpt["config"]["beta2"] == 0.99


# ---------------------------------------------------------------------------------------------
# resuming on other data is refused unless asked for


def test_resume_on_other_data_is_refused_unless_allowed(cosine_run, data_dir, tmp_path):
    from conftest import make_token_dataset
    out = shutil.copytree(cosine_run, tmp_path / "out")
    other = make_token_dataset(tmp_path / "other", n_train=30_000, seed=1)
    before = sha(out / "ckpt.pt")
    resume = ["--max_iters=5", "--lr_decay_iters=4", "--eval_interval=5", "--init_from=resume"]
    code, stdout, stderr = run_inprocess("train.py", *train_args(other, out, *resume))
    assert one_error_line(code, stderr) == (
        f"error: cannot resume {out / 'ckpt.pt'}: it was trained on other data ({data_dir}: train.bin 20,000 tokens "
        f"in 1 documents, val.bin 4,000 tokens in 1 documents) than {other} holds (train.bin 30,000 tokens in 1 "
        "documents, val.bin 4,000 tokens in 1 documents); resume with the run's own data, or pass "
        "--allow_new_data=True to continue on this one")
    assert sha(out / "ckpt.pt") == before and "model:" not in stdout
    code, stdout, stderr = run_inprocess("train.py", *train_args(other, out, *resume, "--eval_only=True"))
    assert code == 0 and "step 4: train loss" in stdout, stderr  # a look at other data saves nothing
    code, stdout, stderr = run_inprocess("train.py", *train_args(other, out, *resume, "--allow_new_data=True"))
    assert code == 0, stderr
    assert load_checkpoint(out / "ckpt.pt")["dataset_meta"]["splits"]["train"]["tokens"] == 30_000


# ---------------------------------------------------------------------------------------------
# Ctrl-C while torch.compile warms up


def exit_now(status):
    """os._exit for a test: this process must go on."""
    raise SystemExit(status)


def test_ctrl_c_during_the_compile_warm_up_stops_in_one_line(capsys, monkeypatch):
    """The signal arrives during the example step: the handler ends the process there and then, with no
    exception (one raised inside dynamo's C++ callbacks aborts the process), so the compiler's processes
    dying of the same Ctrl-C cannot turn it into a fallback to eager mode."""
    import os
    import signal
    import torch
    from kit import runtime
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the signal handling is under test, not inductor
    monkeypatch.setattr(runtime.os, "_exit", exit_now)
    stepped_on = []

    def step_interrupted(compiled):
        os.kill(os.getpid(), signal.SIGINT)
        stepped_on.append(True)  # not reached: the handler ended the process

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        runtime.compile_with_fallback(torch.nn.Linear(2, 2), step_interrupted)
    assert stop.value.code == 130 and not stepped_on and signal.getsignal(signal.SIGINT) is handler
    assert capsys.readouterr().err == ("error: SIGINT during torch.compile's warm-up: stopped before any training "
                                       "step, nothing saved\n")


def test_ctrl_c_while_the_checkpoint_to_resume_loads_stops_in_one_line(data_dir, cosine_run, tmp_path, monkeypatch):
    """Before the first iteration (here while the checkpoint loads) Ctrl-C ends the run at once: one line,
    exit 130, the checkpoint as it was, no KeyboardInterrupt traceback."""
    import os
    import signal
    from kit import guard  # where train.py's resume loads the checkpoint
    out = tmp_path / "out"
    shutil.copytree(cosine_run, out)
    before, real_load = (out / "ckpt.pt").read_bytes(), guard.load_checkpoint

    def load_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(guard, "load_checkpoint", load_interrupted)
    monkeypatch.setattr(guard.os, "_exit", exit_now)
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4",
                                                                 "--eval_interval=2", "--init_from=resume"))
    assert code == 130 and stderr == "error: SIGINT while starting: stopped before any training step, nothing saved\n"
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.slow
def test_ctrl_c_while_train_py_compiles(data_dir, tmp_path):
    """A real Ctrl-C from a terminal: SIGINT to the whole process group, the compiler's processes included,
    sent as soon as train.py says it compiles (the handler is in place by then). Where inside the warm-up it
    lands (dynamo's tracing, inductor's workers) depends on the machine: the contract holds at any point."""
    import os
    import signal
    import subprocess
    import sys
    from conftest import REPO_ROOT
    args = [a for a in train_args(data_dir, tmp_path / "out", "--max_iters=3") if a != "--compile=False"]
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--compile=True"], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("compiling the model"):
            os.killpg(proc.pid, signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr == "error: SIGINT during torch.compile's warm-up: stopped before any training step, nothing saved\n"
    assert not (tmp_path / "out" / "ckpt.pt").exists()


# ---------------------------------------------------------------------------------------------
# stdout closed: `train.py | head`, a dead tee


def run_with_closed_stdout(script, *args):
    """(exit status, stderr) of script with stdout a pipe whose reader is gone before the first line."""
    import os
    import subprocess
    import sys
    from conftest import REPO_ROOT
    reader, writer = os.pipe()
    os.close(reader)
    try:
        proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    finally:
        os.close(writer)
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_train_py_goes_on_and_saves_when_its_stdout_is_closed(data_dir, tmp_path):
    code, stderr = run_with_closed_stdout("train.py", *train_args(data_dir, tmp_path / "out", "--max_iters=2",
                                                                  "--eval_interval=2"))
    assert code == 0 and stderr == ""
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 2


@pytest.mark.slow
def test_sample_stream_stops_quietly_when_its_stdout_is_closed(cosine_run):
    code, stderr = run_with_closed_stdout("sample.py", f"--out_dir={cosine_run}", "--device=cpu", "--num_samples=1",
                                          "--stream=True", "--max_new_tokens=5", "--start=Hello")
    assert code == 0 and "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


# ---------------------------------------------------------------------------------------------
# out of memory: one line naming the setting to lower


def out_of_memory_line(monkeypatch, capsys, script, *args):
    """The line a user sees when script runs out of memory: the run raises, and Python hands the error
    to the sys.excepthook the script installed (run in-process, the test calls the hook itself)."""
    import sys
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored afterwards
    with pytest.raises((RuntimeError, MemoryError)) as error:
        run_inprocess(script, *args)
    capsys.readouterr()
    sys.excepthook(error.type, error.value, error.tb)
    return capsys.readouterr().err


@pytest.mark.parametrize("setting", ["--batch_size=1099511627776", "--n_embd=1048576"])
def test_train_py_out_of_memory_names_the_settings_to_lower(monkeypatch, capsys, data_dir, tmp_path, setting):
    """Real allocation failures: a batch of 2**40 windows, an embedding table of 50304 x 2**20 floats."""
    line = out_of_memory_line(monkeypatch, capsys, "train.py", *train_args(data_dir, tmp_path / "out", setting))
    assert line.startswith("error: out of memory (can't allocate memory: you tried to allocate ") and line.endswith(
        "): lower batch_size (a larger gradient_accumulation_steps keeps the tokens per iteration) or the model "
        "(n_embd, n_layer, block_size); on a GPU, python bench.py with the same settings and --fit_memory=free "
        "finds the batch_size that fits\n")
    assert line.count("\n") == 1 and not (tmp_path / "out" / "ckpt.pt").exists()


def test_sample_and_eval_out_of_memory_name_their_setting(monkeypatch, capsys, cosine_run, data_dir):
    import torch
    from kit import evaluation
    line = out_of_memory_line(monkeypatch, capsys, "sample.py", f"--out_dir={cosine_run}", "--device=cpu",
                              "--num_samples=1099511627776")
    assert line.startswith("error: out of memory (can't allocate memory") and line.endswith(
        "): lower num_samples (they are generated as one batch)\n")

    def cuda_out_of_memory(*args, **kwargs):  # what torch raises on a GPU
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB. GPU 0 has a total capacity")
    monkeypatch.setattr(evaluation, "evaluate_val", cuda_out_of_memory)
    line = out_of_memory_line(monkeypatch, capsys, "eval.py", f"--out_dir={cosine_run}", "--device=cpu",
                              "--eval_hellaswag=False", f"--data_dir={data_dir}")
    assert line == ("error: out of memory (CUDA out of memory. Tried to allocate 96.00 GiB. GPU 0 has a total "
                    "capacity): lower batch_size (val.bin windows or HellaSwag examples per forward pass)\n")


def test_an_error_other_than_out_of_memory_keeps_its_traceback(capsys):
    from kit.guard import out_of_memory_hook
    try:
        raise RuntimeError("shape mismatch")
    except RuntimeError as e:
        out_of_memory_hook("lower x")(RuntimeError, e, e.__traceback__)
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.endswith("RuntimeError: shape mismatch\n")


def test_out_of_memory_in_the_compile_warm_up_is_no_compile_failure(monkeypatch, capsys):
    """Eager mode would run out as well: the error goes on to the one line, with no 'torch.compile failed'."""
    import torch
    from kit.runtime import compile_with_fallback
    monkeypatch.setattr(torch, "compile", lambda model: model)

    def step(compiled):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError):
        compile_with_fallback(torch.nn.Linear(2, 2), step)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------
# boundary values of every setting: they work, or end in one line


def script_defaults(script):
    """{setting: default} of a script, read from its source: the plain assignments before configure()."""
    import ast
    from conftest import REPO_ROOT
    defaults = {}
    for node in ast.parse((REPO_ROOT / script).read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.targets[0],
                                                                                                 ast.Name):
            defaults[node.targets[0].id] = node.value.value
    return {k: v for k, v in defaults.items() if not k.isupper()}


def numeric_settings():
    for script in ("train.py", "sample.py", "eval.py"):
        for key, default in script_defaults(script).items():
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                yield script, key, default


@pytest.mark.parametrize("script, key, default", list(numeric_settings()))
def test_a_number_beyond_what_torch_takes_ends_in_one_line(script, key, default, tmp_path):
    """Integers from 2**63 on overflow torch's int64 (sizes, counts, seeds); 1e999 is inf; a rate of 1e300
    overflows the optimizers' float32 steps. Each once tracebacked somewhere in torch."""
    value, fragment = ((2**63, "integers must be in [-2**63, 2**63)") if isinstance(default, int) else
                       (1e300, "must be in [0, 1e30]") if key in ("learning_rate", "min_lr", "muon_lr") else
                       ("1e999", "must be a finite number"))
    code, stdout, stderr = run_inprocess(script, f"--out_dir={tmp_path}", f"--{key}={value}")
    line = one_error_line(code, stderr)
    assert line.startswith(f"error: {key}=") and fragment in line, line


def test_the_boundaries_of_the_seed_range_train(data_dir, tmp_path):
    for seed in (0, 2**63 - 1):  # numpy would refuse anything from 2**32 on; only torch is seeded
        code, _, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / str(seed), "--max_iters=1",
                                                                "--eval_interval=1", f"--seed={seed}"))
        assert code == 0, stderr


def test_extreme_temperatures_and_top_p_sample_instead_of_failing():
    """A temperature that is 0 in float32 (1e-300) is greedy, its limit; one beyond float32 (1e300) gives
    every kept token the same odds; a top_p that is 0 in float32 keeps the most likely token."""
    import torch
    from model import sample_next_token
    torch.manual_seed(0)
    logits = torch.randn(3, 64) * 5
    greedy = logits.argmax(dim=-1, keepdim=True)
    for kwargs in ({"temperature": 1e-300}, {"temperature": 1e-30}, {"top_p": 1e-300}):
        draws = [sample_next_token(logits, **kwargs, top_k=None if "top_p" in kwargs else 10) for _ in range(20)]
        assert all(torch.equal(d, greedy) for d in draws), kwargs
    draws = torch.cat([sample_next_token(logits[:1], temperature=1e300, top_k=8) for _ in range(400)]).flatten()
    assert set(draws.tolist()) == set(torch.topk(logits[0], 8).indices.tolist())  # all 8, none outside them
