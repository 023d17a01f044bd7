"""Planning and watching a long run: the time left (kit/progress.py, on a fake clock), the max_hours budget,
samples printed at evaluations without disturbing training."""
import socket
import sys
import types

import pytest

from kit.checkpoint import load_checkpoint
from conftest import torchrun_train, train_args
from inprocess import read_metrics, run_inprocess
from kit.progress import Progress, duration, finish_time


class FakeClock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def run_iterations(progress, clock, seconds_each, n):
    for _ in range(n):
        clock.now += seconds_each
        progress.iteration_done()


def test_time_left_is_the_recent_rate_plus_the_evaluations_to_come():
    clock = FakeClock()
    progress = Progress(0, 100, eval_interval=50, clock=clock, window=4)
    assert progress.eta(0) is None  # nothing timed yet
    clock.now += 30.0
    progress.evaluation_done()  # the evaluation at iteration 0 took 30 s
    run_iterations(progress, clock, 10.0, 1)  # the first iteration (compilation, warm-up) is left out
    assert progress.eta(1) is None
    run_iterations(progress, clock, 2.0, 9)  # iterations 2..10 at 2 s
    # 90 iterations left at 2 s, and the evaluations at 50 and 100 at 30 s each
    assert progress.eta(10) == pytest.approx(90 * 2.0 + 2 * 30.0)
    run_iterations(progress, clock, 1.0, 4)  # only the recent window counts: the card got faster
    assert progress.seconds_per_iter() == pytest.approx(1.0)
    assert progress.elapsed() == pytest.approx(30 + 10 + 18 + 4)
    # at iteration 50 its own evaluation is still to come (it runs after the log line)
    assert progress.evaluations_left(50) == 2 and progress.evaluations_left(51) == 1
    assert progress.evaluations_left(100) == 1
    assert Progress(0, 105, eval_interval=50).evaluations_left(101) == 1  # the final one at max_iters


def test_a_resumed_run_continues_the_elapsed_time_and_the_rates():
    clock = FakeClock()
    first = Progress(0, 1000, eval_interval=100, clock=clock)
    clock.now += 20.0
    first.evaluation_done()
    run_iterations(first, clock, 3.0, 11)
    saved = first.state_dict()
    clock.now += 3600.0  # the machine was off for an hour: not run time
    resumed = Progress(11, 1000, eval_interval=100, saved=saved, clock=clock)
    assert resumed.elapsed() == pytest.approx(20 + 33)
    assert resumed.eta(11) == pytest.approx(first.eta(11))  # before this run has timed anything
    run_iterations(resumed, clock, 5.0, 1)  # its first iteration is left out, as every run's is
    assert resumed.seconds_per_iter() == pytest.approx(3.0)


def test_the_budget_stops_before_an_iteration_that_would_pass_it():
    clock = FakeClock()
    progress = Progress(0, 100, eval_interval=10, clock=clock)
    clock.now += 5.0
    progress.evaluation_done()
    run_iterations(progress, clock, 1.0, 4)  # 9 s of this session so far, 1 s per iteration
    assert not progress.next_would_pass(10.5, 4)  # iteration 5 ends at 10 s
    assert progress.next_would_pass(9.5, 4)
    assert not progress.next_would_pass(0, 4)  # 0 = no budget
    run_iterations(progress, clock, 1.0, 6)  # 15 s; the evaluation due at 10 (5 s) comes before iteration 11
    assert progress.next_would_pass(20.5, 10) and not progress.next_would_pass(21.5, 10)
    # the budget is this session's: the time of the run it resumed from does not count
    resumed = Progress(10, 100, eval_interval=10, saved={"elapsed_s": 1e6, "seconds_per_iter": 1.0}, clock=clock)
    assert not resumed.next_would_pass(3.0, 11)


