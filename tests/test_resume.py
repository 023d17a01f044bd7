"""Long runs that survive: exact resume (single process and DDP), data order, best vs last, crash-safe
saves, Ctrl-C/SIGTERM, continuing past the plan, the non-finite guard."""
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from kit import loader
from kit.checkpoint import load_checkpoint, save_checkpoint
from kit.guard import check_out_dir
from conftest import REPO_ROOT, make_token_dataset, torchrun_train, train_args
from inprocess import read_metrics, run_inprocess
from kit.loader import TokenBatches
from kit.schedule import cooldown_start, get_lr
from kit.tokenizer import EOT_TOKEN


def losses_by_iter(out_dir):
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir)[0]}


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# exact resume: the same loss, bit for bit, at every iteration after the stop


def train_inprocess(*args):
    code, stdout, stderr = run_inprocess("train.py", *args)
    assert code == 0, stdout + stderr
    return stdout


@pytest.mark.slow
def test_ctrl_c_saves_exits_0_and_resume_is_bit_exact(token_dataset, tmp_path):
    """cosine schedule, nanoGPT's random windows, dropout on. The stop is a real signal to a real
    process: Ctrl-C, with a scheduler's SIGTERM arriving at the same moment (not a 'second Ctrl-C')."""
    run = ["--max_iters=10", "--lr_decay_iters=10", "--eval_interval=100", "--dropout=0.1", "--data_order=random"]
    train_inprocess(*train_args(token_dataset, tmp_path / "full", *run))

    part = tmp_path / "part"
    proc = subprocess.Popen([sys.executable, "train.py", *train_args(token_dataset, part, *run)], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    output = ""
    for line in proc.stdout:
        output += line
        if line.startswith("iter 2:"):
            proc.send_signal(signal.SIGINT)
            proc.send_signal(signal.SIGTERM)
            break
    output += proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    stopped_at = load_checkpoint(part / "ckpt.pt")["iter_num"]
    assert 2 <= stopped_at < 10, output
    assert f"stopped at iteration {stopped_at}; checkpoint saved to {part / 'ckpt.pt'}" in output

    train_inprocess(*train_args(token_dataset, part, *run, "--init_from=resume"))  # a new process resumes
    full, resumed = losses_by_iter(tmp_path / "full"), losses_by_iter(part)
    assert sorted(resumed) == list(range(1, 11))  # no iteration repeated or skipped
    assert resumed == full  # bit-for-bit: floats from JSON compare exactly


def test_resume_from_stable_is_bit_exact_with_shuffled_epochs(tmp_path):
    """wsd schedule, shuffle order across an epoch boundary, dropout on: resuming from stable.pt
    (the wsd checkpoint before the cooldown) reproduces the uninterrupted run."""
    data = make_token_dataset(tmp_path / "data", n_train=300)  # 18 windows of 16: 4.5 iterations per epoch
    run = ["--lr_schedule=wsd", "--max_iters=8", "--cooldown_frac=0.5", "--eval_interval=3",
           "--data_order=shuffle", "--dropout=0.1"]
    train_inprocess(*train_args(data, tmp_path / "full", *run))
    stable = tmp_path / "full" / "stable.pt"
    assert load_checkpoint(stable)["iter_num"] == 3  # evals at 3, 6, 8; the cooldown starts at 4

    train_inprocess(*train_args(data, tmp_path / "part", *run, "--init_from=resume", f"--resume_from={stable}"))
    full, resumed = losses_by_iter(tmp_path / "full"), losses_by_iter(tmp_path / "part")
    assert sorted(resumed) == list(range(4, 9))
    assert resumed == {i: full[i] for i in range(4, 9)}
    epochs = {r["iter"]: r["epoch"] for r in read_metrics(tmp_path / "part")[0]}
    assert epochs[4] < 1 < epochs[8] < 2  # the epoch counter is logged and crossed 1 after the resume


@pytest.mark.slow
def test_ddp_two_gloo_ranks_resume_is_bit_exact(ddp_run, tmp_path):
    """torchrun with 2 CPU ranks: each rank's RNG and data position, and both optimizers' states (Muon, and
    AdamW for the embeddings, norms and head), come back from the checkpoint."""
    data_dir, full_dir, _ = ddp_run
    stable = full_dir / "stable.pt"
    ckpt = load_checkpoint(stable)
    assert ckpt["iter_num"] == 2 and len(ckpt["ranks"]) == 2 and {"optimizer", "muon"} <= set(ckpt)
    assert not torch.equal(ckpt["ranks"][0]["rng"]["torch"], ckpt["ranks"][1]["rng"]["torch"])  # per-rank dropout
    torchrun_train(data_dir, tmp_path / "part", "--init_from=resume", f"--resume_from={stable}")
    full, resumed = read_metrics(full_dir)[0], read_metrics(tmp_path / "part")[0]
    assert [r["iter"] for r in resumed] == [3, 4, 5]
    # rank 0's loss, and the gradient norm that both ranks' batches and dropout masks went into
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in full[2:]]


