"""linear_cross_entropy (chunked LM head + Triton softmax cross-entropy) against F.cross_entropy on
materialised logits.

The reference runs in float64 on the same inputs (or, under autocast, the same way torch would: the
matmul in the autocast dtype, the loss in fp32). error = max |ours - ref| / max |ref| for the loss and for
each gradient. fp32 matmuls are torch's own (tf32 only if torch.backends.cuda.matmul.allow_tf32, off by
default), so the fp32 bound holds on the GPU too.
"""

import pytest
import torch
import torch.nn.functional as F

import scratchformer.kernels.cross_entropy as ce_module
from scratchformer.kernels import default_chunk_size, linear_cross_entropy, linear_cross_entropy_reference

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def make_inputs(tokens_shape, dim, vocab, dtype, device, bias=False, ignored=0.3):
    """Logits of a realistic spread (std ~ 2), labels with a fraction `ignored` set to -100."""
    hidden = torch.randn(*tokens_shape, dim, device=device).to(dtype)
    weight = (2 * torch.randn(vocab, dim, device=device) / dim**0.5).to(dtype)
    b = torch.randn(vocab, device=device).to(dtype) if bias else None
    labels = torch.randint(0, vocab, tokens_shape, device=device)
    labels[torch.rand(tokens_shape, device=device) < ignored] = -100
    return hidden, weight, b, labels


def run_both(hidden, weight, bias, labels, reduction, ref_dtype=torch.float64, autocast=None, **kw):
    """Loss and gradients (hidden, weight, bias) of ours and of the reference, same upstream gradient.

    autocast: None, or a dtype to run both under torch.autocast(device, dtype) (the reference then keeps
    the inputs' dtype and lets autocast choose, as the engine's eager path would).
    """
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: v.detach().requires_grad_() for k, v in leaves.items() if v is not None}
    ref_leaves = {k: v.detach().to(ref_dtype).requires_grad_() for k, v in leaves.items()}
    device_type = hidden.device.type

    def call(fn, t, **extra):
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return fn(t["hidden"], t["weight"], labels, reduction=reduction, bias=t.get("bias"), **extra)

    loss = call(linear_cross_entropy, leaves, **kw)
    ref = call(linear_cross_entropy_reference, ref_leaves)
    g = torch.randn_like(ref, dtype=torch.float32) if reduction == "none" else torch.tensor(0.7, device=hidden.device)
    loss.backward(g.to(loss.dtype))
    ref.backward(g.to(ref.dtype))
    ours = {"loss": loss} | {f"d{k}": v.grad for k, v in leaves.items()}
    theirs = {"loss": ref} | {f"d{k}": v.grad for k, v in ref_leaves.items()}
    return ours, theirs


def assert_close(ours, ref, tol):
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        err = rel_err(ours[name], ref[name])
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_several_chunks(device, reduction, bias):
    """41 tokens in chunks of 16 (the last one partial), vocab 1023 (the online softmax over 8 blocks)."""
    inputs = make_inputs((41,), 24, 1023, torch.float32, device, bias=bias)
    ours, ref = run_both(*inputs, reduction, chunk_size=16)
    assert_close(ours, ref, TOLERANCE[torch.float32])
    assert ours["loss"].dtype == torch.float32


