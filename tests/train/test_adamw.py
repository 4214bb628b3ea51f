"""scratchformer.train.AdamW against torch.optim.AdamW (Triton kernel on the GPU, or the interpreter on CPU).

Tolerance: fp32 parameters and moments within 1e-6 relative (max |ours - torch| / max |torch|) after many
steps, on both devices. Our kernel computes the bias corrections in fp32 on the device (torch: double on
the host), which changes the update by a few fp32 ulps of lr, far below that bound.
"""

import copy

import pytest
import torch

from scratchformer.train import AdamW, linear_warmup_cosine_decay_lambda

SHAPES = [(37, 5), (4099,), (3,), (7, 3, 2), (1,)]  # odd sizes; 4099 crosses the kernel's 4096 block
FP32_RTOL = 1e-6


def rel_err(a, b) -> float:
    """max |a - b| / max |b| over a tensor or a list of tensors taken together (one model's state: a moment
    that cancels to a tiny value in one small tensor is judged on the scale of the whole state)."""
    if isinstance(a, torch.Tensor):
        a, b = [a], [b]
    a = torch.cat([x.detach().float().flatten() for x in a])
    b = torch.cat([x.detach().float().flatten() for x in b])
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def make_params(device, dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]


def two_groups(params, **first):
    """Group 0 with weight decay (and `first` overrides), group 1 without, its own lr and betas."""
    return [dict(params=params[:3], weight_decay=0.1, **first),
            dict(params=params[3:], weight_decay=0.0, lr=3e-3, betas=(0.8, 0.99))]


def set_grads(params_lists, step, device, none_for=()):
    """The same fresh random gradients for every list of parameters (index i in none_for gets None)."""
    for i, ps in enumerate(zip(*params_lists)):
        g = None if i in none_for else torch.randn(ps[0].shape, device=device)
        for p in ps:
            p.grad = None if g is None else g.to(p.dtype)


