"""kit/evaluation.py and eval.py: HellaSwag scoring against a one-row-at-a-time reference and a rigged model,
bits per byte by hand, the download and its checks, a checkpoint against its Hugging Face export, and
HellaSwag during training under DDP into metrics.jsonl and plot.py."""
import hashlib
import http.server
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from kit import evaluation
from kit.checkpoint import save_checkpoint
from conftest import REPO_ROOT, all_logits, make_token_dataset, random_model, train_args
from inprocess import run_inprocess
from model import GPT, GPTConfig
from kit.tokenizer import TOKEN_DTYPE, VOCAB_SIZE, encode_documents, get_encoding

FIXTURE = Path(__file__).parent / "data" / "hellaswag_tiny.jsonl"  # 12 hand-written examples in HellaSwag's schema
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=50304, bias=False)
CPU_FP32 = ["--device=cpu", "--dtype=float32"]


def one_row_logprobs(model, row, n_scored):
    """The reference: one unpadded row through the model alone, log-softmax by hand over the
    tokenizer's ids, the log-probabilities of its last n_scored tokens."""
    x = torch.tensor(row)[None]
    with torch.no_grad():
        logits = all_logits(model, x)
    logprobs = torch.log_softmax(logits[0, :-1, :VOCAB_SIZE].double(), dim=-1)
    picked = [logprobs[t, row[t + 1]].item() for t in range(len(row) - 1)]
    return picked[len(picked) - n_scored:]


# ---------------------------------------------------------------------------------------------
# HellaSwag scoring


@pytest.mark.parametrize("block_size", [64, 22], ids=["whole-rows", "some-rows-cut-from-the-left"])
def test_batched_scores_equal_one_ending_at_a_time(block_size):
    model = random_model(**dict(TINY, block_size=block_size))
    rendered = evaluation.render_examples(evaluation.read_hellaswag(FIXTURE), block_size)
    lengths = {len(row) for example in rendered for row in example[0]}
    assert len(lengths) > 3 and max(lengths) <= block_size  # rows of many lengths: the batch is padded
    with torch.no_grad():
        total, mean = evaluation.score_endings(model, rendered, "cpu")  # all 48 rows in one forward pass
    assert total.shape == mean.shape == (12, 4)
    for i, (rows, scored, _, _) in enumerate(rendered):
        for j, (row, n) in enumerate(zip(rows, scored)):
            reference = one_row_logprobs(model, row, n)
            assert len(reference) == n > 0
            assert total[i, j].item() == pytest.approx(sum(reference), abs=1e-4)
            assert mean[i, j].item() == pytest.approx(sum(reference) / n, abs=1e-5)
    # the ending, and only the ending, is scored: the context's own tokens are not
    enc = get_encoding()
    example = evaluation.read_hellaswag(FIXTURE)[0]
    assert rendered[0][1] == [len(enc.encode_ordinary(" " + e)) for e in example["endings"]]


class RiggedModel(GPT):
    """Knows, for every prefix of the preferred ending's row, the token that follows, and gives it a
    logit of 20 (every other token 0): the preferred ending's log-probability is ~0, any other
    ending's at least 20 lower at the token where it leaves the preferred one. Its "hidden states"
    are those logits, and its output layer passes them through."""

    def __init__(self, rendered, pick):
        super().__init__(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=64))
        self.next_token = {}
        for rows, _, label, _ in rendered:
            row = rows[pick(label)]
            for t in range(1, len(row)):
                self.next_token[tuple(row[:t])] = row[t]

    def hidden_states(self, idx, kv_cache=None):
        logits = torch.zeros(*idx.shape, 50304)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                if tuple(row[:t + 1]) in self.next_token:
                    logits[b, t, self.next_token[tuple(row[:t + 1])]] = 20.0
        return logits

    def output_logits(self, h):
        return h


@pytest.mark.parametrize("pick, expected", [(lambda label: label, 1.0), (lambda label: (label + 1) % 4, 0.0)],
                         ids=["prefers-label", "prefers-another"])
def test_rigged_model_scores_as_rigged(pick, expected):
    rendered = evaluation.render_examples(evaluation.read_hellaswag(FIXTURE), 64)
    assert sorted({label for _, _, label, _ in rendered}) == [0, 1, 2, 3]
    no_autocast = torch.autocast("cpu", enabled=False)
    result = evaluation.evaluate_hellaswag(RiggedModel(rendered, pick), rendered, "cpu", no_autocast, batch_size=5)
    assert result == {"hellaswag_acc": expected, "hellaswag_acc_norm": expected, "hellaswag_n": 12,
                      "hellaswag_cropped": 0, "hellaswag_skipped": 0}


