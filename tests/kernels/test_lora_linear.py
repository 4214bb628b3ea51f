"""lora_linear (fused Triton LoRA linear) against its plain-PyTorch reference and against PEFT.

Every comparison runs the reference in float64 on the same inputs and measures
    error = max |ours - reference| / max |reference|
with a tolerance per dtype. fp32 kernels use exact (ieee) fp32 products unless torch allows tf32
(torch.backends.cuda.matmul.allow_tf32, off by default), so the fp32 bound holds on the GPU as well.
"""

import pytest
import torch

from scratchformer.kernels import lora_dropout_mask, lora_linear, lora_linear_reference

# fp16/bf16: inputs, the [tokens, r] intermediates and the outputs are rounded to the dtype (fp32 accumulation).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def seed_tensor(value, device):
    """A dropout seed as lora_linear takes it: int64 [1] on the device."""
    return torch.tensor([value], dtype=torch.int64, device=device)


def make_inputs(tokens_shape, in_f, out_f, r, dtype, device, bias=True):
    """Fresh random inputs with nonzero lora_b (PEFT initialises B to zeros, which would test nothing)."""
    x = torch.randn(*tokens_shape, in_f, device=device, dtype=dtype)
    weight = (torch.randn(out_f, in_f, device=device) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, device=device, dtype=dtype) if bias else None
    lora_a = (torch.randn(r, in_f, device=device) / in_f**0.5).to(dtype)
    lora_b = (torch.randn(out_f, r, device=device) / r**0.5).to(dtype)
    return x, weight, b, lora_a, lora_b


def run_both(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    """Forward + backward of ours and of the float64 reference (given the mask ours drew) on the same dY.

    Returns (ours, reference), each a dict with y, dx, da, db.
    """
    x = x.detach().requires_grad_()
    lora_a = lora_a.detach().requires_grad_()
    lora_b = lora_b.detach().requires_grad_()
    y = lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    ours = {"y": y, "dx": x.grad, "da": lora_a.grad, "db": lora_b.grad}

    mask = None
    if dropout_p > 0.0:
        mask = lora_dropout_mask(x[..., 0].numel(), x.shape[-1], dropout_p, seed).reshape(x.shape)
    x64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, lora_a, lora_b))
    bias64 = bias.double() if bias is not None else None
    y64 = lora_linear_reference(x64, weight.double(), bias64, a64, b64, scaling, dropout_p, dropout_mask=mask)
    y64.backward(dy.double())
    ref = {"y": y64, "dx": x64.grad, "da": a64.grad, "db": b64.grad}
    return ours, ref


def assert_close(ours, ref, dtype):
    for name in ref:
        assert ours[name].dtype == dtype, name
        assert ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


# (tokens, in, out, r): odd sizes, none a multiple of the 32-wide interpreter tiles.
SHAPES = [(1, 24, 40, 1), (7, 67, 129, 8), (37, 24, 129, 8), (37, 67, 40, 1)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tokens,in_f,out_f,r", SHAPES)
def test_fp32_forward_and_grads(device, tokens, in_f, out_f, r, bias):
    inputs = make_inputs((tokens,), in_f, out_f, r, torch.float32, device, bias)
    ours, ref = run_both(*inputs, scaling=2.0)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,in_f,out_f,r", [(7, 67, 129, 8), (37, 24, 40, 1)])
def test_half_precision_forward_and_grads(device, dtype, tokens, in_f, out_f, r, bias):
    inputs = make_inputs((tokens,), in_f, out_f, r, dtype, device, bias)
    ours, ref = run_both(*inputs, scaling=0.5)
    assert_close(ours, ref, dtype)


def test_3d_input(device):
    inputs = make_inputs((3, 13), 24, 40, 8, torch.float32, device)
    ours, ref = run_both(*inputs, scaling=2.0)
    assert ours["y"].shape == (3, 13, 40)
    assert_close(ours, ref, torch.float32)


def test_rank_above_one_tile(device):
    """r = 80 > 64 runs the rank loop of the epilogue and the rank axis of the other grids."""
    inputs = make_inputs((9,), 24, 40, 80, torch.float32, device)
    ours, ref = run_both(*inputs, scaling=0.25)
    assert_close(ours, ref, torch.float32)


def test_strided_views(device):
    """A transposed weight (GPT-2's Conv1D stores [in, out]) and a column-sliced x need no copies."""
    conv_weight = torch.randn(24, 40, device=device) / 24**0.5  # [in, out]
    x_wide = torch.randn(11, 50, device=device)
    x = x_wide[:, 3:27]  # [11, 24], row stride 50
    _, _, bias, lora_a, lora_b = make_inputs((11,), 24, 40, 8, torch.float32, device)
    ours, ref = run_both(x, conv_weight.t(), bias, lora_a, lora_b, scaling=2.0)
    assert_close(ours, ref, torch.float32)


def test_frozen_weight_gets_no_grad_and_trainable_weight_does(device):
    x, weight, bias, lora_a, lora_b = make_inputs((7,), 24, 40, 8, torch.float32, device)
    lora_a.requires_grad_()
    lora_b.requires_grad_()
    lora_linear(x, weight, bias, lora_a, lora_b, 2.0).sum().backward()
    assert weight.grad is None and bias.grad is None and x.grad is None
    assert lora_a.grad is not None and lora_b.grad is not None

    # When the base weight and bias do require grad they get the plain linear's gradients.
    weight.requires_grad_()
    bias.requires_grad_()
    y = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.3)  # dropout must not reach the base path
    dy = torch.randn_like(y)
    dw, dbias = torch.autograd.grad(y, (weight, bias), dy)
    assert rel_err(dw, dy.double().t() @ x.double()) <= 1e-5
    assert rel_err(dbias, dy.double().sum(0)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_matches_reference_given_the_kernels_mask(device, dtype):
    """Forward and backward regenerate one mask: with it, the reference agrees on y, dX, dA and dB."""
    inputs = make_inputs((2, 19), 67, 40, 8, dtype, device)
    ours, ref = run_both(*inputs, scaling=2.0, dropout_p=0.3, seed=seed_tensor(1234, device))
    assert_close(ours, ref, dtype)


def test_dropout_statistics_and_seeds(device):
    mask = lora_dropout_mask(256, 257, 0.25, seed_tensor(7, device))
    assert abs(mask.float().mean().item() - 0.75) < 0.01
    assert torch.equal(mask, lora_dropout_mask(256, 257, 0.25, seed_tensor(7, device)))
    other = lora_dropout_mask(256, 257, 0.25, seed_tensor(8, device))
    assert (mask != other).float().mean().item() > 0.2  # independent masks differ in ~37.5% of places

    # Same seed, same output; the seed drawn from torch's generator follows torch.manual_seed.
    x, weight, bias, lora_a, lora_b = make_inputs((5,), 24, 40, 8, torch.float32, device)
    torch.manual_seed(3)
    y1 = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.5)
    torch.manual_seed(3)
    y2 = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.5)
    y3 = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.5)
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)


