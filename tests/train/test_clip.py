"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: same total norm (fp32, 1e-6 relative: the sum
order differs) and the same clipped gradients."""

import math

import pytest
import torch

from scratchformer.train import clip_grad_norm_
from scratchformer.train.clip import clip_divisor

SHAPES = [(37, 5), (4099,), (3,), (7, 3, 2)]


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clips / leaves alone
def test_matches_torch(device, norm_type, max_norm):
    ours = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for i, (p, q) in enumerate(zip(ours, ref)):
        if i != 2:  # one parameter without a gradient
            p.grad = torch.randn(p.shape, device=device) * (i + 1)
            q.grad = p.grad.clone()
    total = clip_grad_norm_(ours, max_norm, norm_type)
    total_ref = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type)
    assert torch.allclose(total, total_ref, rtol=1e-6, atol=0)
    for p, q in zip(ours, ref):
        if q.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=2e-6, atol=1e-7)
    grads = torch.cat([p.grad.flatten() for p in ours if p.grad is not None])
    expected = min(max_norm, total.item())  # clipped down to max_norm, or untouched
    assert torch.linalg.vector_norm(grads, norm_type).item() == pytest.approx(expected, rel=1e-5)


def test_nonfinite_raises_when_asked(device):
    p = torch.nn.Parameter(torch.randn(5, device=device))
    p.grad = torch.tensor([1.0, float("nan"), 0, 0, 0], device=device)
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_([p], 1.0, error_if_nonfinite=True)


def test_infinite_max_norm_only_measures(device, monkeypatch):
    """max_norm=inf (how the Trainer asks for the norm): torch's total, and no pass over the gradients."""
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    before = [p.grad.clone() for p in params]
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: calls.append(a) or real(*a, **k))
    total = clip_grad_norm_(params, math.inf)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in before]))
    assert torch.allclose(total, expected, rtol=1e-6, atol=0)
    assert not calls and all(torch.equal(p.grad, b) for p, b in zip(params, before))


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_dividing_by_clip_divisor_clips_as_torch(device, max_norm):
    """The Trainer's clipping: the norm measured with max_norm=inf, the gradients divided by clip_divisor (as
    AdamW's grad_scale does): the gradients torch's clip_grad_norm_ leaves, to fp32 rounding."""
    ours = [torch.nn.Parameter(torch.randn(s, device=device)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for p, q in zip(ours, ref):
        p.grad = torch.randn(p.shape, device=device)
        q.grad = p.grad.clone()
    divisor = clip_divisor(clip_grad_norm_(ours, math.inf), max_norm)
    torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert divisor.device == ours[0].grad.device and divisor.dim() == 0
    for p, q in zip(ours, ref):
        assert torch.allclose(p.grad / divisor, q.grad, rtol=2e-7, atol=0)
    assert (divisor.item() == 1.0) == (max_norm == 1e6)  # the large bound leaves the gradients alone
    assert not torch.isfinite(clip_divisor(torch.tensor(float("nan")), 1.0))  # a NaN norm is no bound