@pytest.mark.parametrize("tokens,dim,vocab", [(1, 96, 45), (7, 45, 96)])
def test_fp32_default_chunk_small_shapes(device, tokens, dim, vocab):
    inputs = make_inputs((tokens,), dim, vocab, torch.float32, device, ignored=0.0)
    ours, ref = run_both(*inputs, "mean")
    assert_close(ours, ref, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision(device, dtype, reduction):
    inputs = make_inputs((2, 9), 24, 300, dtype, device, bias=True)
    ours, ref = run_both(*inputs, reduction, chunk_size=8)
    assert_close(ours, ref, TOLERANCE[dtype])
    assert ours["loss"].dtype == dtype and ours["dhidden"].dtype == dtype and ours["dweight"].dtype == dtype


def test_loss_dtype_keeps_the_fp32_loss_of_a_half_model(device):
    hidden, weight, _, labels = make_inputs((9,), 24, 37, torch.bfloat16, device)
    loss = linear_cross_entropy(hidden, weight, labels, loss_dtype=torch.float32)
    want = F.cross_entropy((hidden.float() @ weight.float().T).to(torch.bfloat16).float(), labels)
    assert loss.dtype == torch.float32
    assert rel_err(loss, want) <= 1e-5
    assert linear_cross_entropy(hidden, weight, labels).dtype == torch.bfloat16  # the default is unchanged


def test_3d_hidden_and_none_shape(device):
    inputs = make_inputs((3, 7), 24, 200, torch.float32, device)
    ours, ref = run_both(*inputs, "none", chunk_size=5)
    assert ours["loss"].shape == (3, 7)
    assert (ours["loss"][inputs[3] == -100] == 0).all()
    assert_close(ours, ref, TOLERANCE[torch.float32])


def test_strided_inputs(device):
    """Views that are not contiguous (every other token, a transposed [seq, batch] layout) give the
    reference's loss and gradients: the kernel reads labels[row] at unit stride, so they are packed first."""
    hidden, weight, bias, labels = make_inputs((26,), 24, 200, torch.float32, device, bias=True)
    assert not labels[::2].is_contiguous() and labels[::2].reshape(-1).stride() == (2,)
    ours, ref = run_both(hidden[::2], weight, bias, labels[::2], "mean", chunk_size=4)
    assert_close(ours, ref, TOLERANCE[torch.float32])
    hidden, weight, _, labels = make_inputs((5, 3), 24, 200, torch.float32, device)
    ours, ref = run_both(hidden.transpose(0, 1), weight, None, labels.transpose(0, 1), "none", chunk_size=7)
    assert_close(ours, ref, TOLERANCE[torch.float32])


def test_chunk_size_does_not_change_the_result(device):
    hidden, weight, _, labels = make_inputs((13,), 24, 200, torch.float32, device)
    losses = [linear_cross_entropy(hidden, weight, labels, chunk_size=c) for c in (1, 4, 13, 64)]
    for loss in losses[1:]:
        assert rel_err(loss, losses[0]) <= 1e-6


def test_all_labels_ignored(device):
    """mean: nan like F.cross_entropy (0 / 0), and zero gradients; sum and none: 0."""
    hidden, weight, _, labels = make_inputs((7,), 24, 100, torch.float32, device, ignored=1.0)
    for reduction in ("mean", "sum", "none"):
        h = hidden.detach().requires_grad_()
        loss = linear_cross_entropy(h, weight, labels, reduction=reduction)
        ref = F.cross_entropy(hidden @ weight.T, labels, reduction=reduction)
        assert torch.equal(loss.isnan(), ref.isnan()), reduction
        if reduction != "mean":
            assert (loss == 0).all()
        loss.sum().backward()
        assert (h.grad == 0).all()


def test_custom_ignore_index(device):
    hidden, weight, _, labels = make_inputs((11,), 24, 100, torch.float32, device, ignored=0.0)
    labels[::3] = 7  # class 7 is ignored
    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=7)
    ref = F.cross_entropy(hidden.double() @ weight.double().T, labels, ignore_index=7)
    assert rel_err(loss, ref) <= 1e-5