def test_grad_scaler_state_survives_a_weights_only_checkpoint(tmp_path):
    """fp16 runs store the GradScaler (scale, growth tracker) with the checkpoint; this CPU machine cannot
    train in fp16, so this checks the format: the state comes back whole through weights_only=True."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    for grad in (1.0, float("inf"), 1.0):  # one overflow: the scale halves, the growth tracker restarts
        optimizer.zero_grad()
        scaler.scale((weight * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    save_checkpoint({"model_args": {}, "model": {}, "iter_num": 3, "scaler": scaler.state_dict()}, tmp_path / "c.pt")
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(tmp_path / "c.pt")["scaler"])
    assert restored.state_dict() == scaler.state_dict() and restored.get_scale() == 512.0


def assert_resumes_mid_epoch(path, block_size, batch_size, data_order, seed):
    """A loader's state taken 13 batches in (mid-epoch: 10 batches per epoch) gives the same batches next."""
    a = TokenBatches(path, block_size, batch_size, data_order, seed=seed)
    for _ in range(13):
        a.next_batch()
    b = TokenBatches(path, block_size, batch_size, data_order, seed=seed)
    b.load_state_dict(a.state_dict())
    for _ in range(10):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    assert a.epochs_done() == b.epochs_done() == pytest.approx(2.3)


# ---------------------------------------------------------------------------------------------
# data order


def test_shuffle_order_is_disjoint_across_ranks_and_covers_every_window_each_epoch(tmp_path):
    data = make_token_dataset(tmp_path / "data", n_train=32 * 40 + 1)  # exactly 40 windows of 32
    path = data / "train.bin"
    ranks = [TokenBatches(path, 32, 4, "shuffle", seed=7, rank=r, world_size=2) for r in range(2)]
    tokens = torch.from_numpy(__import__("numpy").fromfile(path, dtype="uint16").astype("int64"))

    def window_index(row):  # which aligned window a row is
        start = int(torch.nonzero((tokens.unfold(0, 32, 32) == row).all(dim=1))[0])
        return start

    epochs = []
    for _ in range(2):
        seen = [[window_index(row) for _ in range(5) for row in b.next_batch()[0]] for b in ranks]
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        assert sorted(seen[0] + seen[1]) == list(range(40))  # every window once per epoch
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    assert ranks[0].epochs_done() == 2.0 and ranks[1].epochs_done() == 2.0

    assert_resumes_mid_epoch(path, 32, 4, "shuffle", seed=7)


def document_bin(path, lengths, block_size):
    """A token file of documents of these lengths, each its EOT then ids 1000 + its index, 1, 2, ...:
    the id after a row's EOT names its document. Returns {document index: start position}."""
    tokens, starts = [], {}
    for i, length in enumerate(lengths):
        starts[i] = len(tokens)
        tokens += [EOT_TOKEN, 1000 + i] + list(range(1, length - 1))
    np.array(tokens, dtype=np.uint16).tofile(path)
    return starts


def test_document_rows_start_at_document_starts_disjoint_across_ranks_each_epoch(tmp_path):
    # 20 documents, shorter and longer than a row; a last one too close to the end of the file to fill a row
    lengths = [3, 40, 9, 16, 17, 5, 60, 2, 33, 8] * 2 + [12]
    path = tmp_path / "train.bin"
    starts = document_bin(path, lengths, 16)
    tokens = np.fromfile(path, dtype=np.uint16)
    ranks = [TokenBatches(path, 16, 2, "document", seed=5, rank=r, world_size=2) for r in range(2)]
    epochs = []
    for _ in range(2):
        seen = [[], []]
        for r, batches in enumerate(ranks):
            for _ in range(5):  # 20 documents / 2 ranks / batch 2
                x, y = batches.next_batch()
                for row, target in zip(x, y):
                    doc = int(row[1]) - 1000  # the row begins with its document's EOT and first id
                    assert row[0] == EOT_TOKEN and 0 <= doc < 20
                    assert torch.equal(row, torch.from_numpy(tokens[starts[doc]:starts[doc] + 16].astype(np.int64)))
                    assert torch.equal(target[:-1], row[1:])  # runs on into the next document when short
                    seen[r].append(doc)
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        assert sorted(seen[0] + seen[1]) == list(range(20))  # every document once per epoch, never the last
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    assert ranks[0].epochs_done() == ranks[1].epochs_done() == 2.0

    assert_resumes_mid_epoch(path, 16, 2, "document", seed=5)


