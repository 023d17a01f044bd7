"""Shared test set-up: offline tokenizer files and corpus from ../shared when present, tiny sizes."""
import os
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

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def small_corpus():
    """../shared/corpus/en_docs_small.parquet: 451 real documents in FineWeb's schema."""
    path = SHARED / "corpus" / "en_docs_small.parquet"
    if not path.exists():
        pytest.skip("../shared/corpus is not present on this machine")
    return path


def run_script(*args, cwd=REPO_ROOT, timeout=300, check=True, env=None):
    """Run one of the project's scripts the way a user does; returns the CompletedProcess."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=full_env, timeout=timeout,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc
