"""The multi-tensor kernels in scratchformer.kernels.adamw against their plain-PyTorch references.

Tolerances: fp32 weights/moments 1e-6 relative; with bf16/fp16 storage (no master copy) both sides round the
same fp32 value each step, and an fp32 ulp of difference can flip one rounding: one storage ulp (bf16 2^-8,
fp16 2^-11 relative to the largest value).
"""

import math

import pytest
import torch

from scratchformer.kernels.adamw import fused_adamw_, multi_tensor_norm, nonfinite_check_
from scratchformer.kernels.adamw_reference import adamw_reference_

SHAPES = [(37, 5), (1000,), (3,), (2, 129)]
TOL = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _state(device, dtype, master, amsgrad):
    sdtype = torch.float32 if master else dtype
    params = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    return dict(
        params=params,
        exp_avgs=[torch.zeros(s, device=device, dtype=sdtype) for s in SHAPES],
        exp_avg_sqs=[torch.zeros(s, device=device, dtype=sdtype) for s in SHAPES],
        max_exp_avg_sqs=[torch.zeros(s, device=device, dtype=sdtype) for s in SHAPES] if amsgrad else None,
        master_params=[p.float() for p in params] if master else None,
        state_steps=[torch.zeros((), device=device) for _ in SHAPES],
    )


def _run(fn, st, grads, **kw):
    fn(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"], st["master_params"],
       st["state_steps"], **kw)


def _clone(st):
    return {k: None if v is None else [x.clone() for x in v] for k, v in st.items()}


def _rel(a, b):
    a = torch.cat([x.float().flatten() for x in a])
    b = torch.cat([x.float().flatten() for x in b])
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "dtype,master,amsgrad",
    [(torch.float32, False, True), (torch.bfloat16, True, True), (torch.bfloat16, False, False),
     (torch.float16, True, False), (torch.float16, False, True)],
)
def test_fused_adamw_matches_reference(device, dtype, master, amsgrad):
    ours = _state(device, dtype, master, amsgrad)
    ref = _clone(ours)
    for step in range(6):
        grads = [torch.randn(s, device=device).to(dtype) * 8 for s in SHAPES]
        kw = dict(lr=1e-2, beta1=0.9 if step % 2 else 0.3, beta2=0.999, eps=1e-8, weight_decay=0.05,
                  amsgrad=amsgrad, maximize=step == 3, grad_scale=torch.full((1,), 8.0, device=device))
        # block=256: tensors span several programs and the last block of each is ragged
        _run(fused_adamw_, ours, grads, **kw, block=256, num_warps=4)
        _run(adamw_reference_, ref, grads, **kw)
    tol = TOL[torch.float32] if (master or dtype == torch.float32) else TOL[dtype]
    for key in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params"):
        if ours[key] is not None:
            assert _rel(ours[key], ref[key]) <= (TOL[dtype] if key == "params" and dtype != torch.float32
                                                  else tol), key
    if master:
        for p, w in zip(ours["params"], ours["master_params"]):
            assert torch.equal(p, w.to(dtype))  # round-to-nearest-even, also in the interpreter
    assert all(float(s) == 6.0 for s in ours["state_steps"])