def test_document_starts_are_found_across_read_chunks(tmp_path, monkeypatch):
    path = tmp_path / "train.bin"
    starts = document_bin(path, [7, 3, 12, 5, 9, 4, 30, 6], 8)
    expected = [s for s in starts.values() if s + 8 + 1 <= 76]  # 76 tokens: a row and its last target fit
    for chunk in (1, 3, 5, 7, 1 << 20):  # chunk edges before, on and after an EOT
        monkeypatch.setattr(loader, "SCAN_CHUNK", chunk)
        assert loader.document_starts(path, 8).tolist() == expected
    # the last start kept leaves exactly a row and its last target: 70 + 5 + 1 = 76 tokens
    assert loader.document_starts(path, 5).tolist()[-1] == 70 and loader.document_starts(path, 6).tolist()[-1] == 40
    with pytest.raises(ValueError, match="5 document starts cannot fill one batch of 3 on each of 2 ranks"):
        TokenBatches(path, 40, 3, "document", rank=0, world_size=2)


# ---------------------------------------------------------------------------------------------
# runs shared by the tests below (in-process: no interpreter start-up per run)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


WSD = ["--lr_schedule=wsd", "--cooldown_frac=0.5", "--eval_interval=2"]


@pytest.fixture(scope="module")
def wsd_run(data_dir, tmp_path_factory):
    """A finished wsd run that planned 8 iterations: the cooldown runs over iterations 4..7."""
    out = tmp_path_factory.mktemp("wsd") / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, *WSD, "--max_iters=8"))
    assert code == 0, stdout + stderr
    return out


# ---------------------------------------------------------------------------------------------
# best and last


def test_a_save_serialises_once_and_writes_the_same_bytes_to_every_file(tmp_path, monkeypatch):
    calls = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: calls.append(1) or real_save(*args, **kwargs))
    state = {"model_args": {}, "model": {"w": torch.arange(6.0)}, "iter_num": 3}
    save_checkpoint(state, tmp_path / "best.pt", tmp_path / "stable.pt", tmp_path / "ckpt.pt")
    assert len(calls) == 1
    files = [(tmp_path / name).read_bytes() for name in ("best.pt", "stable.pt", "ckpt.pt")]
    assert files[0] == files[1] == files[2]
    assert torch.equal(load_checkpoint(tmp_path / "ckpt.pt")["model"]["w"], torch.arange(6.0))  # checksum holds


def test_ckpt_is_latest_and_best_is_lowest_val_loss(wsd_run):
    evals = read_metrics(wsd_run)[1]
    last, best, stable = (load_checkpoint(wsd_run / name) for name in ("ckpt.pt", "best.pt", "stable.pt"))
    assert last["iter_num"] == 8
    lowest = min((r for r in evals if r["iter"] > 0), key=lambda r: r["val_loss"])  # iteration 0 is not saved
    assert (best["iter_num"], best["val_loss"]) == (lowest["iter"], lowest["val_loss"])
    assert last["best_val_loss"] == lowest["val_loss"]
    assert stable["iter_num"] == cooldown_start(8, 0.5) == 4  # the last evaluation before the cooldown


def test_resume_from_stable_never_replaces_a_better_best(wsd_run, data_dir, tmp_path):
    """stable.pt remembers the best of its own time; best.pt on disk may be better (the cooled-down model)."""
    out = copy_run(wsd_run, tmp_path / "out")
    best = load_checkpoint(out / "best.pt")
    best["val_loss"] = best["best_val_loss"] = best["val_loss"] - 1.0  # pretend it is far better
    save_checkpoint(best, out / "best.pt")
    before = sha(out / "best.pt")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, *WSD, "--max_iters=12",
                                                                 "--init_from=resume", "--resume_from=stable"))
    assert code == 0, stdout + stderr
    assert sha(out / "best.pt") == before
    assert load_checkpoint(out / "ckpt.pt")["best_val_loss"] == best["val_loss"]


def test_sample_picks_last_or_best(wsd_run):
    best_iter = load_checkpoint(wsd_run / "best.pt")["iter_num"]
    for which, name, iteration in (("last", "ckpt.pt", 8), ("best", "best.pt", best_iter)):
        code, stdout, stderr = run_inprocess("sample.py", f"--out_dir={wsd_run}", f"--ckpt={which}", "--device=cpu",
                                             "--num_samples=1", "--max_new_tokens=3")
        assert code == 0, stderr
        assert f"sampling from {wsd_run / name} (iteration {iteration})" in stderr


