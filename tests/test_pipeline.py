"""The user's three commands end to end on CPU: prepare a parquet -> train -> sample."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_script
from kit.tokenizer import read_dataset_meta

DOCS = ["The quick brown fox jumps over the lazy dog. " * 40,
        "Une phrase en français, avec des accents: é à ç. " * 30,
        "def f(x):\n    return x * 2\n" * 50] * 20


@pytest.mark.slow
def test_prepare_train_sample(tmp_path):
    parquet = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": DOCS, "id": [f"doc{i}" for i in range(len(DOCS))]}), parquet)
    data_dir = tmp_path / "data"
    run_script("data/fineweb/prepare.py", f"--input={parquet}", f"--out_dir={data_dir}", "--val_fraction=0.2")
    meta = read_dataset_meta(str(data_dir))
    assert meta["splits"]["train"]["tokens"] > 0 and meta["splits"]["val"]["tokens"] > 0

    out = tmp_path / "out"
    proc = run_script("train.py", "config/train_fineweb_cpu.py", f"--data_dir={data_dir}", f"--out_dir={out}",
                      "--max_iters=3", "--eval_interval=3", "--eval_iters=2", "--lr_decay_iters=3",
                      "--batch_size=2", "--dtype=float32")
    assert "model:" in proc.stdout and "step 3: train loss" in proc.stdout
    assert (out / "ckpt.pt").exists()
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["iter"] for e in evals if "val_loss" in e] == [0, 3]

    proc = run_script("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=5",
                      "--start=The quick", "--stop_at_eot=False")
    assert proc.stdout.startswith("The quick") and "5 tokens" in proc.stderr
