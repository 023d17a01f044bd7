"""Shared test set-up: offline tokenizer files and corpus from ../shared when present, tiny sizes."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"

# The GPT-2 BPE files: with ../shared (our machines, CI) tiktoken reads them from there; on a
# user's laptop without ../shared, tiktoken downloads them as usual.
if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an offline hf_hub_download otherwise retries for ~23 s
os.environ.setdefault("WANDB_MODE", "offline")
# Tiny test models gain nothing from threads, and on a busy 2-core machine spinning OpenMP threads
# make them several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Started as a background job of a script (`cmd &` without job control) the suite ignores SIGINT, and every
# process it starts inherits that, so the tests' Ctrl-C to a script would do nothing: as in a terminal
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def small_corpus():
    """../shared/corpus/en_docs_small.parquet: 451 real documents in FineWeb's schema."""
    path = SHARED / "corpus" / "en_docs_small.parquet"
    if not path.exists():
        pytest.skip(f"{path} is not here: the project's machines keep a small FineWeb-schema parquet beside the "
                    "checkout (../shared/corpus); elsewhere these tests skip and the rest of the suite runs")
    return path


def run_script(*args, cwd=REPO_ROOT, timeout=300, check=True, env=None):
    """Run one of the project's scripts the way a user does; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def make_token_dataset(data_dir, n_train=20_000, n_val=4_000, seed=0, vocab=50257):
    """train.bin / val.bin of random GPT-2 ids plus a meta.json as prepare.py writes it: enough for
    a few iterations of a tiny model. Returns the folder."""
    import json
    import numpy as np
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rng.integers(0, vocab, n, dtype=np.uint16).tofile(data_dir / f"{split}.bin")
        splits[split] = {"documents": 1, "tokens": n, "file": f"{split}.bin"}
    meta = {"tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "eot_placement": "prepend",
            "dtype": "uint16", "splits": splits}
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


# The one set of tiny training arguments: a model small enough that an iteration takes milliseconds on
# one CPU core (the 50304-wide output layer dominates the cost, so batches are tiny too).
TINY_TRAIN_ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=2",
                   "--gradient_accumulation_steps=2", "--compile=False", "--device=cpu", "--dtype=float32",
                   "--eval_iters=2", "--log_interval=1", "--warmup_iters=2", "--learning_rate=1e-3",
                   "--min_lr=1e-4"]
TINY_TOKENS_PER_ITER = 2 * 2 * 16  # gradient_accumulation_steps x batch_size x block_size above


def train_args(data_dir, out_dir, *extra):
    """train.py arguments for a tiny CPU run on data_dir writing to out_dir; extra overrides."""
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_TRAIN_ARGS, *extra]


@pytest.fixture
def token_dataset(tmp_path):
    return make_token_dataset(tmp_path / "data")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One token dataset shared by the tests of a module."""
    return make_token_dataset(tmp_path_factory.mktemp("data"))


# DDP on CPU: torchrun with 2 gloo ranks. Each launch costs seconds, so one reference run serves the
# DDP tests: they compare other runs with it (a resume, two nodes, the memory levers) or look into it.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
DDP_RUN = ["--optimizer=muon", "--lr_schedule=wsd", "--max_iters=5", "--cooldown_frac=0.4", "--eval_interval=2",
           "--dropout=0.1", "--gradient_accumulation_steps=4"]


def torchrun_train(data_dir, out_dir, *extra, launcher=("--standalone", "--nproc_per_node=2"), start=False):
    """train.py under torchrun with DDP_RUN and extra; the finished process, or (start=True) the Popen."""
    command = [*TORCHRUN, *launcher, "train.py", *train_args(data_dir, out_dir, *DDP_RUN, *extra)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if start:
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def pytest_collection_modifyitems(items):
    """Under pytest-xdist (pytest.ini starts 2 workers): the tests that share the reference DDP run go to
    one worker, so that it runs once."""
    for item in items:
        if "ddp_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("ddp_run"))


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory):
    """The reference DDP run: Muon (and AdamW for the rest), per-rank dropout, WSD (stable.pt at iteration
    2), 2 micro-steps per rank, 5 iterations. (data_dir, out_dir, its stdout)."""
    root = tmp_path_factory.mktemp("ddp")
    data_dir = make_token_dataset(root / "data")
    return data_dir, root / "out", torchrun_train(data_dir, root / "out").stdout


@pytest.fixture(scope="module")
def cosine_run(data_dir, tmp_path_factory):
    """out_dir of a finished tiny cosine run that planned 4 iterations (lr_decay_iters=4): ckpt.pt, best.pt."""
    from inprocess import run_inprocess
    out = tmp_path_factory.mktemp("cosine") / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4",
                                                                 "--eval_interval=2"))
    assert code == 0, stdout + stderr
    return out


class DiskFullAfter:
    """A file on a disk that fills up: `room` more bytes reach it (a write that crosses that is cut there,
    as the kernel cuts it), then ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def random_model(seed=0, **args):
    """A tiny GPT whose every weight is random, biases and the output layer's padding rows included
    (fresh biases are zero, which would hide mistakes in how they are carried)."""
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def all_logits(model, idx):
    """Every position's logits (B, T, vocab), for comparisons with other implementations: training and
    evaluation never need them whole, so the model has no such method."""
    return model.output_logits(model.hidden_states(idx))


def pytest_report_header(config):
    """Which CPU path dtype='auto' takes here: the tests pin float32 where a figure depends on it, and pass on both."""
    from kit.runtime import cpu_has_bf16
    return "dtype='auto' on this CPU: " + ("bfloat16 (AVX512-BF16 or AMX)" if cpu_has_bf16() else
                                           "float32 (no AVX512-BF16 or AMX)")


def prepare_fails_with(capsys, *args):
    """data/fineweb/prepare.py's main(args) refused as a user error: exit status 2 and one line `error: ...`;
    returns it."""
    if str(REPO_ROOT / "data" / "fineweb") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "data" / "fineweb"))
    import prepare
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([*map(str, args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err