def test_rows_cut_to_block_size_are_counted_and_endings_too_long_to_score_are_skipped():
    """At block_size 12 some examples lose the start of their context (counted as cropped, still scored
    exactly as a sliding window would: see the test above) and some have an ending of 12 tokens or more,
    which would leave its first token nothing to be predicted from: skipped, counted, not in n."""
    examples, enc, block_size = evaluation.read_hellaswag(FIXTURE), get_encoding(), 12
    lengths = [(len(enc.encode_ordinary(ex["ctx"])), max(len(enc.encode_ordinary(" " + e)) for e in ex["endings"]))
               for ex in examples]
    too_long = [ending >= block_size for _, ending in lengths]
    cropped = sum(context + ending > block_size for context, ending in lengths if ending < block_size)
    rendered = evaluation.render_examples(examples, block_size)
    assert [example is None for example in rendered] == too_long and 0 < sum(too_long) < 12 and cropped > 0
    result = evaluation.evaluate_hellaswag(random_model(**dict(TINY, block_size=block_size)), rendered, "cpu",
                                           torch.autocast("cpu", enabled=False), batch_size=5)
    assert (result["hellaswag_n"], result["hellaswag_cropped"], result["hellaswag_skipped"]) == (
        12 - sum(too_long), cropped, sum(too_long))
    with pytest.raises(ValueError, match="no HellaSwag example fits block_size=6: each has an ending of 6 tokens"):
        evaluation.render_examples(examples, 6)


def test_limit_and_ddp_shares_cover_every_example_once():
    examples = evaluation.read_hellaswag(FIXTURE)
    assert len(evaluation.render_examples(examples, 64, limit=5)) == 5
    rendered = evaluation.render_examples(examples, 64)
    shares = [rendered[rank::3] for rank in range(3)]  # what evaluate_hellaswag gives each of 3 ranks
    assert sorted(map(id, sum(shares, []))) == sorted(map(id, rendered))


# ---------------------------------------------------------------------------------------------
# the HellaSwag file: schema, download, checksum, offline


@pytest.mark.parametrize("line, problem", [
    ("not json at all", "not JSON"),
    ('["a list"]', "a JSON list, not an object"),
    ('{"ctx": "A man", "endings": ["a", "b", "c"], "label": 0}', "endings is not a list of 4 texts"),
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 4}', "label 4 is not 0-3"),
    ('{"text": "A FineWeb document"}', "no ctx text"),
])
def test_a_file_in_another_schema_is_refused_in_one_line(tmp_path, line, problem):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"{bad} line 2: .*{problem}") as e:
        evaluation.read_hellaswag(bad)
    assert "\n" not in str(e.value) and "ctx (text), endings (4 texts) and label (0-3)" in str(e.value)


