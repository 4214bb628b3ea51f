"""layer_norm (Triton LayerNorm, optionally fused with the residual add) against F.layer_norm.

The reference runs in float64 on the same inputs (rounded to the tested dtype first), and
    error = max |ours - reference| / max |reference|
must stay below a tolerance per dtype. The kernels do fp32 statistics and no matrix products, so the
bounds are the same on the GPU and under the interpreter.
"""

import pytest
import torch

from scratchformer.kernels import layer_norm, layer_norm_reference

# fp16/bf16: y, s and the gradients are rounded to the dtype once (the maths is fp32).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(rows_shape, dim, dtype, device, residual=False, affine=True):
    """Random x with a nonzero mean and scale per row (LayerNorm must remove both), random w and b."""
    x = (torch.randn(*rows_shape, dim, device=device) * 3 + torch.randn(*rows_shape, 1, device=device)).to(dtype)
    weight = (1 + 0.5 * torch.randn(dim, device=device)).to(dtype) if affine else None
    bias = torch.randn(dim, device=device).to(dtype) if affine else None
    r = torch.randn(*rows_shape, dim, device=device).to(dtype) if residual else None
    return x, weight, bias, r


def run_both(x, weight, bias, r, eps=1e-5, use_s=True):
    """Forward + backward of ours and of the float64 reference on the same upstream gradients.

    With a residual, the returned s also gets an upstream gradient (when use_s), as in a pre-LN block
    where s continues down the residual stream. Returns (ours, ref): dicts of outputs and gradients.
    """
    leaves = {"x": x, "weight": weight, "bias": bias, "r": r}
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items() if v is not None}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}

    def call(fn, t):
        return fn(t["x"], t.get("weight"), t.get("bias"), eps, residual=t.get("r"))

    out = call(layer_norm, leaves)
    ref_out = call(layer_norm_reference, ref_leaves)
    outs = (out,) if r is None else out
    ref_outs = (ref_out,) if r is None else ref_out
    grads_up = [torch.randn_like(o) for o in outs]
    if r is not None and not use_s:
        outs, ref_outs, grads_up = outs[:1], ref_outs[:1], grads_up[:1]
    torch.autograd.backward(outs, grads_up)
    torch.autograd.backward(ref_outs, [g.double() for g in grads_up])
    ours = {f"out{i}": o for i, o in enumerate(outs)} | {f"d{k}": v.grad for k, v in leaves.items()}
    ref = {f"out{i}": o for i, o in enumerate(ref_outs)} | {f"d{k}": v.grad for k, v in ref_leaves.items()}
    return ours, ref


def assert_close(ours, ref, dtype, tol=None):
    tol = TOLERANCE[dtype] if tol is None else tol
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


# (rows, dim): rows 1 / 7 / 41 and widths that are not powers of two (masked tail of the row block).
SHAPES = [(1, 1023), (7, 96), (41, 384), (7, 45)]


@pytest.mark.parametrize("rows,dim", SHAPES)
def test_fp32_forward_and_grads(device, rows, dim):
    ours, ref = run_both(*make_inputs((rows,), dim, torch.float32, device))
    assert_close(ours, ref, torch.float32)
    assert ours["out0"].dtype == torch.float32


@pytest.mark.parametrize("rows,dim", SHAPES)
def test_fp32_fused_residual(device, rows, dim):
    ours, ref = run_both(*make_inputs((rows,), dim, torch.float32, device, residual=True))
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("residual", [False, True])
def test_half_precision(device, dtype, residual):
    x, w, b, r = make_inputs((3, 13), 384, dtype, device, residual=residual)
    ours, ref = run_both(x, w, b, r)
    assert_close(ours, ref, dtype)
    for name in ("out0", "dx", "dweight", "dbias"):
        assert ours[name].dtype == dtype, name


def test_residual_gradient_only_through_y(device):
    """BERT's post-LN: only y is used downstream; x and r both get the LayerNorm's input gradient."""
    ours, ref = run_both(*make_inputs((7,), 96, torch.float32, device, residual=True), use_s=False)
    assert_close(ours, ref, torch.float32)
    assert torch.equal(ours["dx"], ours["dr"])


def test_residual_gradient_only_through_s(device):
    """Only s is used (y discarded): its gradient passes straight to x and r."""
    x, w, b, r = (t.requires_grad_() for t in make_inputs((5,), 45, torch.float32, device, residual=True))
    _, s = layer_norm(x, w, b, 1e-5, residual=r)
    g = torch.randn_like(s)
    s.backward(g)
    assert torch.equal(x.grad, g) and torch.equal(r.grad, g)
    assert w.grad is None or w.grad.abs().max() == 0


def test_mixed_dtypes_residual_fp32_stream(device):
    """A bf16 block output added to an fp32 residual stream: s and y are fp32, dx comes back in bf16."""
    x, w, b, _ = make_inputs((7,), 96, torch.bfloat16, device)
    r = torch.randn(7, 96, device=device)
    w, b = w.float(), b.float()
    ours, ref = run_both(x, w, b, r)
    assert ours["out1"].dtype == torch.float32 and ours["dx"].dtype == torch.bfloat16
    assert_close({k: v for k, v in ours.items() if k != "dx"}, {k: v for k, v in ref.items() if k != "dx"},
                 torch.float32)
    assert rel_err(ours["dx"], ref["dx"]) <= TOLERANCE[torch.bfloat16]


def test_no_affine_3d_and_bert_eps(device):
    ours, ref = run_both(*make_inputs((2, 5), 96, torch.float32, device, affine=False), eps=1e-12)
    assert ours["out0"].shape == (2, 5, 96)
    assert_close(ours, ref, torch.float32)


def test_strided_rows(device):
    """A column slice of a wider tensor (row stride != dim) is read in place."""
    wide = torch.randn(9, 200, device=device)
    x = wide[:, 50:146]
    _, w, b, _ = make_inputs((9,), 96, torch.float32, device)
    ours, ref = run_both(x, w, b, None)
    assert_close(ours, ref, torch.float32)


def test_no_grad_and_empty(device):
    x, w, b, r = make_inputs((7,), 96, torch.float32, device, residual=True)
    with torch.no_grad():
        y, s = layer_norm(x, w, b, 1e-5, residual=r)
    assert rel_err(y, layer_norm_reference(x.double(), w.double(), b.double(), 1e-5, r.double())[0]) <= 1e-5
    assert layer_norm(x[:0], w, b).shape == (0, 96)


def test_bad_inputs_name_the_argument(device):
    x, w, b, r = make_inputs((3,), 96, torch.float32, device, residual=True)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, w[:5], b)
    with pytest.raises(ValueError, match="bias"):
        layer_norm(x, w, b[:5])
    with pytest.raises(ValueError, match="residual"):
        layer_norm(x, w, b, residual=r[:2])
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, b, eps=0.0)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        layer_norm(x.long(), w, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: many rows per backward program")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [768, 1023, 4096])
def test_gpu_many_rows(device, dtype, dim):
    ours, ref = run_both(*make_inputs((4, 1031), dim, dtype, device, residual=True))
    # dw / db sum 4124 rows: allow the fp32 summation order a little more than one rounding.
    assert_close(ours, ref, dtype, tol=max(TOLERANCE[dtype], 2e-5))