# ---------------------------------------------------------------------------------------------
# crash-safe saving and signals


SAVE_FOREVER = """
import sys, torch
from kit.checkpoint import save_checkpoint
path, version = sys.argv[1], 0
while True:
    version += 1
    save_checkpoint({"model": torch.full((4_000_000,), float(version))}, path)
    print(version, flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_FOREVER, str(path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint exists
        while not os.path.exists(f"{path}.tmp.{proc.pid}") and proc.poll() is None:  # the next save is under way
            pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    model = torch.load(path, weights_only=True)["model"]  # complete and readable
    assert model.numel() == 4_000_000 and bool((model == model[0]).all()) and model[0] >= 1
    assert os.path.exists(f"{path}.tmp.{proc.pid}")  # its half-written file: the next run into out_dir removes it
    check_out_dir(str(tmp_path), "resume", False, lock=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "train.lock"]


# ---------------------------------------------------------------------------------------------
# training past the plan


LR = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=2)  # as in TINY_TRAIN_ARGS


def lrs(config, iterations):
    return [get_lr(it, config) for it in iterations]


def test_cosine_past_the_plan_continues_at_min_lr():
    planned = dict(lr_schedule="cosine", **LR, lr_decay_iters=6000, max_iters=6000, cooldown_frac=0.2)
    extended = dict(planned, max_iters=12000)
    assert lrs(extended, range(6000)) == lrs(planned, range(6000))
    assert set(lrs(extended, range(6000, 12000))) == {1e-4}


def test_wsd_stable_phase_extends_on_resume_with_a_larger_max_iters():
    planned = dict(lr_schedule="wsd", **LR, lr_decay_iters=0, max_iters=6000, cooldown_frac=0.2)
    extended = dict(planned, max_iters=12000)
    assert cooldown_start(6000, 0.2) == 4800 and cooldown_start(12000, 0.2) == 9600
    # identical up to the old cooldown: resuming from stable.pt (iteration <= 4800) changes nothing so far
    assert lrs(extended, range(4801)) == lrs(planned, range(4801))
    assert set(lrs(extended, range(2, 9601))) == {1e-3}  # stable, now until 9600
    cooldown = lrs(extended, range(9600, 12000))
    assert all(a > b for a, b in zip(cooldown, cooldown[1:]))  # linear decay...
    assert cooldown[-1] == pytest.approx(1e-4 + (1e-3 - 1e-4) / 2400)  # ...reaching min_lr at max_iters
    assert get_lr(5999, planned) == pytest.approx(1e-4 + (1e-3 - 1e-4) / 1200)  # the plan, cooled 1200
    with pytest.raises(ValueError, match="cooldown_frac=1.5"):
        get_lr(0, dict(planned, cooldown_frac=1.5))


def test_the_schedule_reads_a_checkpoint_config(cosine_run):
    config = load_checkpoint(cosine_run / "ckpt.pt")["config"]
    planned = dict(lr_schedule="cosine", **LR, lr_decay_iters=4, max_iters=4, cooldown_frac=0.2)
    assert lrs(config, range(6)) == lrs(planned, range(6))


def test_cosine_resume_with_larger_max_iters_runs_on_at_min_lr(cosine_run, data_dir, tmp_path):
    out = copy_run(cosine_run, tmp_path / "out")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=6", "--lr_decay_iters=4",
                                                                 "--eval_interval=2", "--init_from=resume"))
    assert code == 0, stdout + stderr
    lrs = {r["iter"]: r["lr"] for r in read_metrics(out)[0]}
    assert lrs[5] == lrs[6] == 1e-4


def test_resume_refuses_an_accidental_jump_back_up_in_lr(cosine_run, wsd_run, data_dir, tmp_path):
    # cosine: a longer lr_decay_iters would put iteration 4 back near the peak
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, copy_run(cosine_run, tmp_path / "c"),
                                                            "--max_iters=8", "--lr_decay_iters=8", "--init_from=resume"))
    assert code == 2
    assert stderr.startswith("error: resuming at iteration 4 would raise the learning rate from 0.0001")
    assert "--allow_lr_increase=True" in stderr and len(stderr.strip().splitlines()) == 1
    # wsd: ckpt.pt is cooled down; extending from it would jump to the peak (stable.pt is the way)
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, copy_run(wsd_run, tmp_path / "w"), *WSD,
                                                            "--max_iters=12", "--init_from=resume"))
    assert code == 2 and "would raise the learning rate" in stderr and "--resume_from=stable" in stderr


def test_wsd_resume_from_stable_with_larger_max_iters_moves_the_cooldown(wsd_run, data_dir, tmp_path):
    out = copy_run(wsd_run, tmp_path / "out")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, *WSD, "--max_iters=12",
                                                                 "--init_from=resume", "--resume_from=stable"))
    assert code == 0, stdout + stderr
    assert "resuming from" in stdout and "at iteration 4, lr 0.001" in stdout
    new = dict(lr_schedule="wsd", **LR, lr_decay_iters=600000, max_iters=12, cooldown_frac=0.5)
    resumed = read_metrics(out)[0][8:]  # the first run logged iterations 1..8
    assert [r["iter"] for r in resumed] == list(range(5, 13))
    assert [r["lr"] for r in resumed] == [get_lr(r["iter"] - 1, new) for r in resumed]
    assert [r["lr"] for r in resumed[:2]] == [1e-3, 1e-3]  # still stable: the cooldown now starts at 6


# ---------------------------------------------------------------------------------------------
# non-finite guard


def test_non_finite_loss_stops_and_leaves_the_last_checkpoint_untouched(cosine_run, data_dir, tmp_path):
    """A learning rate of 1e30 (a real way to diverge) makes the weights overflow within two steps."""
    out = copy_run(cosine_run, tmp_path / "out")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt")}
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=8", "--lr_decay_iters=8",
                                                                 "--learning_rate=1e30", "--allow_lr_increase=True",
                                                                 "--eval_interval=100", "--init_from=resume"))
    assert code == 1, stdout + stderr
    line = stderr.strip().splitlines()[-1]
    failed_at = int(line.split(" at iteration ")[1].split()[0])
    assert line.startswith("error: non-finite ") and 5 <= failed_at <= 8
    assert line.endswith(f"Last good checkpoint, untouched: {out / 'ckpt.pt'}")
    assert {name: sha(out / name) for name in before} == before
    logged = [r for r in read_metrics(out)[0] if r["iter"] > 4]
    assert len(logged) == failed_at - 5 and all(math.isfinite(r["loss"]) for r in logged)


# ---------------------------------------------------------------------------------------------
# a stop's advice: the command it prints continues the run


def signal_at_iteration(monkeypatch, n):
    """Ctrl-C delivered inside iteration n (before the loop's stop check), as a terminal would."""
    from kit.progress import Progress
    done = Progress.iteration_done

    def iteration_done(self, *args, **kwargs):
        done(self, *args, **kwargs)
        self.signalled = getattr(self, "signalled", 0) + 1
        if self.signalled == n:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "iteration_done", iteration_done)