@pytest.fixture
def fixture_server():
    """The fixture file served over http on 127.0.0.1; .requests counts the GETs."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            server.requests += 1
            body = FIXTURE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.requests = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_download_once_checked_then_cached(tmp_path, monkeypatch, fixture_server):
    cache = tmp_path / "cache" / "hellaswag_val.jsonl"
    url = f"http://127.0.0.1:{fixture_server.server_port}/hellaswag_val.jsonl"
    monkeypatch.setattr(evaluation, "HELLASWAG_URL", url)
    monkeypatch.setattr(evaluation, "HELLASWAG_CACHE", str(cache))
    monkeypatch.setattr(evaluation, "HELLASWAG_SHA256", hashlib.sha256(b"other bytes").hexdigest())
    with pytest.raises(ValueError, match="its sha256 is .* not the published .*; not kept") as e:
        evaluation.load_hellaswag()
    assert "\n" not in str(e.value) and "--hellaswag_file=PATH" in str(e.value)
    assert os.listdir(cache.parent) == []  # nothing half-written or unchecked is left

    monkeypatch.setattr(evaluation, "HELLASWAG_SHA256", hashlib.sha256(FIXTURE.read_bytes()).hexdigest())
    assert evaluation.load_hellaswag() == evaluation.read_hellaswag(FIXTURE)
    assert cache.read_bytes() == FIXTURE.read_bytes() and os.listdir(cache.parent) == [cache.name]
    assert evaluation.load_hellaswag() == evaluation.read_hellaswag(FIXTURE)
    assert fixture_server.requests == 2  # the failed download and the good one; the last call read the cache


def test_offline_and_not_cached_names_hellaswag_file(tmp_path, monkeypatch, finished_checkpoint):
    import socket
    with socket.socket() as s:  # a port nobody listens on: the connection is refused, as offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(evaluation, "HELLASWAG_URL", f"http://127.0.0.1:{port}/hellaswag_val.jsonl")
    monkeypatch.setattr(evaluation, "HELLASWAG_CACHE", str(tmp_path / "cache" / "hellaswag_val.jsonl"))
    code, out, err = run_inprocess("eval.py", f"--out_dir={finished_checkpoint}", "--eval_val=False", *CPU_FP32)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: HellaSwag is not cached at ")
    assert "--hellaswag_file=PATH" in err and "refused" in err.lower() and "--eval_hellaswag=False" in err
    assert os.listdir(tmp_path / "cache") == [] and not (finished_checkpoint / "evals.jsonl").exists()
    # the default command scores what it can offline: the val loss, with one line on what it skipped
    code, out, err = run_inprocess("eval.py", f"--out_dir={finished_checkpoint}", "--val_tokens=200", *CPU_FP32)
    assert code == 0, err
    skipped = [line for line in err.splitlines() if line.startswith("hellaswag: skipped: HellaSwag is not cached")]
    assert len(skipped) == 1 and "--hellaswag_file=PATH" in skipped[0] and "--eval_hellaswag=False" in skipped[0]
    assert "val: scoring 4 windows of 64 tokens of " in err and "loss" in out, err  # 199 targets
    (finished_checkpoint / "evals.jsonl").unlink()


def test_eval_refuses_a_dataset_of_another_tokenizer_as_train_does(finished_checkpoint, data_dir, tmp_path):
    other = shutil.copytree(data_dir, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(dict(meta, tokenizer="cl100k_base")))
    code, _, err = run_inprocess("eval.py", f"--out_dir={finished_checkpoint}", f"--data_dir={other}",
                                 "--eval_hellaswag=False", *CPU_FP32)
    assert code == 2 and err.count("\n") == 1 and "tokenizer is 'cl100k_base' but kit/tokenizer.py says 'gpt2'" in err


# ---------------------------------------------------------------------------------------------
# val.bin: bits per byte


def write_text_dataset(folder, documents):
    """val.bin (and a one-token train.bin) of these documents as prepare.py tokenizes them."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [t for doc in encode_documents(get_encoding(), documents) for t in doc]
    torch.tensor(tokens, dtype=torch.int32).numpy().astype(TOKEN_DTYPE).tofile(folder / "val.bin")
    return folder / "val.bin", len(tokens)


def test_bits_per_byte_of_a_uniform_model_by_hand(tmp_path):
    """A model with every weight zero gives every one of the 50,257 ids the same probability: a loss
    of ln(50257) nats per token. The text's bytes are counted here from the strings themselves."""
    documents = ["Crème brûlée, naïve café: 1234 → ∞.", "Hello world! 日本語のテキスト。\n\nThe end."]
    path, n_tokens = write_text_dataset(tmp_path / "data", documents)
    model = GPT(GPTConfig(**dict(TINY, block_size=8)))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    result = evaluation.evaluate_val(model, str(path), "cpu", torch.autocast("cpu", enabled=False), batch_size=3)
    text_bytes = sum(len(doc.encode("utf-8")) for doc in documents)
    assert n_tokens - 1 > 3 * 8 and (n_tokens - 1) % 8 != 0  # several batches and a shorter last window
    assert result["val_tokens"] == n_tokens - 1 and result["val_bytes"] == text_bytes  # the EOTs are no text
    assert result["val_loss"] == pytest.approx(math.log(VOCAB_SIZE), rel=1e-6)
    assert result["val_bpb"] == pytest.approx(math.log2(VOCAB_SIZE) * (n_tokens - 1) / text_bytes, rel=1e-6)


