"""optimizer='muon': torch.optim.Muon on the block matrices, AdamW on the rest; its checkpoint
contract (key 'muon'), exact resume (single process and DDP), the refusal to switch optimizers on
resume, and bench.py's count of its state. (Exact resume under DDP: test_resume.py, for both optimizers.)"""
import pytest
import torch

from kit.checkpoint import load_checkpoint
from conftest import train_args
from inprocess import read_metrics, run_inprocess
from model import GPT, GPTConfig


def tiny_model(**switches):
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64, bias=True, **switches))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_every_parameter_is_in_exactly_one_optimizer(tie_embeddings):
    model = tiny_model(tie_embeddings=tie_embeddings)
    optimizers = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 0.02, 0.95)
    assert list(optimizers) == ["optimizer", "muon"]  # the checkpoint's keys
    adamw, muon = ([p for g in opt.param_groups for p in g["params"]] for opt in optimizers.values())
    names = {id(p): name for name, p in model.named_parameters()}  # a tied weight once, as wte
    matrices = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert sorted(names[id(p)] for p in muon) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in matrices)
    assert sorted(map(id, adamw + muon)) == sorted(names)  # all of them, none twice
    in_adamw = {names[id(p)] for p in adamw}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
            "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"} <= in_adamw
    assert ("lm_head.weight" in in_adamw) == (not tie_embeddings)  # tied, it is wte
    assert muon[0].shape == (48, 16)  # c_attn: q, k, v orthogonalised as one matrix
    assert optimizers["muon"].defaults["momentum"] == 0.95 and optimizers["muon"].defaults["lr"] == 0.02


def test_muon_weight_decay_defaults_to_weight_decay_and_is_its_own_when_set():
    model = tiny_model()
    for muon_weight_decay, expected in ((None, 0.1), (0.4, 0.4), (0.0, 0.0)):
        optimizers = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon", 0.02, 0.95, muon_weight_decay)
        assert [g["weight_decay"] for g in optimizers["muon"].param_groups] == [expected]
        assert [g["weight_decay"] for g in optimizers["optimizer"].param_groups] == [0.1, 0.0]


def test_adamw_is_the_default_and_alone():
    optimizers = tiny_model().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    assert list(optimizers) == ["optimizer"] and isinstance(optimizers["optimizer"], torch.optim.AdamW)


def test_a_torch_without_muon_is_named(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError, match=r"optimizer='muon' needs torch >= 2.9 \(torch.optim.Muon\); this is torch"):
        tiny_model().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "muon")
    with pytest.raises(ValueError, match="optimizer='sgd': allowed are 'adamw', 'muon'"):
        tiny_model().configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu", "sgd")


def test_each_param_group_keeps_its_own_peak_for_the_schedule():
    """train.py runs every group at initial_lr x the schedule's multiplier: Muon at muon_lr's share, AdamW at
    learning_rate's, whatever learning_rate is (0 included)."""
    for learning_rate in (1e-3, 0.0):
        optimizers = tiny_model().configure_optimizers(0.1, learning_rate, (0.9, 0.95), "cpu", "muon", 0.02)
        assert [g["initial_lr"] for g in optimizers["optimizer"].param_groups] == [learning_rate, learning_rate]
        assert [g["initial_lr"] for g in optimizers["muon"].param_groups] == [0.02]


MUON_RUN = ["--optimizer=muon", "--muon_lr=0.03", "--lr_schedule=wsd", "--max_iters=6", "--cooldown_frac=0.5",
            "--eval_interval=3", "--dropout=0.1", "--muon_weight_decay=0.3"]


def train_inprocess(*args):
    code, stdout, stderr = run_inprocess("train.py", *args)
    assert code == 0, stdout + stderr
    return stdout


def test_muon_checkpoint_holds_both_states_and_resume_is_bit_exact(token_dataset, tmp_path):
    train_inprocess(*train_args(token_dataset, tmp_path / "full", *MUON_RUN))
    stable = tmp_path / "full" / "stable.pt"
    ckpt = load_checkpoint(stable)  # torch.load(weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["config"]["optimizer"] == "muon"
    momentum = [s["momentum_buffer"] for s in ckpt["muon"]["state"].values()]
    assert len(momentum) == 8 and all(m.dim() == 2 and m.abs().sum() > 0 for m in momentum)  # 2 layers x 4
    assert all({"exp_avg", "exp_avg_sq"} <= set(s) for s in ckpt["optimizer"]["state"].values())
    # iteration 2 (past the 2-iteration warmup, before the cooldown) ran at Muon's own peak, not learning_rate
    assert ckpt["muon"]["param_groups"][0]["lr"] == 0.03
    # Muon's own decay; AdamW's matrices keep weight_decay, its biases and norms none
    assert ckpt["muon"]["param_groups"][0]["weight_decay"] == 0.3
    assert [g["weight_decay"] for g in ckpt["optimizer"]["param_groups"]] == [0.1, 0.0]

    train_inprocess(*train_args(token_dataset, tmp_path / "part", *MUON_RUN, "--init_from=resume",
                                f"--resume_from={stable}"))
    full, resumed = read_metrics(tmp_path / "full")[0], read_metrics(tmp_path / "part")[0]
    assert [r["iter"] for r in resumed] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"]) for r in resumed] == [(r["loss"], r["grad_norm"]) for r in full[3:]]


def test_changing_the_optimizer_on_resume_is_refused(token_dataset, tmp_path):
    train_inprocess(*train_args(token_dataset, tmp_path, "--max_iters=2", "--eval_interval=2"))
    code, stdout, stderr = run_inprocess("train.py", *train_args(token_dataset, tmp_path, "--max_iters=4",
                                                                 "--init_from=resume", "--optimizer=muon"))
    assert code == 2 and "Traceback" not in stderr
    assert stderr == (f"error: cannot resume {tmp_path / 'ckpt.pt'}: it was trained with optimizer='adamw', the "
                      "config says optimizer='muon'; keep the checkpoint's optimizer\n")


def test_bench_counts_muon_state_as_one_copy():
    """AdamW holds two copies of its parameters, Muon one: the block matrices' share of the state halves."""
    args = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=1", "--compile=False",
            "--device=cpu", "--dtype=float32", "--bench_iters=1", "--bench_warmup=1"]
    adamw = run_inprocess("bench.py", *args)[1].splitlines()[-1]
    muon = run_inprocess("bench.py", *args, "--optimizer=muon")[1].splitlines()[-1]
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False))
    n_all, n_blocks = model.get_num_params(non_embedding=False), sum(p.numel() for p in model.muon_params())
    mib = lambda n: f"{n * 4 / 2**20:.1f} MiB"
    assert adamw == f"optimizer state {mib(2 * n_all)}: AdamW {mib(2 * n_all)} for {n_all / 1e6:.2f}M parameters"
    assert muon == (f"optimizer state {mib(2 * (n_all - n_blocks) + n_blocks)}: AdamW {mib(2 * (n_all - n_blocks))} "
                    f"for {(n_all - n_blocks) / 1e6:.2f}M parameters, Muon {mib(n_blocks)} for {n_blocks / 1e6:.2f}M "
                    "parameters")


def test_an_unknown_optimizer_is_one_line(token_dataset, tmp_path):
    code, _, stderr = run_inprocess("train.py", *train_args(token_dataset, tmp_path, "--optimizer=sgd", "--max_iters=1"))
    assert (code, stderr) == (2, "error: optimizer='sgd': allowed are 'adamw', 'muon'\n")
    assert not list(tmp_path.glob("*.pt"))