@pytest.mark.parametrize("amsgrad,maximize", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_torch_adamw(device, amsgrad, maximize):
    ours_p = make_params(device)
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    kw = dict(lr=1e-2, amsgrad=amsgrad, maximize=maximize)
    ours = AdamW(two_groups(ours_p), **kw)
    ref = torch.optim.AdamW(two_groups(ref_p), **kw)
    lam = linear_warmup_cosine_decay_lambda(3, 25, 0.1)  # the lr changes every step: read per step
    s_ours = torch.optim.lr_scheduler.LambdaLR(ours, lam)
    s_ref = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    for step in range(25):
        # parameter 2 misses its gradient on some steps, so its step counter differs from the others'
        set_grads([ours_p, ref_p], step, device, none_for=(2,) if step % 4 == 1 else ())
        ours.step()
        ref.step()
        s_ours.step()
        s_ref.step()
    for p, q in zip(ours_p, ref_p):
        assert rel_err(p, q) <= FP32_RTOL
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"])
    for k in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
        err = rel_err([ours.state[p][k] for p in ours_p], [ref.state[q][k] for q in ref_p])
        assert err <= FP32_RTOL, (k, err)
    assert float(ours.state[ours_p[2]]["step"]) < 25  # the skipped-gradient path really happened


def test_torch_backend_matches_torch_adamw(device):
    ours_p = make_params(device)
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = AdamW(two_groups(ours_p), lr=1e-2, amsgrad=True, backend="torch")
    ref = torch.optim.AdamW(two_groups(ref_p), lr=1e-2, amsgrad=True)
    for step in range(10):
        set_grads([ours_p, ref_p], step, device)
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert rel_err(p, q) <= FP32_RTOL


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_lr_tensor_updated_in_place_matches_a_scheduled_float_lr(device, backend):
    """lr given as a device tensor (what the Trainer's DeviceSchedule writes in place): every group reads its
    current value at each step, exactly as torch's AdamW reads a float lr that LambdaLR changes."""
    ours_p = make_params(device)
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    rate = torch.full((1,), 1e-2, device=device)
    ours = AdamW([dict(params=ours_p[:3], weight_decay=0.1), dict(params=ours_p[3:], weight_decay=0.0)], lr=rate,
                 backend=backend)
    ref = torch.optim.AdamW([dict(params=ref_p[:3], weight_decay=0.1), dict(params=ref_p[3:], weight_decay=0.0)],
                            lr=1e-2)
    lam = linear_warmup_cosine_decay_lambda(3, 12, 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(ref, lam)
    for step in range(12):
        set_grads([ours_p, ref_p], step, device)
        rate.fill_(sched.get_last_lr()[0])
        ours.step()
        ref.step()
        sched.step()
    assert all(g["lr"] is rate for g in ours.param_groups)
    for p, q in zip(ours_p, ref_p):
        assert rel_err(p, q) <= FP32_RTOL


def test_auto_backend_choice(monkeypatch):
    opt = AdamW([torch.nn.Parameter(torch.randn(3))])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert opt._backend_for(torch.device("cpu")) == "torch"  # CPU without the interpreter: torch's fused path
    assert opt._backend_for(torch.device("cuda")) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert opt._backend_for(torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton'"):
        AdamW([torch.nn.Parameter(torch.randn(3))], backend="triton")._backend_for(torch.device("cpu"))


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_resume_from_state_dict_continues_identically(device, dtype, master):
    params = make_params(device, dtype)
    opt = AdamW(two_groups(params, amsgrad=True), lr=1e-2, master_weights=master)
    grads = [[torch.randn(s, device=device).to(dtype) for s in SHAPES] for _ in range(12)]
    saved = None
    for step, gs in enumerate(grads):
        if step == 6:
            saved = (copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params])
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    # A fresh model and optimizer, loaded from the half-way save, replays the second half.
    resumed = [torch.nn.Parameter(p) for p in saved[1]]
    opt2 = AdamW(two_groups(resumed, amsgrad=True), lr=1e-2, master_weights=master)
    opt2.load_state_dict(saved[0])
    if master:
        assert opt2.state[resumed[0]]["master_param"].dtype == torch.float32  # not cast to bf16 by torch
    for gs in grads[6:]:
        for p, g in zip(resumed, gs):
            p.grad = g
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_match_fp32_reference(device, dtype):
    low = make_params(device, dtype)
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in low]  # fp32 run from the same start
    ours = AdamW(two_groups(low), lr=1e-2, master_weights=True)
    ref = torch.optim.AdamW(two_groups(ref_p), lr=1e-2)
    for step in range(15):
        for p, q in zip(low, ref_p):
            g = torch.randn(p.shape, device=device).to(dtype)
            p.grad, q.grad = g, g.float()  # the reference sees exactly the low-precision gradient
        ours.step()
        ref.step()
    for p, q in zip(low, ref_p):
        st = ours.state[p]
        assert st["exp_avg"].dtype == torch.float32 and st["master_param"].dtype == torch.float32
        assert rel_err(st["master_param"], q) <= FP32_RTOL
        assert torch.equal(p.detach(), st["master_param"].to(dtype))  # parameter = rounded master
    for k in ("exp_avg", "exp_avg_sq"):
        assert rel_err([ours.state[p][k] for p in low], [ref.state[q][k] for q in ref_p]) <= FP32_RTOL, k


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()["state"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
@pytest.mark.parametrize("master", [False, True])
def test_nonfinite_gradient_skips_step(device, bad, master):
    dtype = torch.bfloat16 if master else torch.float32
    params = make_params(device, dtype)
    ref_p = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt = AdamW(two_groups(params, amsgrad=True), lr=1e-2, master_weights=master)
    ref = torch.optim.AdamW(two_groups(ref_p, amsgrad=True), lr=1e-2)
    scale = 1024.0
    for step in range(4):
        for p, q in zip(params, ref_p):
            g = torch.randn(p.shape, device=device).to(dtype)
            p.grad = g * scale
            q.grad = (g * scale).float() / scale
        before = _snapshot(opt, params)
        if step == 2:
            params[3].grad.view(-1)[-1] = bad  # one element of a no-decay group's gradient
        opt.step(grad_scale=scale)
        if step == 2:
            assert float(opt.found_inf) == 1.0
            after = _snapshot(opt, params)
            for a, b in zip(before[0], after[0]):
                assert torch.equal(a, b)
            for i, st in before[1].items():
                for k, v in st.items():
                    assert torch.equal(v, after[1][i][k]), k  # step counters included
        else:
            assert float(opt.found_inf) == 0.0
            ref.step()
    for p, q in zip(params, ref_p):
        w = opt.state[p]["master_param"] if master else p
        assert rel_err(w, q) <= FP32_RTOL  # the scaled steps equal unscaled torch steps


def test_external_found_inf_skips(device):
    params = make_params(device)
    opt = AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = _snapshot(opt, params)
    opt.step(found_inf=torch.ones((), device=device))
    after = _snapshot(opt, params)
    assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
    assert float(opt.state[params[0]]["step"]) == 1.0
    opt.step(found_inf=torch.zeros((), device=device))
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert not torch.equal(params[0], after[0][0])


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="lr"):
        AdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="one fp32 element"):
        AdamW(p, lr=torch.full((2,), 1e-3))
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="backend"):
        AdamW(p, backend="cuda")
    q = torch.nn.Parameter(torch.randn(4, 6).t())
    q.grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match="contiguous"):
        AdamW([q]).step()