def test_val_loss_of_a_random_model_equals_its_own_loss_per_window(tmp_path):
    documents = ["The quick brown fox jumps over the lazy dog. " * 5, "Pack my box with five dozen liquor jugs."]
    path, n_tokens = write_text_dataset(tmp_path / "data", documents)
    model = random_model(**dict(TINY, block_size=16, vocab_size=VOCAB_SIZE))  # no padding rows: the model's own loss
    tokens = torch.from_numpy(np.fromfile(path, dtype=TOKEN_DTYPE).astype(np.int64))
    limit = 40  # --val_tokens: the first 40 tokens, 39 targets: windows of 16, 16 and 7
    nats = 0.0
    with torch.no_grad():
        for start in range(0, limit - 1, 16):
            window = tokens[start:min(start + 17, limit)][None]
            nats += model(window[:, :-1], window[:, 1:])[1].item() * (window.size(1) - 1)
    result = evaluation.evaluate_val(model, str(path), "cpu", torch.autocast("cpu", enabled=False), 2, max_tokens=limit)
    assert result["val_tokens"] == limit - 1
    assert result["val_loss"] == pytest.approx(nats / (limit - 1), rel=1e-5)
    enc = get_encoding()
    assert result["val_bytes"] == len(enc.decode_bytes(tokens[1:limit].tolist()))


# ---------------------------------------------------------------------------------------------
# eval.py


@pytest.fixture
def finished_checkpoint(tmp_path):
    """out_dir with a random tiny model's ckpt.pt whose training config points at a token dataset."""
    data = make_token_dataset(tmp_path / "data", n_train=100, n_val=300)
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint({"model_args": TINY, "model": random_model(**TINY).state_dict(), "iter_num": 7,
                     "config": {"data_dir": str(data)}}, out / "ckpt.pt")
    return out


def read_evals(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "evals.jsonl").read_text().splitlines()]


def test_checkpoint_and_its_hugging_face_export_evaluate_the_same(finished_checkpoint, tmp_path):
    pytest.importorskip("safetensors")
    hf = tmp_path / "hf"
    assert run_inprocess("export.py", f"--out_dir={finished_checkpoint}", f"--to={hf}")[0] == 0
    code, out, err = run_inprocess("eval.py", f"--out_dir={finished_checkpoint}", f"--hellaswag_file={FIXTURE}",
                                   *CPU_FP32)
    assert code == 0, err
    assert "hellaswag: 12 examples: acc " in out and "bits/byte" in out
    data = finished_checkpoint.parent / "data"
    code, _, err = run_inprocess("eval.py", f"--init_from={hf}", f"--out_dir={finished_checkpoint}",
                                 f"--data_dir={data}", f"--hellaswag_file={FIXTURE}", "--batch_size=3", *CPU_FP32)
    assert code == 0, err
    ours, theirs = read_evals(finished_checkpoint)
    assert set(ours) == {"checkpoint", "iter", "val_loss", "val_bpb", "val_tokens", "hellaswag_acc",
                         "hellaswag_acc_norm", "hellaswag_n", "hellaswag_cropped", "hellaswag_skipped"}
    assert (ours["checkpoint"], ours["iter"], theirs["checkpoint"], theirs["iter"]) == (
        str(finished_checkpoint / "ckpt.pt"), 7, str(hf), None)
    assert ours["val_tokens"] == theirs["val_tokens"] == 299 and ours["hellaswag_n"] == theirs["hellaswag_n"] == 12
    for key in ("val_loss", "val_bpb", "hellaswag_acc", "hellaswag_acc_norm"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-5), key


def test_eval_errors_are_one_line(finished_checkpoint, tmp_path):
    def eval_py(*args):
        code, _, err = run_inprocess("eval.py", *args, *CPU_FP32)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
        return err

    assert "no checkpoint at" in eval_py(f"--out_dir={tmp_path / 'nothing'}")
    assert "--data_dir=<folder holding val.bin>" in eval_py(f"--out_dir={finished_checkpoint}",
                                                             f"--data_dir={tmp_path}", f"--hellaswag_file={FIXTURE}")
    assert "hellaswag_file='nope.jsonl' not found" in eval_py(f"--out_dir={finished_checkpoint}",
                                                              "--hellaswag_file=nope.jsonl")
    (tmp_path / "train.jsonl").write_text('{"text": "a FineWeb document"}\n')
    assert "not HellaSwag's schema (no ctx text)" in eval_py(f"--out_dir={finished_checkpoint}",
                                                             f"--hellaswag_file={tmp_path / 'train.jsonl'}")
    assert "limit=-1: must be >= 0" in eval_py(f"--out_dir={finished_checkpoint}", "--limit=-1")
    assert "val_tokens=1: must be 0 (all of val.bin) or at least 2" in eval_py(f"--out_dir={finished_checkpoint}",
                                                                              "--val_tokens=1", "--eval_hellaswag=False")
    (tmp_path / "eot").mkdir()
    np.full(100, 50256, dtype=TOKEN_DTYPE).tofile(tmp_path / "eot" / "val.bin")  # documents with no text at all
    assert "every token to be scored is <|endoftext|> (no text, 0 bytes), so bits per byte is undefined" in eval_py(
        f"--out_dir={finished_checkpoint}", f"--data_dir={tmp_path / 'eot'}", "--eval_hellaswag=False")
    assert "nothing to evaluate" in eval_py("--eval_val=False", "--eval_hellaswag=False")
    mismatched = torch.load(finished_checkpoint / "ckpt.pt", weights_only=True)
    mismatched["model_args"] = dict(mismatched["model_args"], n_embd=64)
    save_checkpoint(mismatched, tmp_path / "mismatched.pt")
    assert "its weights do not fit its model_args" in eval_py(f"--out_dir={finished_checkpoint}",
                                                              f"--ckpt={tmp_path / 'mismatched.pt'}")
    assert not (finished_checkpoint / "evals.jsonl").exists()


