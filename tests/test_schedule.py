"""`fjordtune.train.schedule`: warm-up, then cosine / linear decay to min_lr at the last step."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from fjordtune.train.schedule import Schedule


def train(**kw):
    base = dict(lr=1e-3, min_lr=1e-4, lr_schedule="cosine", warmup_steps=4)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("name", ["cosine", "linear", "constant"])
def test_warmup_rises_linearly_to_the_peak(name: str) -> None:
    s = Schedule.for_job(train(lr_schedule=name), total_steps=20)
    assert [s.lr_at(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_decay_reaches_min_lr_at_the_last_step_and_never_rises(name: str) -> None:
    s = Schedule.for_job(train(lr_schedule=name), total_steps=20)
    lrs = [s.lr_at(i) for i in range(20)]
    assert lrs[-1] == pytest.approx(1e-4)
    after = lrs[3:]
    assert all(a >= b for a, b in zip(after, after[1:])), after
    assert min(lrs) == pytest.approx(1e-4)


def test_cosine_halfway_is_the_midpoint_and_linear_is_straight() -> None:
    cos = Schedule("cosine", 1.0, 0.0, 0, 11)
    lin = Schedule("linear", 1.0, 0.0, 0, 11)
    # step i is the (i+1)-th of 11 decay steps: progress (i+1)/11
    assert cos.lr_at(4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 11)))
    assert [lin.lr_at(i) for i in range(11)] == pytest.approx([1 - (i + 1) / 11 for i in range(11)])


def test_constant_stays_at_the_peak() -> None:
    s = Schedule.for_job(train(lr_schedule="constant", warmup_steps=0), total_steps=5)
    assert [s.lr_at(i) for i in range(5)] == [1e-3] * 5


def test_default_warmup_is_3_percent_at_least_one_step() -> None:
    assert Schedule.for_job(train(warmup_steps=None), total_steps=3820).warmup_steps == 115
    assert Schedule.for_job(train(warmup_steps=None), total_steps=10).warmup_steps == 1
    assert Schedule.for_job(train(warmup_steps=50), total_steps=10).warmup_steps == 10  # never past the end


def test_round_trip_and_differences_name_what_changed() -> None:
    s = Schedule.for_job(train(), total_steps=20)
    assert Schedule.from_dict(s.as_dict()) == s
    other = Schedule.for_job(train(), total_steps=30)
    assert s.differences(other) == ["total_steps 30 -> 20"]
    assert "cosine decay to 0.0001 at step 20" in s.describe()


def test_job_keys_validate(tmp_path) -> None:
    from fjordtune.config import load_job
    from fjordtune.errors import ConfigError as JobFileError

    job = load_job("jobs/demo.yaml", ["train.lr_schedule=linear", "train.grad_accum_steps=4"])
    assert job.train.lr_schedule == "linear" and job.train.grad_accum_steps == 4
    with pytest.raises(JobFileError) as info:
        load_job("jobs/demo.yaml", ["train.min_lr=1.0"])
    assert "min_lr" in str(info.value)
    with pytest.raises(JobFileError) as info:
        load_job("jobs/demo.yaml", ["train.lr_schedul=cosine"])
    assert "lr_schedule" in str(info.value)