def test_dropout_only_on_lora_input(device):
    """With lora_b = 0 the output is the undropped base linear, whatever the dropout (PEFT semantics)."""
    x, weight, bias, lora_a, lora_b = make_inputs((7,), 24, 40, 8, torch.float32, device)
    y = lora_linear(x, weight, bias, lora_a, torch.zeros_like(lora_b), 2.0, 0.9, seed=seed_tensor(1, device))
    assert rel_err(y, torch.nn.functional.linear(x.double(), weight.double(), bias.double())) <= 1e-6


def test_matches_peft_with_the_same_dropout_mask(device):
    """PEFT's lora.Linear, its dropout replaced by our mask, gives our output, dX and adapter gradients."""
    peft = pytest.importorskip("peft")
    in_f, out_f, r, alpha, p, seed = 24, 40, 8, 16, 0.2, seed_tensor(99, device)
    base = torch.nn.Sequential(torch.nn.Linear(in_f, out_f)).to(device)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=p, target_modules=["0"])
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)  # nonzero B, so the adapter matters

    x = torch.randn(3, 5, in_f, device=device, requires_grad=True)
    keep = lora_dropout_mask(15, in_f, p, seed).reshape(x.shape)

    class FixedMask(torch.nn.Module):
        def forward(self, t):
            return t * keep / (1 - p)

    layer.lora_dropout["default"] = FixedMask()
    y_peft = model(x)
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    dx_peft, x.grad = x.grad, None

    lora_a = layer.lora_A["default"].weight.detach().clone().requires_grad_()
    lora_b = layer.lora_B["default"].weight.detach().clone().requires_grad_()
    y = lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, lora_a, lora_b,
                    layer.scaling["default"], p, seed=seed)
    y.backward(dy)
    assert rel_err(y, y_peft) <= 1e-5
    assert rel_err(x.grad, dx_peft) <= 1e-5
    assert rel_err(lora_a.grad, layer.lora_A["default"].weight.grad) <= 1e-5
    assert rel_err(lora_b.grad, layer.lora_B["default"].weight.grad) <= 1e-5


def test_no_tokens(device):
    x, weight, bias, lora_a, lora_b = make_inputs((0,), 24, 40, 8, torch.float32, device)
    assert lora_linear(x, weight, bias, lora_a, lora_b, 2.0).shape == (0, 40)


def test_bad_inputs_name_the_argument(device):
    x, weight, bias, lora_a, lora_b = make_inputs((3,), 24, 40, 8, torch.float32, device)
    with pytest.raises(ValueError, match="x has 23"):
        lora_linear(x[:, :23], weight, bias, lora_a, lora_b, 2.0)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(x, weight, bias, lora_a[:, :5], lora_b, 2.0)
    with pytest.raises(ValueError, match="lora_b"):
        lora_linear(x, weight, bias, lora_a, lora_b[:, :4], 2.0)
    with pytest.raises(ValueError, match="bias"):
        lora_linear(x, weight, bias[:3], lora_a, lora_b, 2.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 1.0)
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        lora_linear(x.long(), weight, bias, lora_a, lora_b, 2.0)
    with pytest.raises(TypeError, match=r"seed must be an int64 \[1\] tensor"):
        lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.1, seed=7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the autotuned tiles (up to 256) and edges")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_many_tiles_with_ragged_edges(device, dtype):
    """Sizes spanning several of the GPU's large tiles, none a multiple of them, with dropout on."""
    inputs = make_inputs((3, 347), 777, 1031, 16, dtype, device)
    ours, ref = run_both(*inputs, scaling=2.0, dropout_p=0.1, seed=seed_tensor(5, device))
    assert_close(ours, ref, dtype)
