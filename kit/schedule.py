"""
The learning-rate schedule: the one place that maps an iteration to a learning rate.

- 'cosine' (nanoGPT): linear warmup to learning_rate over warmup_iters, cosine decay to min_lr at
  lr_decay_iters, then min_lr for ever after. Training past lr_decay_iters continues at min_lr.
- 'wsd' (warmup-stable-decay): linear warmup, then learning_rate held constant, then a linear
  cooldown to min_lr over the last cooldown_frac of max_iters. The stable phase is open-ended:
  resuming a run that is still stable with a larger max_iters simply moves the cooldown later.
- 'constant': linear warmup, then learning_rate.

A resumed run uses the schedule of its current config; train.py compares it with the schedule the
checkpoint was trained under (schedule_args of the checkpoint's config) to refuse an accidental
jump up in learning rate.
"""
import math

SCHEDULES = ("cosine", "wsd", "constant")


def get_lr(it, *, schedule, learning_rate, min_lr, warmup_iters, lr_decay_iters, max_iters, cooldown_frac):
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}: allowed are {', '.join(map(repr, SCHEDULES))}")
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError(f"cooldown_frac={cooldown_frac}: must be between 0 and 1 (the cooled-down share of max_iters)")
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if schedule == "constant":
        return learning_rate
    if schedule == "wsd":
        start = cooldown_start(max_iters, cooldown_frac)
        if it < start:
            return learning_rate
        progress = min(1.0, (it - start) / max(1, max_iters - start))
        return learning_rate + progress * (min_lr - learning_rate)
    if it >= lr_decay_iters:
        return min_lr
    progress = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def cooldown_start(max_iters, cooldown_frac):
    """First iteration of the wsd cooldown: the last moment a run can still be extended for free."""
    return max_iters - int(cooldown_frac * max_iters)


def schedule_args(config):
    """The keyword arguments of get_lr, from a training config (train.py's, or a checkpoint's)."""
    return dict(schedule=config["lr_schedule"], learning_rate=config["learning_rate"], min_lr=config["min_lr"],
                warmup_iters=config["warmup_iters"], lr_decay_iters=config["lr_decay_iters"],
                max_iters=config["max_iters"], cooldown_frac=config["cooldown_frac"])
