"""The LR schedules hit the values their docstring promises at warmup end, midway and the end."""

import math

import pytest
import torch

from scratchformer.train import (
    AdamW,
    DeviceSchedule,
    linear_warmup_cosine_decay_lambda,
    linear_warmup_cosine_decay_schedule,
    linear_warmup_linear_decay_lambda,
    linear_warmup_linear_decay_schedule,
)


@pytest.mark.parametrize("make", [linear_warmup_linear_decay_lambda, linear_warmup_cosine_decay_lambda])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_documented_values(make, min_ratio):
    f = make(10, 110, min_ratio)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(10) == pytest.approx(1.0)  # warmup end
    assert f(60) == pytest.approx(min_ratio + (1 - min_ratio) / 2)  # midway through the decay
    assert f(110) == pytest.approx(min_ratio) and f(500) == pytest.approx(min_ratio)  # end and after
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_shapes_differ_between_linear_and_cosine():
    lin, cos = linear_warmup_linear_decay_lambda(0, 100), linear_warmup_cosine_decay_lambda(0, 100)
    assert lin(25) == pytest.approx(0.75)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("make", [linear_warmup_linear_decay_schedule, linear_warmup_cosine_decay_schedule])
def test_scheduler_drives_our_adamw(make):
    p = torch.nn.Parameter(torch.randn(3))
    opt = AdamW([p], lr=2e-3, backend="torch")
    sched = make(opt, 4, 20, 0.25)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.randn(3)
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[4] == pytest.approx(2e-3) and lrs[12] == pytest.approx(2e-3 * 0.625)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)


def test_device_schedule_follows_lambda_lr_and_skips_on_the_device():
    """DeviceSchedule's rate is LambdaLR's get_last_lr() rounded once to fp32, step for step; a step taken with
    taken=0 (a skipped step) leaves count and rate where they were; its state loads back."""
    lam = linear_warmup_cosine_decay_lambda(3, 17, 0.1)
    p = torch.nn.Parameter(torch.randn(2))
    ref = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([p], lr=7e-4), lam)
    ours = DeviceSchedule(lam, 17, 7e-4, "cpu")
    taken = [1, 1, 0, 1, 0, 0, 1] + [1] * 13  # 17 steps taken in all
    for t in taken:
        assert ours.rate.item() == torch.tensor(ref.get_last_lr()[0], dtype=torch.float32).item()
        ours.step(taken=torch.tensor(float(t)))
        if t:
            ref.step()
    assert ours.state_dict() == {"last_epoch": ref.last_epoch} == {"last_epoch": 17}
    again = DeviceSchedule(lam, 17, 7e-4, "cpu")
    again.load_state_dict({"last_epoch": 9})
    assert again.steps.item() == 9 and again.rate.item() == torch.tensor(7e-4 * lam(9), dtype=torch.float32).item()
    with pytest.raises(ValueError, match="spans 17 steps"):
        again.load_state_dict({"last_epoch": 18})


def test_bad_arguments():
    with pytest.raises(ValueError, match="total_steps"):
        linear_warmup_linear_decay_lambda(10, 10)
    with pytest.raises(ValueError, match="min_ratio"):
        linear_warmup_cosine_decay_lambda(1, 10, 2.0)