def test_eval_py_says_how_many_hellaswag_examples_it_cropped_and_skipped(finished_checkpoint, tmp_path):
    """block_size 64: one example whose context is 80 words long (cropped, scored), one whose ending is
    (skipped); eval.py says so in one line and records both counts."""
    examples = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:4]]
    examples[1]["ctx"] = "word " * 80
    examples[2]["endings"][3] = "word " * 80
    (tmp_path / "long.jsonl").write_text("".join(json.dumps(example) + "\n" for example in examples))
    code, out, err = run_inprocess("eval.py", f"--out_dir={finished_checkpoint}", f"--hellaswag_file={tmp_path / 'long.jsonl'}",
                                   "--eval_val=False", *CPU_FP32)
    assert code == 0, err
    assert ("hellaswag: 1 of them cropped to block_size=64 (their context loses its start); 1 skipped, not scored: "
            "an ending alone is 64 tokens or more") in out
    (result,) = read_evals(finished_checkpoint)
    assert (result["hellaswag_n"], result["hellaswag_cropped"], result["hellaswag_skipped"]) == (3, 1, 1)


# ---------------------------------------------------------------------------------------------
# during training


@pytest.mark.slow
def test_hellaswag_during_training_under_ddp_equals_eval_py(token_dataset, tmp_path):
    """torchrun with 2 CPU ranks: each scores half of the examples, the counts summed into rank 0's
    metrics.jsonl equal eval.py's on the checkpoint saved at the same step; plot.py draws them."""
    out = tmp_path / "out"
    args = train_args(token_dataset, out, "--max_iters=2", "--eval_interval=1", "--hellaswag_interval=2",
                      f"--hellaswag_file={FIXTURE}", "--hellaswag_limit=11")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *args], cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert [(r["iter"], r.get("hellaswag_n")) for r in evals] == [(0, 11), (1, None), (2, 11)]
    assert "hellaswag acc_norm" in proc.stdout

    code, _, err = run_inprocess("eval.py", f"--out_dir={out}", f"--hellaswag_file={FIXTURE}", "--limit=11",
                                 "--eval_val=False", *CPU_FP32)
    assert code == 0, err
    (result,) = read_evals(out)
    assert result["iter"] == 2
    assert (result["hellaswag_acc"], result["hellaswag_acc_norm"]) == (evals[-1]["hellaswag_acc"],
                                                                     evals[-1]["hellaswag_acc_norm"])
    import plot
    plot.main([str(out), "--metric=hellaswag", f"--out={tmp_path / 'h.png'}"])
    assert (tmp_path / "h.png").stat().st_size > 0
    assert plot.read_metrics(out / "metrics.jsonl", "hellaswag")[1] == [(r["tokens"], r["hellaswag_acc_norm"])
                                                                        for r in evals if "hellaswag_n" in r]


def test_train_refuses_a_bad_hellaswag_setting_before_training(token_dataset, tmp_path):
    for bad, message in ((f"--hellaswag_file={tmp_path / 'missing.jsonl'}", "missing.jsonl' not found"),
                         ("--hellaswag_limit=-1", "hellaswag_limit=-1: must be >= 0")):
        args = train_args(token_dataset, tmp_path / "out", "--max_iters=2", "--hellaswag_interval=2",
                          f"--hellaswag_file={FIXTURE}", bad)
        code, _, err = run_inprocess("train.py", *args)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not list((tmp_path / "out").glob("*.pt"))


def test_the_hellaswag_download_goes_to_the_git_ignored_data_folder():
    from conftest import REPO_ROOT
    assert Path(evaluation.HELLASWAG_CACHE) == REPO_ROOT / "data" / "hellaswag" / "hellaswag_val.jsonl"
