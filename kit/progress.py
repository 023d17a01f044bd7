"""
What a training run records of itself: metrics.jsonl (Metrics), and how long the run has taken and how long
it has left (Progress): train.py's log line (elapsed, left, the finish time of day), metrics.jsonl's
elapsed_s / eta_s, the start banner's "the whole run will take", and the max_hours time budget.

Time left = iterations left x the recent seconds per iteration + evaluations left x the seconds an
evaluation (with its checkpoint save) took. Only recent iterations count, so a card that warms up, throttles
or gets shared shows up in the estimate within a few log lines; the first iteration of a run is left out
(compilation, allocator and cuBLAS warm-up make it slow). A checkpoint stores state_dict(), so a resumed run
continues the elapsed time and starts from the rates it had.
"""
import json
import os
import time
from collections import deque

from configurator import first_line
from kit.atomic import append_line


class Metrics:
    """out_dir/metrics.jsonl, one JSON line per log step or evaluation (and wandb, if wandb_log), written by
    rank 0. A failed append (a full disk) leaves the file whole and is kept in .problem: the run then saves
    and stops at the next iteration (kit/guard.py's Stopper)."""

    def __init__(self, out_dir, wandb_config=None):
        """wandb_config: the run's config, to log to wandb too (its wandb_project and wandb_run_name)."""
        self.path, self.wandb, self.problem = os.path.join(out_dir, "metrics.jsonl"), None, ""
        if wandb_config:
            import wandb  # start_checks made sure it imports, on every rank
            wandb.init(project=wandb_config["wandb_project"], name=wandb_config["wandb_run_name"],
                       config=wandb_config, resume="allow")
            self.wandb = wandb

    def log(self, record):
        try:
            append_line(self.path, json.dumps(record) + "\n")
        except OSError as e:
            self.problem = self.problem or f"cannot append to {self.path}: {e.strerror or first_line(e)}"
        if self.wandb:  # wandb charts numbers; the samples go as a table, one row per sample
            self.wandb.log({k: self.wandb.Table(columns=["sample"], data=[[t] for t in v]) if k == "samples" else v
                            for k, v in record.items() if k != "iter" and v is not None}, step=record["iter"])

    def close(self):
        if self.wandb:
            self.wandb.finish()


class Progress:
    """Call iteration_done() after each training iteration and evaluation_done() after each evaluation;
    clock is time.time (a fake one in tests)."""

    def __init__(self, iter_num, max_iters, eval_interval, saved=None, clock=time.time, window=20):
        saved = saved or {}
        self.max_iters, self.eval_interval, self.clock = max_iters, eval_interval, clock
        self.session_start = self.mark = clock()
        self.run_start = self.session_start - saved.get("elapsed_s", 0.0)
        self.iter_seconds = deque(maxlen=window)  # the recent iterations' durations
        self.saved_seconds_per_iter = saved.get("seconds_per_iter")  # until this run has measured its own
        self.seconds_per_eval = saved.get("seconds_per_eval")
        self.first_iteration, self.planned = True, False

    def iteration_done(self):
        now = self.clock()
        if not self.first_iteration:
            self.iter_seconds.append(now - self.mark)
        self.first_iteration, self.mark = False, now

    def evaluation_done(self):
        """Everything since the last iteration was the evaluation (and its save)."""
        now = self.clock()
        self.seconds_per_eval, self.mark = now - self.mark, now

    def seconds_per_iter(self):
        if self.iter_seconds:
            return sum(self.iter_seconds) / len(self.iter_seconds)
        return self.saved_seconds_per_iter

    def elapsed(self):
        """Seconds since the run started, the time of the runs it resumed from included."""
        return self.clock() - self.run_start

    def evaluations_left(self, iter_num):
        """Evaluations still to come once iteration iter_num is done: at each multiple of eval_interval
        from iter_num on (the one at iter_num runs after its log line) and at max_iters, train.py's rule."""
        left = self.max_iters // self.eval_interval - (iter_num - 1) // self.eval_interval
        return left + (1 if self.max_iters % self.eval_interval else 0)

    def eta(self, iter_num):
        """Seconds left after iteration iter_num, or None before any iteration has been timed."""
        per_iter = self.seconds_per_iter()
        if per_iter is None:
            return None
        return (self.max_iters - iter_num) * per_iter + self.evaluations_left(iter_num) * (self.seconds_per_eval or 0.0)

    def next_would_pass(self, budget_seconds, iter_num):
        """True when what comes after iteration iter_num, the evaluation due there (if any) and the next
        iteration, would end past budget_seconds of this session; budget 0 = none. Unknown (False) before
        the first iteration has been timed."""
        per_iter = self.seconds_per_iter()
        if not budget_seconds or per_iter is None or iter_num >= self.max_iters:
            return False
        evaluation = (self.seconds_per_eval or 0.0) if iter_num % self.eval_interval == 0 else 0.0
        return self.clock() - self.session_start + evaluation + per_iter > budget_seconds

    def log_text(self, iter_num):
        """', 1h02m elapsed, 3h10m left (done Tue 17:45)' for the log line."""
        eta, now = self.eta(iter_num), self.clock()
        text = f", {duration(self.elapsed())} elapsed"
        return text if eta is None else text + f", {duration(eta)} left (done {finish_time(now + eta, now)})"

    def plan_due(self, iterations=5):
        """True once, when enough iterations have been timed to say what the whole run will take."""
        due = not self.planned and len(self.iter_seconds) >= iterations
        self.planned = self.planned or due
        return due

    def plan_text(self, iter_num):
        per_iter, eta, now = self.seconds_per_iter(), self.eta(iter_num), self.clock()
        return (f"at {per_iter * 1000:,.0f} ms/iter"
                + (f" and {self.seconds_per_eval:.1f} s per evaluation" if self.seconds_per_eval else "")
                + f", the whole run takes ~{duration(self.elapsed() + eta)}: {duration(eta)} left, "
                  f"done {finish_time(now + eta, now)}")

    def state_dict(self):
        return {"elapsed_s": self.elapsed(), "seconds_per_iter": self.seconds_per_iter(),
                "seconds_per_eval": self.seconds_per_eval}


def duration(seconds):
    """12s, 4m05s, 3h10m, 2d04h: two units are enough to plan by."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def finish_time(timestamp, now=None):
    """The local time of day, with the weekday when it is not today (runs last days)."""
    finish, today = time.localtime(timestamp), time.localtime(now)
    same_day = finish[:3] == today[:3]
    return time.strftime("%H:%M" if same_day else "%a %H:%M", finish)