def test_unaligned_views(device):
    """Tensors that start 4 bytes into a buffer (contiguous views at an odd offset) are not 16-byte aligned:
    the kernels must then be compiled without the alignment hint (ALIGNED=False) and still match."""
    from scratchformer.kernels.adamw import _launch_table

    def views(fill):
        bufs = [fill(1 + math.prod(s)) for s in SHAPES]
        return [b[1:].view(s) for b, s in zip(bufs, SHAPES)]

    def randn(n):
        return torch.randn(n, device=device)

    def rand(n):
        return torch.rand(n, device=device)

    ours = dict(params=views(randn), exp_avgs=views(rand), exp_avg_sqs=views(rand), max_exp_avg_sqs=None,
                master_params=None, state_steps=[torch.full((), 3.0, device=device) for _ in SHAPES])
    assert not _launch_table([ours["params"]], 256)[-1]
    assert _launch_table([[p.clone() for p in ours["params"]]], 256)[-1]
    ref = _clone(ours)
    grads = views(randn)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05)
    _run(fused_adamw_, ours, grads, **kw, block=256, num_warps=4)
    _run(adamw_reference_, ref, grads, **kw)
    for key in ("params", "exp_avgs", "exp_avg_sqs"):
        assert _rel(ours[key], ref[key]) <= TOL[torch.float32], key
    flat = torch.cat([g.flatten() for g in grads])
    assert torch.allclose(multi_tensor_norm(grads, block=256), flat.norm(), rtol=1e-6)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_lr_on_the_device_matches_the_reference(device, dtype, master):
    """A tensor lr (what a schedule updates in place, and what a captured CUDA graph replays) is read by the kernel
    at each launch: changing the tensor between launches changes the step, as a float lr would."""
    ours = _state(device, dtype, master, False)
    ref = _clone(ours)
    lr = torch.empty(1, device=device)
    for step, rate in enumerate([3e-2, 1e-3, 0.0, 7e-3]):
        lr.fill_(rate)
        grads = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
        kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        _run(fused_adamw_, ours, grads, lr=lr, **kw, block=256, num_warps=4)
        # the kernel forms 1 - lr * weight_decay in fp32, the reference in double: far inside the tolerance
        _run(adamw_reference_, ref, grads, lr=float(lr), **kw)
    tol = TOL[torch.float32] if (master or dtype == torch.float32) else TOL[dtype]
    for key in ("params", "exp_avgs", "exp_avg_sqs", "master_params"):
        if ours[key] is not None:
            assert _rel(ours[key], ref[key]) <= (TOL[dtype] if key == "params" else tol), key


def test_found_inf_skips_everything(device):
    st = _state(device, torch.float32, False, True)
    before = _clone(st)
    grads = [torch.randn(s, device=device) for s in SHAPES]
    _run(fused_adamw_, st, grads, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True,
                 found_inf=torch.ones(1, device=device))
    for k, v in st.items():
        if v is not None:
            assert all(torch.equal(a, b) for a, b in zip(v, before[k])), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_tensor_norm(device, dtype):
    xs = [torch.randn(s, device=device).to(dtype) for s in SHAPES]
    flat = torch.cat([x.float().flatten() for x in xs])
    assert torch.allclose(multi_tensor_norm(xs, block=256), flat.norm(), rtol=1e-6)
    assert torch.equal(multi_tensor_norm(xs, math.inf), flat.abs().max())
    with pytest.raises(ValueError, match="norm_type"):
        multi_tensor_norm(xs, 1.0)


@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")])
def test_nonfinite_check(device, bad):
    xs = [torch.randn(s, device=device) for s in SHAPES]
    if bad is not None:
        xs[3][1, 128] = bad  # the last element of a ragged block
    flag = torch.zeros(1, device=device)
    nonfinite_check_(xs, flag, block=256)
    assert float(flag) == (0.0 if bad is None else 1.0)


def test_bad_inputs_name_the_argument(device):
    st = _state(device, torch.float32, False, False)
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        grads = [torch.randn(s, device=device) for s in SHAPES]
        grads[1] = grads[1][::2]
        fused_adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], None, None, st["state_steps"], **kw)


def test_lr_on_the_device_compiles_once(device):
    """Under torch.compile a tensor lr is an input of the graph: a new rate reuses the graph (a float lr would be
    a constant in it, and a schedule would recompile it at every step), and the steps equal eager ones."""
    def step(st, grads, lr):
        fused_adamw_(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], None, None, st["state_steps"], lr=lr,
                     beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, block=256, num_warps=4)

    ours = _state(device, torch.float32, False, False)
    ref = _clone(ours)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    lr = torch.empty(1, device=device)
    for rate in (3e-2, 1e-3, 7e-3):
        grads = [torch.randn(s, device=device) for s in SHAPES]
        lr.fill_(rate)
        compiled(ours, grads, lr)
        step(ref, grads, lr)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        assert all(torch.equal(a, b) for a, b in zip(ours[key], ref[key])), key
