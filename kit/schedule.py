"""
The learning-rate schedule: the one place that maps an iteration to a learning rate, as a multiplier of
the peak. Each optimizer's parameter group keeps its own peak (group["initial_lr"]: learning_rate for
AdamW, muon_lr for Muon) and runs at initial_lr * lr_multiplier(it), so every optimizer follows one shape.

- 'cosine' (nanoGPT): linear warmup to the peak over warmup_iters, cosine decay to min_lr at
  lr_decay_iters, then min_lr for ever after. Training past lr_decay_iters continues at min_lr.
- 'wsd' (warmup-stable-decay): linear warmup, then the peak held constant, then a linear cooldown to
  min_lr over the last cooldown_frac of max_iters. The stable phase is open-ended: resuming a run that is
  still stable with a larger max_iters simply moves the cooldown later.
- 'constant': linear warmup, then the peak.

min_lr is learning_rate's floor; each optimizer decays to the same fraction of its own peak.
A resumed run uses the schedule of its current config; check_resume_lr compares it with the schedule the
checkpoint was trained under, to refuse an accidental jump up in learning rate.
"""
import math

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(it, config):
    """The learning rate at iteration it as a fraction of the peak, under a training config (train.py's, or a
    checkpoint's): (0, 1] in warmup, 1 at the peak, min_lr / learning_rate at the end."""
    schedule, warmup_iters, lr_decay_iters, max_iters, cooldown_frac = (
        config[k] for k in ("lr_schedule", "warmup_iters", "lr_decay_iters", "max_iters", "cooldown_frac"))
    # a learning_rate of 0 leaves AdamW still whatever the ratio: Muon then decays to zero
    min_lr_ratio = config["min_lr"] / config["learning_rate"] if config["learning_rate"] > 0 else 0.0
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: allowed are {', '.join(map(repr, SCHEDULES))}")
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError(f"cooldown_frac={cooldown_frac}: must be between 0 and 1 (the cooled-down share of max_iters)")
    if it < warmup_iters:
        return (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = cooldown_start(max_iters, cooldown_frac)
        if it < start:
            return 1.0
        progress = min(1.0, (it - start) / max(1, max_iters - start))
        return 1.0 + progress * (min_lr_ratio - 1.0)
    if it >= lr_decay_iters:
        return min_lr_ratio
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_lr_ratio)


def cooldown_start(max_iters, cooldown_frac):
    """First iteration of the wsd cooldown: the last moment a run can still be extended for free."""
    return max_iters - int(cooldown_frac * max_iters)


def get_lr(it, config):
    """AdamW's learning rate at iteration it under config (the one train.py logs as lr)."""
    return config["learning_rate"] * lr_multiplier(it, config)


def check_resume_lr(saved_config, iter_num, config):
    """ValueError when config's schedule would raise the learning rate at iter_num above the one the
    checkpoint's own schedule (saved_config) planned there: a larger max_iters or lr_decay_iters by accident."""
    try:
        planned_lr = get_lr(iter_num, saved_config)
    except (KeyError, TypeError, ValueError):  # a checkpoint from another tool (nanoGPT): nothing to compare
        return
    lr = get_lr(iter_num, config)
    if lr > planned_lr * (1 + 1e-6) and not config["allow_lr_increase"]:
        raise ValueError(
            f"resuming at iteration {iter_num} would raise the learning rate from {planned_lr:.3g} (the "
            f"checkpoint's schedule) to {lr:.3g} (lr_schedule={config['lr_schedule']}, max_iters="
            f"{config['max_iters']}, lr_decay_iters={config['lr_decay_iters']}); "
            + ("to extend a wsd run, resume from before its cooldown (--resume_from=stable); "
               if config["lr_schedule"] == "wsd" else "")
            + "see docs/training.md, 'Training past the plan', or pass --allow_lr_increase=True")