def test_durations_and_finish_times_read_at_a_glance():
    assert [duration(s) for s in (7, 245, 11400, 190000)] == ["7s", "4m05s", "3h10m", "2d04h"]
    noon = 1_700_000_000  # any moment: the same day prints the time, another day its weekday too
    assert ":" in finish_time(noon, noon) and len(finish_time(noon, noon)) == 5
    assert len(finish_time(noon + 3 * 86400, noon)) == 9


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in for the wandb module that records what train.py logs."""
    logged = []
    module = types.SimpleNamespace(init=lambda **kw: None, finish=lambda: None,
                                   log=lambda record, step: logged.append((step, record)),
                                   Table=lambda columns, data: ("table", columns, data))
    monkeypatch.setitem(sys.modules, "wandb", module)
    return logged


def test_samples_and_a_time_budget_leave_training_exactly_as_without_them(token_dataset, tmp_path, fake_wandb):
    """Samples at every evaluation (their own generator, eval mode) and a max_hours stop with its resume give
    the same losses and learning rates as a plain run: with dropout on, a draw from the global RNG or a model
    left in eval mode would change every loss after the first evaluation."""
    run = ["--max_iters=4", "--eval_interval=3", "--dropout=0.1"]
    code, out, err = run_inprocess("train.py", *train_args(token_dataset, tmp_path / "plain", *run))
    assert code == 0, out + err
    watched = train_args(token_dataset, tmp_path / "watched", *run, "--sample_tokens=6", "--wandb_log=True")
    code, out, err = run_inprocess("train.py", *watched, "--max_hours=1e-9")  # stops once an iteration is timed
    assert code == 0, out + err
    assert "max_hours=1e-09 would pass in the next iteration: stopped at iteration 2" in out
    assert "continue with: python " in out and out.count("--init_from=resume") == 1
    assert load_checkpoint(tmp_path / "watched" / "ckpt.pt")["iter_num"] == 2
    stopped_at = read_metrics(tmp_path / "watched")[0][-1]
    code, out, err = run_inprocess("train.py", *watched, "--init_from=resume")
    assert code == 0, out + err
    assert "sample 2: " in out

    plain, plain_evals = read_metrics(tmp_path / "plain")
    watched_log, watched_evals = read_metrics(tmp_path / "watched")
    assert [(r["iter"], r["loss"], r["lr"]) for r in watched_log] == [(r["iter"], r["loss"], r["lr"]) for r in plain]
    assert [r["val_loss"] for r in watched_evals] == [r["val_loss"] for r in plain_evals]
    assert [r["iter"] for r in watched_evals] == [0, 3, 4]
    assert all(len(r["samples"]) == 2 and all(isinstance(t, str) for t in r["samples"]) for r in watched_evals)
    assert "samples" not in plain_evals[0]
    # the resumed run continues the clock and has an estimate from its first iteration on
    first_resumed = watched_log[2]
    assert first_resumed["elapsed_s"] > stopped_at["elapsed_s"] and first_resumed["eta_s"] is not None
    tables = [record["samples"] for step, record in fake_wandb if "samples" in record]
    assert tables[-1] == ("table", ["sample"], [[text] for text in watched_evals[-1]["samples"]])


# ---------------------------------------------------------------------------------------------
# --help: every setting, its value and its comment, as the script groups them


def help_keys(script, *args):
    code, out, err = run_inprocess(script, *args, "--help")
    assert code == 0 and err == "", err
    return out, {line.split("=", 1)[0].strip()[2:]: line for line in out.splitlines() if line.startswith("  --")}


def test_train_help_lists_every_setting_with_its_default_and_comment_in_its_group():
    from bench import train_defaults
    defaults = train_defaults()
    out, lines = help_keys("train.py")
    assert set(lines) == set(defaults)
    for key, value in defaults.items():
        assert lines[key].split()[0] == f"--{key}={value!r}"
    assert lines["max_hours"].split(None, 1)[1].startswith("time budget of this launch: save ckpt.pt")
    body = out.splitlines()
    assert body.index("model") < body.index(lines["n_layer"]) < body.index(lines["dropout"]) < body.index("AdamW")


def test_help_after_a_config_file_shows_that_files_values():
    out, lines = help_keys("train.py", "config/train_fineweb_cpu.py", "--max_iters=7")
    assert lines["n_layer"].split()[0] == "--n_layer=4" and lines["max_iters"].split()[0] == "--max_iters=7"
    assert lines["n_layer"] != help_keys("train.py")[1]["n_layer"]


@pytest.mark.parametrize("script", ["sample.py", "eval.py", "export.py", "bench.py"])
def test_every_script_help_lists_all_its_keys(script):
    """The keys --help prints are the ones the script accepts: those its unknown-key error lists."""
    code, _, err = run_inprocess(script, "--zzzz=1")
    assert code == 2 and "known keys: " in err
    known = set(err.strip().split("known keys: ")[1].split(", "))
    _, lines = help_keys(script)
    assert set(lines) == known
    assert sum(1 for line in lines.values() if len(line.split(None, 1)) > 1) >= len(known) // 2  # most commented


# ---------------------------------------------------------------------------------------------
# Windows, simulated: no Unix-only module at start, torch.compile tried


UNIX_ONLY = ["resource", "fcntl", "termios", "pwd", "grp"]


@pytest.mark.parametrize("script", ["train.py", "sample.py", "eval.py", "export.py", "bench.py"])
def test_no_script_needs_a_unix_only_module_to_start(script, monkeypatch):
    for name in UNIX_ONLY:  # None in sys.modules: `import name` raises ImportError, as on Windows
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(sys, "platform", "win32")
    code, out, err = run_inprocess(script, "--help")
    assert code == 0 and "usage: python" in out, err


def test_bench_reports_peak_memory_on_windows_without_resource(monkeypatch):
    from bench import peak_memory_text
    monkeypatch.setitem(sys.modules, "resource", None)
    monkeypatch.setattr(sys, "platform", "win32")
    fake_psutil = types.SimpleNamespace(Process=lambda: types.SimpleNamespace(
        memory_info=lambda: types.SimpleNamespace(peak_wset=3 * 2**30)))
    monkeypatch.setitem(sys.modules, "psutil", fake_psutil)
    assert peak_memory_text("cpu").startswith("peak RSS 3.00 GiB")


def test_torch_compile_is_tried_on_windows_and_falls_back_with_the_warning(monkeypatch, capsys):
    import torch
    from model import GPT, GPTConfig
    from kit import runtime
    from kit.runtime import compile_with_fallback
    # runtime's view of the platform only: torch itself cannot compile under a faked sys.platform
    monkeypatch.setattr(runtime, "sys", types.SimpleNamespace(platform="win32", stderr=sys.stderr))
    monkeypatch.setattr(torch, "compile", lambda m: ("compiled", m))  # importing inductor costs ~10 s
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))
    assert compile_with_fallback(model, lambda m: None) == ("compiled", model)

    def no_triton(m):
        raise RuntimeError("Cannot find a working triton installation")

    assert compile_with_fallback(model, no_triton) is model
    assert "torch.compile failed (RuntimeError: Cannot find a working triton installation)" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the peak-FLOPs table, by the names torch.cuda.get_device_name returns

def test_each_card_name_finds_its_own_row():
    """The driver's names carry vendor words, memory sizes and suffixes: a 3080 Ti is not a 3080, a laptop
    part with a desktop name is another chip (unknown), a memory size does not matter."""
    from kit.runtime import PEAK_TFLOPS, peak_flops
    assert peak_flops("NVIDIA GeForce RTX 3080 Ti", "bfloat16") == PEAK_TFLOPS["rtx 3080 ti"][0] * 1e12
    assert peak_flops("NVIDIA GeForce RTX 3080", "bfloat16") == PEAK_TFLOPS["rtx 3080"][0] * 1e12
    assert peak_flops("Tesla V100-SXM2-32GB", "float16") == PEAK_TFLOPS["v100 sxm2"][0] * 1e12
    assert peak_flops("NVIDIA A100 80GB PCIe", "tf32") == PEAK_TFLOPS["a100 pcie"][1] * 1e12
    assert peak_flops("NVIDIA H200", "float32") == PEAK_TFLOPS["h200"][2] * 1e12
    assert peak_flops("NVIDIA GeForce RTX 4090 Laptop GPU", "bfloat16") is None
    assert peak_flops("NVIDIA A40", "bfloat16") is None


def test_an_unknown_card_says_once_how_to_pass_peak_flops(monkeypatch):
    import torch
    from kit.runtime import device_peak_flops
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3060 Laptop GPU")
    peak, description = device_peak_flops("cuda", "bfloat16")
    assert peak is None and "--peak_flops=" in description and "\n" not in description


# ---------------------------------------------------------------------------------------------
# several machines: two torchrun "nodes" on this one, over loopback with gloo


@pytest.mark.slow
def test_two_nodes_train_as_one_node_with_two_ranks_and_resume_exactly(ddp_run, tmp_path):
    data_dir, one_dir, _ = ddp_run  # the same run on one node with two ranks

    def two_nodes(*extra):
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = ("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    "--rdzv_id=two-nodes", "--local_addr=127.0.0.1")
        for node in [torchrun_train(data_dir, tmp_path / "two", *extra, launcher=launcher, start=True)
                     for _ in range(2)]:
            out, _ = node.communicate(timeout=300)
            assert node.returncode == 0, out

    two_nodes("--max_hours=1e-9")  # both nodes agree to stop at iteration 2
    assert load_checkpoint(tmp_path / "two" / "ckpt.pt")["iter_num"] == 2
    two_nodes("--init_from=resume")
    one, two = read_metrics(one_dir)[0], read_metrics(tmp_path / "two")[0]
    assert [r["iter"] for r in two] == [1, 2, 3, 4, 5]
    # rank 0's loss, and the gradient norm that both ranks' batches and dropout masks went into
    assert [(r["loss"], r["grad_norm"]) for r in two] == [(r["loss"], r["grad_norm"]) for r in one]


def test_no_plan_line_once_the_run_has_ended(data_dir, tmp_path):
    """The plan comes after 5 timed iterations: a 5-iteration run has nothing left to plan by then."""
    from conftest import train_args
    from inprocess import run_inprocess
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "out", "--max_iters=5",
                                                                 "--lr_decay_iters=5", "--eval_interval=5"))
    assert code == 0 and "iter 5:" in stdout and "plan:" not in stdout, stdout + stderr