def test_eval_does_no_gradient_work(device, monkeypatch):
    """No input requires grad, or torch.no_grad(): the forward computes losses only (no scale, no dz)."""
    calls = []
    real = ce_module._fused_pass

    def spy(*args):
        calls.append(args[6] is None)  # scale is None <=> loss only
        return real(*args)

    monkeypatch.setattr(ce_module, "_fused_pass", spy)
    hidden, weight, _, labels = make_inputs((9,), 24, 100, torch.float32, device)
    ref = F.cross_entropy(hidden.double() @ weight.double().T, labels)
    loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.grad_fn is None and rel_err(loss, ref) <= 1e-5
    weight.requires_grad_()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.grad_fn is None and rel_err(loss, ref) <= 1e-5
    assert calls == [True, True]
    # Training: the gradients are computed in the forward, and only the one asked for (weight, not hidden).
    loss = linear_cross_entropy(hidden, weight, labels)
    loss.backward()
    assert calls[-1] is False and hidden.grad is None and weight.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bf16(device, reduction):
    """fp32 parameters under bf16 autocast: matmuls in bf16, the loss in fp32, grads in fp32, as torch."""
    inputs = make_inputs((2, 9), 24, 300, torch.float32, device, bias=True)
    ours, ref = run_both(*inputs, reduction, ref_dtype=torch.float32, autocast=torch.bfloat16, chunk_size=8)
    assert ours["loss"].dtype == torch.float32 and ref["loss"].dtype == torch.float32
    assert ours["dweight"].dtype == torch.float32
    # Same bf16 logits on both sides; the difference is the rounding of dz and of the per-chunk dW sums.
    assert_close(ours, ref, 1e-2)
    # and the autocast result is a bf16-accurate approximation of the exact fp32 loss
    exact = linear_cross_entropy_reference(*(t.double() for t in inputs[:2]), inputs[3], reduction=reduction,
                                           bias=inputs[2].double())
    assert rel_err(ours["loss"], exact) <= TOLERANCE[torch.bfloat16]


def test_autocast_fp16(device):
    inputs = make_inputs((4, 33), 64, 1000, torch.float32, device, bias=False)
    ours, ref = run_both(*inputs, "mean", ref_dtype=torch.float32, autocast=torch.float16, chunk_size=32)
    assert_close(ours, ref, 5e-3)


def test_default_chunk_size():
    assert default_chunk_size(16384, 50257) == 1024  # 2**26 // 50257 = 1335 -> 1024
    assert default_chunk_size(5, 50257) == 5
    assert default_chunk_size(100, 2**30) == 1
    assert default_chunk_size(10**6, 100) == 2**19


def test_bad_inputs_name_the_argument(device):
    hidden, weight, _, labels = make_inputs((5,), 24, 100, torch.float32, device, ignored=0.0)
    with pytest.raises(ValueError, match="labels must be hidden.shape"):
        linear_cross_entropy(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(hidden[:, :20], weight, labels)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, labels, reduction="avg")
    with pytest.raises(TypeError, match="share a dtype"):
        linear_cross_entropy(hidden.half(), weight, labels)
    with pytest.raises(TypeError, match="labels"):
        linear_cross_entropy(hidden, weight, labels.float())
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, labels, bias=torch.zeros(7, device=device))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_out_of_range_labels_give_nan_not_a_read_out_of_bounds(device, reduction):
    """A label outside [0, vocab) is found on the device: its token's loss is NaN and so are the gradients it
    reaches (the Trainer skips a step whose gradients are not finite); the other tokens are unaffected."""
    hidden, weight, _, labels = make_inputs((7,), 24, 100, torch.float32, device, ignored=0.0)
    labels[2], labels[5] = 100, -3
    hidden.requires_grad_()
    weight.requires_grad_()
    loss = linear_cross_entropy(hidden, weight, labels, reduction=reduction, chunk_size=4)
    loss.sum().backward()
    if reduction == "mean":
        assert torch.isnan(loss) and torch.isnan(weight.grad).all()
    else:
        bad = torch.zeros(7, dtype=torch.bool, device=device)
        bad[[2, 5]] = True
        assert torch.isnan(loss[bad]).all() and torch.isnan(hidden.grad[bad]).all()
        good = F.cross_entropy(hidden[~bad].double() @ weight.double().T, labels[~bad], reduction="none")
        assert rel_err(loss[~bad], good) <= 1e-5 and torch.isfinite(hidden.grad[~bad]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: GPT-2's vocabulary, several GPU chunks")
def test_gpu_gpt2_vocab_bf16(device):
    inputs = make_inputs((2, 600), 128, 50257, torch.bfloat16, device)
    ours, ref = run_both(*inputs, "mean", ref_dtype=torch.float32, chunk_size=512)
    assert_close(ours, ref, TOLERANCE[torch.bfloat16])