def test_ctrl_c_in_the_last_iteration_finishes_the_run_with_its_final_evaluation(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    signal_at_iteration(monkeypatch, 3)
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=3", "--lr_decay_iters=3",
                                                                 "--eval_interval=2"))
    assert code == 0, stdout + stderr
    assert "step 3: train loss" in stdout and "stopped at iteration" not in stdout and "done: 3 iterations" in stdout
    assert f"what training on would buy: python forecast.py --out_dir={out} --max_iters=6 (docs/forecast.md)" in stdout
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 3 and ckpt["val_loss"] == read_metrics(out)[1][-1]["val_loss"]


def test_the_printed_continue_command_continues_an_extended_run(data_dir, tmp_path, monkeypatch):
    """A run extended on the command line (--max_iters=6 over a config's 3) and stopped: the line names the
    whole command, which resumes it to 6; a resume without the extension is told the planned max_iters."""
    import shlex
    config = tmp_path / "cfg.py"
    config.write_text("max_iters = 3\nlr_decay_iters = 6\neval_interval = 2\n")
    out = tmp_path / "out"
    signal_at_iteration(monkeypatch, 3)
    code, stdout, stderr = run_inprocess("train.py", str(config), *train_args(data_dir, out, "--max_iters=6"))
    assert code == 0, stdout + stderr
    line = next(line for line in stdout.splitlines() if line.startswith("stopped at iteration 3;"))
    python, script, *args = shlex.split(line.split("continue with: ", 1)[1])
    assert python == "python" and script.endswith("train.py") and args[-1] == "--init_from=resume"
    monkeypatch.undo()
    code, stdout, stderr = run_inprocess("train.py", str(config), *train_args(data_dir, out, "--init_from=resume"))
    assert code == 2 and "is at iteration 3 and max_iters=3: nothing to train; its run was planned for 6: add " \
                          "--max_iters=6" in stderr
    code, stdout, stderr = run_inprocess("train.py", *args)
    assert code == 0, stdout + stderr
    assert "done: 3 iterations" in stdout and load_checkpoint(out / "ckpt.pt")["iter_num"] == 6
