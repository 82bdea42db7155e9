"""o schedules: end points, the reference's cosine values, and the scheduler object."""

import math

import pytest
import torch

import reste


def test_cosine_matches_reference_values():
    s = reste.o_schedule("cosine", o_end=3.0)
    got = [round(s(e / 1000), 3) for e in (250, 500, 750, 999)]
    assert got == [1.152, 1.586, 2.235, 2.997]


@pytest.mark.parametrize("way", ["linear", "cosine", "power"])
@pytest.mark.parametrize("o_end", [1.0, 2.0, 3.0, 4.5])
def test_progressive_ways_hit_end_points_and_rise(way, o_end):
    s = reste.o_schedule(way, o_end=o_end)
    assert s(0.0) == pytest.approx(1.0)
    assert s(1.0) == pytest.approx(o_end)
    values = [s(r / 20) for r in range(21)]
    assert values == sorted(values)


def test_formulas_at_midpoint():
    assert reste.o_schedule("linear", o_end=3)(0.5) == pytest.approx(2.0)
    assert reste.o_schedule("power", o_end=3)(0.5) == pytest.approx(1.5)  # p = 2
    assert reste.o_schedule("power", o_end=3, p=3)(0.5) == pytest.approx(1.25)
    assert reste.o_schedule("cosine", o_end=3)(0.5) == pytest.approx(1 + 2 * (1 - math.cos(math.pi / 4)))


def test_fixed_is_constant_and_accepts_o_alias():
    s = reste.o_schedule("fixed", o=2.0)
    assert {s(0.0), s(0.4), s(1.0)} == {2.0}
    assert reste.o_schedule("fixed", o=2.0, o_end=2)(0.5) == 2.0  # the same value twice is one setting
    # o and o_end are one setting: o=2, o_end=3 used 2 silently
    with pytest.raises(TypeError, match="got o=2.0 and o_end=3: they are one setting, give one"):
        reste.o_schedule("fixed", o=2.0, o_end=3)
    assert reste.o_schedule("cosine")(1.0) == 3.0  # o_end defaults to 3


def test_progress_is_clamped():
    s = reste.o_schedule("linear", o_end=3)
    assert s(-1) == 1.0 and s(2) == 3.0


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="unknown o schedule way 'cos'"):
        reste.o_schedule("cos")
    for bad in (0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="o_end must be a finite number >= 1"):
            reste.o_schedule("cosine", o_end=bad)
    with pytest.raises(TypeError, match="unexpected"):
        reste.o_schedule("linear", q=1)
    with pytest.raises(ValueError, match="Did you mean 'cosine'"):
        reste.o_schedule("Cosin")


def test_scheduler_refuses_a_name_for_the_schedule_and_fractional_counts():
    model = _model()
    with pytest.raises(TypeError, match=r"reste.o_schedule\('cosine', o_end=3\)"):
        reste.EstimatorScheduler(model, "cosine", 2, 2)
    for epochs, steps in ((2.5, 2), (2, 0), (True, 2)):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            reste.EstimatorScheduler(model, None, epochs, steps)
    # any callable progress -> o is a schedule
    sched = reste.EstimatorScheduler(model, lambda r: 1.0 + 2.0 * r, 4, 1, per="epoch")
    sched.step_epoch(2)
    assert float(model[1].weight_estimator.o) == 2.0 and sched.o == 2.0


def _model():
    return reste.binarize(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)))


def test_scheduler_per_epoch_sets_o_on_every_estimator():
    model = _model()
    sched = reste.EstimatorScheduler(
        model, reste.o_schedule("cosine", o_end=3), epochs=1000, steps_per_epoch=5, per="epoch"
    )
    sched.step_epoch(500)
    for _ in range(5):
        sched.step_iter()  # per-epoch: o does not move inside the epoch
    assert float(model[1].weight_estimator.o) == pytest.approx(1.586, abs=1e-3)
    assert float(model[1].input_estimator.o) == pytest.approx(1.586, abs=1e-3)
    assert sched.o == pytest.approx(1.586, abs=1e-3)


def test_scheduler_per_step_and_state_dict_round_trip():
    model = _model()
    sched = reste.EstimatorScheduler(
        model, reste.o_schedule("linear", o_end=3), epochs=2, steps_per_epoch=10, per="step"
    )
    sched.step_epoch(0)
    for _ in range(15):
        sched.step_iter()
    assert sched.o == pytest.approx(1 + 2 * 14 / 20)
    state = sched.state_dict()
    other_model = _model()
    other = reste.EstimatorScheduler(
        other_model, reste.o_schedule("linear", o_end=3), epochs=2, steps_per_epoch=10, per="step"
    )
    other.load_state_dict(state)
    assert float(other_model[1].weight_estimator.o) == pytest.approx(sched.o)
    other.step_iter()
    sched.step_iter()
    assert other.o == pytest.approx(sched.o)


def test_scheduler_drives_progress_based_estimators():
    model = reste.binarize(
        torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), estimator="ede"
    )
    sched = reste.EstimatorScheduler(model, None, epochs=10, steps_per_epoch=1)
    sched.step_epoch(10)
    assert float(model[1].weight_estimator.t) == pytest.approx(10.0, rel=1e-6)
    assert sched.o is None


def test_scheduler_default_matches_the_training_config():
    from reste.train.config import Config

    sched = reste.EstimatorScheduler(_model(), reste.o_schedule("linear", o_end=3), epochs=2, steps_per_epoch=10)
    assert sched.per == Config().estimator.per == "step"
    sched.step_epoch(0)
    for _ in range(5):
        sched.step_iter()
    assert sched.o == pytest.approx(1 + 2 * 4 / 20)  # moves inside the epoch


def test_scheduler_warns_once_about_epochs_counted_from_1_and_a_loop_without_step_iter():
    import warnings

    def run(first_epoch, call_iter=True, per="step"):
        sched = reste.EstimatorScheduler(_model(), reste.o_schedule("cosine", o_end=3), 3, 4, per=per)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for epoch in range(first_epoch, first_epoch + 3):
                sched.step_epoch(epoch)
                for _ in range(4):
                    if call_iter:
                        sched.step_iter()
            sched.step_epoch(3)  # after the loop, to evaluate at the schedule's end: no training step follows
        return [str(w.message) for w in caught]

    assert run(0) == [] and run(0, call_iter=False, per="epoch") == []
    # counting from 1: o reached o_end for the whole last epoch, silently
    assert run(1) == [
        "a training step in epoch 3 of a schedule of epochs=3: step_epoch() counts from 0, so the last epoch is 2; "
        "counting from 1 runs the schedule one epoch ahead (o at o_end for the whole last epoch)"
    ]
    # per='step' without step_iter(): o moved only at epoch starts, silently
    assert run(0, call_iter=False) == [
        "no step_iter() call during epoch 0: with per='step' o moves at every step_iter(), so it changed only at "
        "epoch starts; call scheduler.step_iter() before each optimisation step, or build the scheduler with "
        "per='epoch'"
    ]
