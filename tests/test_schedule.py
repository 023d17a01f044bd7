"""Learning-rate schedules: warmup, peak, decay, and what happens after the planned end; each as a multiplier
of a param group's own peak."""
import math

import pytest

from kit.schedule import cooldown_start, get_lr, lr_multiplier

BASE = dict(learning_rate=5e-4, min_lr=5e-5, warmup_iters=200, lr_decay_iters=6000, max_iters=6000,
            cooldown_frac=0.2)


def lr(it, schedule="cosine", **overrides):
    return get_lr(it, {**BASE, "lr_schedule": schedule, **overrides})


def test_cosine_warmup_peak_decay_and_after():
    assert lr(0) == pytest.approx(5e-4 / 201)  # warmup starts small but not at zero
    assert lr(199) == pytest.approx(5e-4 * 200 / 201)
    assert lr(200) == pytest.approx(5e-4)  # peak
    midpoint = 200 + (6000 - 200) // 2
    assert lr(midpoint) == pytest.approx(5e-5 + 0.5 * (5e-4 - 5e-5))
    assert lr(6000) == pytest.approx(5e-5)  # end of decay
    assert lr(12000) == pytest.approx(5e-5)  # past the plan: stays at min_lr
    values = [lr(i) for i in range(200, 6001, 50)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_cosine_follows_the_formula():
    it = 1234
    progress = (it - 200) / (6000 - 200)
    assert lr(it) == pytest.approx(5e-5 + 0.5 * (1 + math.cos(math.pi * progress)) * (5e-4 - 5e-5))


def test_wsd_stable_then_linear_cooldown():
    assert cooldown_start(6000, 0.2) == 4800
    assert lr(1000, "wsd") == lr(4799, "wsd") == pytest.approx(5e-4)
    assert lr(5400, "wsd") == pytest.approx(5e-4 + 0.5 * (5e-5 - 5e-4))
    assert lr(6000, "wsd") == pytest.approx(5e-5)
    assert lr(7000, "wsd") == pytest.approx(5e-5)


def test_wsd_extended_while_stable_moves_the_cooldown():
    """A wsd run resumed during its stable phase with a larger max_iters simply stays stable longer."""
    assert lr(4000, "wsd") == lr(4000, "wsd", max_iters=12000) == pytest.approx(5e-4)
    assert lr(9000, "wsd", max_iters=12000) == pytest.approx(5e-4)
    assert lr(12000, "wsd", max_iters=12000) == pytest.approx(5e-5)


def test_constant_and_unknown_schedule():
    assert lr(5000, "constant") == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        lr(0, "linear")


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_the_multiplier_is_the_same_for_every_peak(schedule):
    """Muon at muon_lr and AdamW at learning_rate follow one shape: the multiplier depends on min_lr's ratio
    to learning_rate, not on the peak itself."""
    config = {**BASE, "lr_schedule": schedule}
    scaled = {**config, "learning_rate": 0.02, "min_lr": 0.002}  # the same ratio, another peak
    for it in (0, 150, 200, 3000, 5400, 6000, 9000):
        assert 0 < lr_multiplier(it, config) <= 1
        assert lr_multiplier(it, config) == pytest.approx(lr_multiplier(it, scaled), rel=1e-12)
        assert get_lr(it, config) == pytest.approx(5e-4 * lr_multiplier(it, config), rel=1e-12)


def test_a_zero_learning_rate_decays_the_other_peaks_to_zero():
    config = {**BASE, "lr_schedule": "cosine", "learning_rate": 0.0, "min_lr": 0.0}
    assert lr_multiplier(200, config) == 1.0 and lr_multiplier(6000, config) == 0.0
