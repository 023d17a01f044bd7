"""The README's quick start on a user's machine: its data line with a network streams a slice of FineWeb's
sample-10BT (tested against a local stand-in of the Hub's repository), and the line without one reads
any parquet in FineWeb's schema; both give the bins the next two commands read."""
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO_ROOT
from kit.tokenizer import EOT_TOKEN

sys.path.insert(0, str(REPO_ROOT / "data" / "fineweb"))
import prepare  # noqa: E402
import sources  # noqa: E402

# FineWeb's dataset card declares its configurations so: `datasets` maps sample-10BT to sample/10BT/*.
FINEWEB_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/*
- config_name: sample-10BT
  data_files:
  - split: train
    path: sample/10BT/*
---
# FineWeb, a local stand-in: the card's configurations and a few small files in FineWeb's layout
"""


def write_parquet(path, texts):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(len(texts))],
                      "token_count": [len(prepare.get_encoding().encode_ordinary(t)) for t in texts]})
    pq.write_table(table, path, row_group_size=50)


@pytest.fixture
def fineweb_standin(tmp_path, monkeypatch):
    """A folder HuggingFaceFW/fineweb in the current directory: `datasets` reads a local folder of that name
    as it reads the Hub's repository (its card, its configurations, its files), without a network."""
    repo = tmp_path / "HuggingFaceFW" / "fineweb"
    (repo / "README.md").parent.mkdir(parents=True)
    (repo / "README.md").write_text(FINEWEB_CARD)
    texts = {"sample": [f"Sample document {i}: the cat sat on the mat. " * 3 for i in range(240)],
             "dump": [f"A document of the dump, not of the sample, {i}." for i in range(50)]}
    write_parquet(repo / "sample" / "10BT" / "000_00000.parquet", texts["sample"][:120])
    write_parquet(repo / "sample" / "10BT" / "000_00001.parquet", texts["sample"][120:])
    write_parquet(repo / "data" / "CC-MAIN-2013-20" / "000_00000.parquet", texts["dump"])
    monkeypatch.chdir(tmp_path)
    return texts


def readme_data_line(option):
    """The quick start's prepare.py line that uses option, as arguments."""
    readme = (REPO_ROOT / "README.md").read_text()
    line = re.search(rf"^ +python data/fineweb/prepare.py ({option}.*)$", readme, re.MULTILINE).group(1)
    return shlex.split(line, comments=True)


def documents_in(out_dir):
    """The texts of train.bin followed by val.bin, one per <|endoftext|>-led document."""
    enc = prepare.get_encoding()
    tokens = np.concatenate([np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")])
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, [*starts[1:], len(tokens)])]


def test_the_network_line_streams_the_sample_and_says_how_much(fineweb_standin, monkeypatch, capsys):
    args = readme_data_line("--hf_dataset")
    assert args[:4] == ["--hf_dataset", "HuggingFaceFW/fineweb", "--hf_config", "sample-10BT"]
    prepare.main([*args, "--out_dir", "out", "--workers", "1"])
    assert sorted(documents_in(Path("out"))) == sorted(fineweb_standin["sample"])  # none of the dump
    printed = capsys.readouterr().out
    assert "streamed 240 documents" in printed and ", all of it" in printed and "done in" in printed

    monkeypatch.setattr(sources, "STREAM_BATCH", 40)  # --max_tokens stops after the batch that reaches it
    prepare.main([*args[:4], "--max_tokens", "2000", "--val_fraction", "0.1", "--out_dir", "out-slice", "--workers", "1"])
    slice_ = documents_in(Path("out-slice"))
    assert 0 < len(slice_) < 240 and set(slice_) <= set(fineweb_standin["sample"])
    assert "stopped at --max_tokens 2,000" in capsys.readouterr().out


def test_the_offline_line_reads_any_local_parquet(fineweb_standin, capsys):
    args = readme_data_line("--input")
    assert len(args) == 1 and args[0].startswith("--input=")
    prepare.main(["--input=HuggingFaceFW/fineweb/sample/10BT/000_00000.parquet", "--out_dir", "out", "--workers", "1",
                  "--val_fraction", "0.1"])  # 120 documents: too few for the default to pick one for val
    assert sorted(documents_in(Path("out"))) == sorted(fineweb_standin["sample"][:120])
    assert "done in" in capsys.readouterr().out


def test_both_lines_write_the_folder_the_quick_start_trains_on():
    """No --out_dir in either line: both write data/fineweb, which config/train_fineweb_cpu.py reads."""
    quick_start = {}
    exec((REPO_ROOT / "config" / "train_fineweb_cpu.py").read_text(), quick_start)
    assert quick_start["dataset"] == "fineweb" and prepare.DEFAULT_OUT_DIR == REPO_ROOT / "data" / "fineweb"
    assert not any(a.startswith("--out_dir") for a in readme_data_line("--hf_dataset") + readme_data_line("--input"))
