"""bias_gelu (fused bias add + GELU, erf and tanh forms) against F.gelu(x + bias).

The reference runs in float64 on the same inputs; error = max |ours - ref| / max |ref| per output and
gradient, with a tolerance per dtype (elementwise fp32 maths: the same bound on the GPU).
"""

import pytest
import torch

from scratchformer.kernels import bias_gelu, bias_gelu_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run_both(x, bias, approximate):
    x = x.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    y = bias_gelu(x, bias, approximate)
    dy = torch.randn_like(y)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    y64 = bias_gelu_reference(x64, b64, approximate)
    y64.backward(dy.double())
    ours = {"y": y, "dx": x.grad} | ({"dbias": bias.grad} if bias is not None else {})
    ref = {"y": y64, "dx": x64.grad} | ({"dbias": b64.grad} if bias is not None else {})
    return ours, ref


def assert_close(ours, ref, dtype):
    for name in ref:
        assert ours[name].dtype == dtype and ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


def make(rows_shape, dim, dtype, device, bias=True):
    # Spread 3: s covers the whole curve (negative tail, the bend near 0, the linear part).
    x = (3 * torch.randn(*rows_shape, dim, device=device)).to(dtype)
    b = torch.randn(dim, device=device).to(dtype) if bias else None
    return x, b


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("rows,dim", [(1, 1023), (7, 96), (41, 384)])
def test_fp32(device, approximate, rows, dim):
    ours, ref = run_both(*make((rows,), dim, torch.float32, device), approximate)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, approximate, dtype):
    ours, ref = run_both(*make((3, 13), 200, dtype, device), approximate)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_no_bias_3d(device, approximate):
    ours, ref = run_both(*make((2, 9), 45, torch.float32, device, bias=False), approximate)
    assert ours["y"].shape == (2, 9, 45)
    assert_close(ours, ref, torch.float32)


def test_extreme_inputs_saturate(device):
    """Large |s|: tanh written with exp must saturate to exactly ±1 (no inf/inf = nan), erf likewise."""
    x = torch.tensor([[-1e4, -60.0, -9.0, -1e-4, 0.0, 1e-4, 9.0, 60.0, 1e4]], device=device)
    for approximate in ("none", "tanh"):
        ours, ref = run_both(x, None, approximate)
        assert torch.isfinite(ours["y"]).all() and torch.isfinite(ours["dx"]).all()
        assert_close(ours, ref, torch.float32)


def test_erf_and_tanh_differ(device):
    """The two forms are different functions (max difference ~1e-3 near |s| = 2): the flag is honoured."""
    x, b = make((7,), 96, torch.float32, device)
    diff = (bias_gelu(x, b, "none") - bias_gelu(x, b, "tanh")).abs().max().item()
    assert 1e-5 < diff < 1e-2


def test_strided_input_and_bias_dtype(device):
    """A column slice of a wider tensor; an fp32 bias with bf16 x (bias grad comes back fp32)."""
    wide = torch.randn(11, 300, device=device).to(torch.bfloat16)
    x = wide[:, 7:107]
    b = torch.randn(100, device=device, requires_grad=True)
    xg = x.detach().requires_grad_()
    y = bias_gelu(xg, b, "tanh")
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, b64 = xg.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = bias_gelu_reference(x64, b64, "tanh")
    y64.backward(dy.double())
    assert y.dtype == torch.bfloat16 and b.grad.dtype == torch.float32
    assert rel_err(y, y64) <= TOLERANCE[torch.bfloat16]
    assert rel_err(b.grad, b64.grad) <= 1e-5  # summed in fp32 from fp32 products: only dy's rounding remains


def test_bad_inputs_name_the_argument(device):
    x, b = make((3,), 96, torch.float32, device)
    with pytest.raises(ValueError, match="bias must be"):
        bias_gelu(x, b[:5])
    with pytest.raises(ValueError, match="approximate"):
        bias_gelu(x, b, "erf")
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        bias_gelu(x.long(), b)
    assert bias_gelu(x[:0], b).shape == (0, 96)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the 4K-element GPU tiles and many row blocks")
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large(device, approximate, dtype):
    ours, ref = run_both(*make((4, 1031), 3072 + 5, dtype, device), approximate)
    assert_close(ours, ref, dtype)
