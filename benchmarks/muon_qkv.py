"""
Should Muon orthogonalise the fused q, k, v matrix (c_attn, 3C x C) whole, or q, k and v separately
(three C x C matrices, as if they were separate parameters)? Trains the same short run both ways and
prints the final val losses. The split variant wraps torch's Newton-Schulz step for this measurement
only; model.py keeps c_attn whole (see docs/recipe.md, 'Muon').

$ python benchmarks/muon_qkv.py --data_dir=data/en_docs
"""
import argparse
import json
import runpy
import sys
from pathlib import Path

import torch
import torch.optim._muon as torch_muon

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # train.py imports its neighbours
whole_newton_schulz = torch_muon._zeropower_via_newtonschulz


def split_newton_schulz(n_embd):
    """Newton-Schulz on each C x C third of a 3C x C update; other shapes unchanged. torch scales a
    3C x C update by sqrt(3) (its 'original' lr adjustment), three separate C x C ones by 1: undone here."""
    def orthogonalise(update, *args):
        if update.shape != (3 * n_embd, n_embd):
            return whole_newton_schulz(update, *args)
        parts = [whole_newton_schulz(part, *args) for part in update.split(n_embd, dim=0)]
        return torch.cat(parts) / 3 ** 0.5
    return orthogonalise


def train(args, variant, seed):
    out_dir = Path(args.out_root) / f"{variant}-s{seed}"
    torch_muon._zeropower_via_newtonschulz = split_newton_schulz(args.n_embd) if variant == "split" else whole_newton_schulz
    sys.argv = ["train.py", f"--data_dir={args.data_dir}", f"--out_dir={out_dir}", "--optimizer=muon",
                f"--muon_lr={args.muon_lr}", "--learning_rate=4e-3", "--min_lr=4e-4", f"--max_iters={args.iters}",
                f"--lr_decay_iters={args.iters}", "--warmup_iters=2", "--lr_schedule=wsd", f"--eval_interval={args.iters}",
                "--eval_iters=5", "--n_layer=4", "--n_head=2", f"--n_embd={args.n_embd}", "--block_size=128",
                "--batch_size=8", "--gradient_accumulation_steps=1", "--bias=False", "--rotary=True", "--qk_norm=True",
                "--norm=rmsnorm", "--mlp=relu2", "--tie_embeddings=False", "--zero_init_proj=True",
                "--compile=False", "--device=cpu", "--dtype=float32", "--log_interval=10", f"--seed={seed}"]
    try:
        runpy.run_path(str(REPO / "train.py"), run_name="__main__")
    finally:
        torch_muon._zeropower_via_newtonschulz = whole_newton_schulz
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--out_root", default=str(REPO / "out-muon-qkv"))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--n_embd", type=int, default=64)
    p.add_argument("--muon_lr", type=float, default=0.02)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    results = {(variant, seed): train(args, variant, seed) for seed in args.seeds for variant in ("whole", "split")}
    for variant in ("whole", "split"):
        losses = [results[variant, seed] for seed in args.seeds]
        print(f"c_attn orthogonalised {variant}: final val loss {' / '.join(f'{v:.4f}' for v in losses)}, "
              f"mean {sum(losses) / len(losses):.4f}")


if __name__ == "__main__":
    main()
