"""Every kernel as a PyTorch custom op (`scratchformer::*`): registration, torch.compile, autocast, host reads.

For each differentiable op, through its public function (`flash_attention`, `lora_linear`, `layer_norm`,
`bias_gelu`, `linear_cross_entropy`), on fresh random inputs at odd sizes (padding mask, causal, bias,
ignored labels):

- `torch.library.opcheck`: the schema (what is mutated, nothing aliased), the fake implementation (shapes,
  dtypes and strides as the real one gives them) and the autograd registration, also traced by AOT autograd;
- `torch._dynamo.explain` of the forward finds one graph and no break, and `torch.compile` (backend
  "aot_eager", which traces forward and backward through the ops' fake and autograd formulas) gives the
  eager output and gradients exactly (the same kernels run on the same inputs). The CPU compiles with
  "aot_eager" and also with "inductor" (its C++ code for the torch ops around ours; our ops stay calls to
  their Triton launchers): one test runs every op through inductor;
- under torch.autocast (bf16 and fp16 on the CPU): the output dtype of the torch counterpart under CUDA
  autocast, and the values and gradients of that counterpart run under the same autocast: fp16 within
  2e-2, bf16 within 4e-2 after converting both to fp32 (the interpreter's bf16 arithmetic is not the GPU's;
  our kernels load bf16 into fp32, so the two differ by roundings of the bf16 inputs and outputs);
- no host reads: forward and backward never call `Tensor.item / tolist / __bool__ / __int__ / __float__`.

The optimizer ops (`fused_adamw_`, `multi_tensor_norm`, `nonfinite_check_`) get opcheck and compile tests of
their own below. Errors are max |ours - theirs| / max |theirs|, per output and gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from scratchformer.kernels import (
    attention_reference,
    bias_gelu,
    flash_attention,
    layer_norm,
    linear_cross_entropy,
    lora_linear,
)
from scratchformer.kernels.adamw import fused_adamw_, multi_tensor_norm, nonfinite_check_
from scratchformer.kernels.dropout_seed import draw_dropout_seed

AUTOCAST_TOLERANCE = {torch.float16: 2e-2, torch.bfloat16: 4e-2}


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max()).item()


@dataclass
class Case:
    """One op through its public function: `ours(**inputs)` and `theirs(**inputs)` (torch's composition of the
    same maths) each return one tensor; `autocast_dtype(dtype)` is the output dtype torch's counterpart has
    under CUDA autocast to `dtype`."""

    name: str
    inputs: Callable[[str], dict]
    ours: Callable[..., torch.Tensor]
    theirs: Callable[..., torch.Tensor]
    autocast_dtype: Callable[[torch.dtype], torch.dtype]


def _leaf(*shape, device, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).requires_grad_()


def _attention_inputs(device):
    mask = torch.ones(2, 13, dtype=torch.bool, device=device)
    mask[1, 9:] = False
    return dict(q=_leaf(2, 3, 13, 16, device=device), k=_leaf(2, 3, 13, 16, device=device),
                v=_leaf(2, 3, 13, 16, device=device), mask=mask)


def _attention_ours(q, k, v, mask):
    return flash_attention(q, k, v, causal=True, attention_mask=mask)


def _attention_theirs(q, k, v, mask):
    allowed = torch.ones(13, 13, dtype=torch.bool, device=q.device).tril() & mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def _lora_inputs(device):
    return dict(x=_leaf(3, 5, 24, device=device), weight=torch.randn(40, 24, device=device) / 5,
                bias=torch.randn(40, device=device), lora_a=_leaf(8, 24, device=device, scale=0.2),
                lora_b=_leaf(40, 8, device=device, scale=0.3))


def _lora_ours(x, weight, bias, lora_a, lora_b):
    return lora_linear(x, weight, bias, lora_a, lora_b, 2.0)


def _lora_theirs(x, weight, bias, lora_a, lora_b):
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * 2.0


def _norm_inputs(device):
    return dict(x=_leaf(3, 5, 33, device=device), residual=_leaf(3, 5, 33, device=device),
                weight=_leaf(33, device=device), bias=_leaf(33, device=device))


def _add_norm_ours(x, residual, weight, bias):
    return torch.cat(layer_norm(x, weight, bias, 1e-5, residual=residual), dim=-1)


def _add_norm_theirs(x, residual, weight, bias):
    s = x + residual
    return torch.cat([F.layer_norm(s, (33,), weight, bias, 1e-5), s], dim=-1)


def _plain_norm_inputs(device):
    return dict(x=_leaf(3, 5, 33, device=device), weight=_leaf(33, device=device), bias=_leaf(33, device=device))


def _norm_ours(x, weight, bias):
    return layer_norm(x, weight, bias, 1e-5)


def _norm_theirs(x, weight, bias):
    return F.layer_norm(x, (33,), weight, bias, 1e-5)


def _gelu_inputs(device):
    return dict(h=_leaf(7, 20, device=device), weight=_leaf(37, 20, device=device, scale=0.3),
                bias=_leaf(37, device=device))


def _gelu_ours(h, weight, bias):
    # The op ends a matmul (the feed-forward's first Linear without its bias), as in the engine.
    return bias_gelu(F.linear(h, weight), bias, "tanh")


def _gelu_theirs(h, weight, bias):
    return F.gelu(F.linear(h, weight, bias), approximate="tanh")


def _ce_inputs(device):
    labels = torch.randint(0, 50, (2, 9), device=device)
    labels[0, :3] = -100
    return dict(hidden=_leaf(2, 9, 24, device=device), weight=_leaf(50, 24, device=device, scale=0.4),
                bias=_leaf(50, device=device), labels=labels)


def _ce_ours(hidden, weight, bias, labels, reduction="mean"):
    return linear_cross_entropy(hidden, weight, labels, bias=bias, reduction=reduction, chunk_size=8)


def _ce_theirs(hidden, weight, bias, labels, reduction="mean"):
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction=reduction)
    return loss if reduction == "mean" else loss.reshape(labels.shape)


def _ce_none_ours(**t):
    return _ce_ours(**t, reduction="none")


def _ce_none_theirs(**t):
    return _ce_theirs(**t, reduction="none")


def _lower_precision(dtype):
    return dtype


def _fp32(dtype):
    return torch.float32


CASES = [
    Case("flash_attention", _attention_inputs, _attention_ours, _attention_theirs, _lower_precision),
    Case("lora_linear", _lora_inputs, _lora_ours, _lora_theirs, _lower_precision),
    Case("add_layer_norm", _norm_inputs, _add_norm_ours, _add_norm_theirs, _fp32),
    Case("layer_norm", _plain_norm_inputs, _norm_ours, _norm_theirs, _fp32),
    Case("bias_gelu", _gelu_inputs, _gelu_ours, _gelu_theirs, _lower_precision),
    Case("linear_cross_entropy", _ce_inputs, _ce_ours, _ce_theirs, _fp32),
    Case("linear_cross_entropy_none", _ce_inputs, _ce_none_ours, _ce_none_theirs, _fp32),
]
BY_NAME = {case.name: case for case in CASES}


def _leaves(inputs: dict) -> dict:
    return {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}


def _forward_backward(fn, inputs: dict, seed: int = 0):
    """fn(**inputs) and the gradients of every leaf under a fixed random output gradient."""
    out = fn(**inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)
    leaves = _leaves(inputs)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    return out, dict(zip(leaves, grads))


# ----------------------------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------------------------
def _op_calls(device):
    """(op, args) for every custom op, forward and backward, on small random inputs (requires_grad where the
    op is differentiable, so that opcheck also checks the autograd registration)."""
    ops = torch.ops.scratchformer
    seed = draw_dropout_seed(device)
    a = _attention_inputs(device)
    attention = (a["q"], a["k"], a["v"], a["mask"], True, 0.25, 0.2, seed)
    out, lse = ops.flash_attention_forward(*attention)
    lo = _lora_inputs(device)
    x2d = lo["x"].reshape(15, 24)
    lora = (x2d, lo["weight"], lo["bias"], lo["lora_a"], lo["lora_b"], 2.0, 0.1, seed)
    _, t = ops.lora_linear_forward(*lora)
    n = _norm_inputs(device)
    x, r = n["x"].reshape(15, 33), n["residual"].reshape(15, 33)
    _, s, mean, rstd = ops.add_layer_norm_forward(x, r, n["weight"], n["bias"], 1e-5)
    g = _gelu_inputs(device)
    gelu_x = _leaf(7, 37, device=device)
    c = _ce_inputs(device)
    hidden, labels = c["hidden"].reshape(18, 24), c["labels"].reshape(18)
    dy = torch.randn(15, 40, device=device)
    return [
        (ops.flash_attention_forward, attention),
        (ops.flash_attention_backward, (torch.randn_like(out), *(t.detach() for t in attention[:3]), out.detach(),
                                        lse.detach(), *attention[3:])),
        (ops.lora_linear_forward, lora),
        (ops.lora_linear_backward, (dy, x2d.detach(), lo["weight"], lo["lora_a"].detach(), lo["lora_b"].detach(),
                                    t.detach(), 2.0, 0.1, seed, True, True, True)),
        (ops.layer_norm_forward, (x, n["weight"], n["bias"], 1e-5)),
        (ops.add_layer_norm_forward, (x, r, n["weight"], n["bias"], 1e-5)),
        (ops.layer_norm_backward, (torch.randn(15, 33, device=device), torch.randn(15, 33, device=device),
                                   s.detach(), n["weight"].detach(), mean.detach(), rstd.detach(), True, True)),
        (ops.bias_gelu_forward, (gelu_x, g["bias"], "none")),
        (ops.bias_gelu_backward, (torch.randn(7, 37, device=device), gelu_x.detach(), g["bias"].detach(), "tanh",
                                  True)),
        (ops.linear_cross_entropy_forward, (hidden, c["weight"], c["bias"], labels, -100, "mean", 8, True, True,
                                            True)),
        (ops.linear_cross_entropy_forward, (hidden, c["weight"], None, labels, -100, "none", 8, True, True,
                                            False)),
        (ops.linear_cross_entropy_backward, (torch.rand(18, device=device), hidden.detach(), c["weight"].detach(),
                                             c["bias"].detach(), labels, -100, 8, True, True, True)),
    ]


@pytest.mark.slow
def test_every_op_passes_opcheck(device):
    calls = _op_calls(device)
    assert {op._qualified_op_name for op, _ in calls} == {f"scratchformer::{name}" for name in (
        "flash_attention_forward", "flash_attention_backward", "lora_linear_forward", "lora_linear_backward",
        "layer_norm_forward", "add_layer_norm_forward", "layer_norm_backward", "bias_gelu_forward",
        "bias_gelu_backward", "linear_cross_entropy_forward", "linear_cross_entropy_backward")}
    for op, args in calls:
        torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_explain_finds_no_graph_break(device, case):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(case.ours)(**case.inputs(device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _compiled_matches_eager(case, inputs, backend):
    torch._dynamo.reset()
    compiled = torch.compile(case.ours, backend=backend, fullgraph=True)
    torch.manual_seed(7)  # the same dropout seeds in both runs
    out, grads = _forward_backward(compiled, inputs)
    torch.manual_seed(7)
    ref_out, ref_grads = _forward_backward(case.ours, inputs)
    assert out.dtype == ref_out.dtype and out.shape == ref_out.shape
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_aot_eager_compile_matches_eager(device, case):
    _compiled_matches_eager(case, case.inputs(device), "aot_eager")


def _dropout_attention(q, k, v, mask):
    return flash_attention(q, k, v, causal=True, attention_mask=mask, dropout_p=0.3)


def _dropout_lora(x, weight, bias, lora_a, lora_b):
    return lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.4)


@pytest.mark.parametrize("case", [Case("flash_attention_dropout", _attention_inputs, _dropout_attention, None, None),
                                  Case("lora_linear_dropout", _lora_inputs, _dropout_lora, None, None)],
                         ids=lambda c: c.name)
def test_compiled_dropout_draws_its_seed_on_the_device_as_eager_does(device, case):
    """The seed is drawn inside the compiled graph (torch.randint on the device), so the same generator state
    gives the same mask compiled and eager, and each call a new one."""
    _compiled_matches_eager(case, case.inputs(device), "aot_eager")
    inputs = case.inputs(device)
    compiled = torch.compile(case.ours, backend="aot_eager", fullgraph=True)
    assert not torch.equal(compiled(**inputs), compiled(**inputs))


@pytest.mark.slow
def test_inductor_compiles_every_op(device):
    """One function through every differentiable op, compiled by inductor (the CPU's C++ backend; the ops stay
    opaque calls), matches eager."""

    def everything(x, residual, weight, bias, lora_a, lora_b, w_qkv, w_up, b_up, labels):
        h = lora_linear(x, w_qkv, None, lora_a, lora_b, 0.5)  # [2, 7, 48]
        q, k, v = (t.reshape(2, 7, 2, 8).transpose(1, 2) for t in h.split(16, dim=-1))
        a = flash_attention(q, k, v, causal=True).transpose(1, 2).reshape(2, 7, 16)
        y, s = layer_norm(a, weight, bias, 1e-5, residual=residual)
        m = bias_gelu(F.linear(y, w_up), b_up)
        return linear_cross_entropy(m, w_up.t(), labels) + layer_norm(s, weight, bias).square().mean()

    def inputs(device):
        return dict(x=_leaf(2, 7, 16, device=device), residual=_leaf(2, 7, 16, device=device),
                    weight=_leaf(16, device=device), bias=_leaf(16, device=device),
                    lora_a=_leaf(4, 16, device=device, scale=0.3), lora_b=_leaf(48, 4, device=device, scale=0.3),
                    w_qkv=torch.randn(48, 16, device=device) / 4, w_up=_leaf(24, 16, device=device, scale=0.3),
                    b_up=_leaf(24, device=device), labels=torch.randint(0, 16, (2, 7), device=device))

    _compiled_matches_eager(Case("everything", inputs, everything, None, None), inputs(device), "inductor")


def _adamw_state(device):
    shapes = [(37, 5), (300,), (3,)]
    return dict(params=[torch.randn(s, device=device) for s in shapes],
                grads=[torch.randn(s, device=device) for s in shapes],
                exp_avgs=[torch.rand(s, device=device) for s in shapes],
                exp_avg_sqs=[torch.rand(s, device=device) for s in shapes],
                state_steps=[torch.full((), 3.0, device=device) for _ in shapes])


def _optimizer_step(params, grads, exp_avgs, exp_avg_sqs, state_steps):
    """Clip by the global norm through the fused reduction, then one fused AdamW step, as the Trainer does."""
    norm = multi_tensor_norm(grads)
    found_inf = nonfinite_check_(grads, torch.zeros(1, device=norm.device))
    divisor = torch.clamp(norm / 1.0, min=1.0).reshape(1)
    fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, None, None, state_steps, lr=1e-2, beta1=0.9, beta2=0.999,
                 eps=1e-8, weight_decay=0.1, grad_scale=divisor, found_inf=found_inf, block=128, num_warps=4)
    return norm


def test_optimizer_ops_pass_opcheck(device):
    st = _adamw_state(device)
    ops = torch.ops.scratchformer
    adamw = (st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], [], [], st["state_steps"], 1e-2, None,
             0.9, 0.999, 1e-8, 0.1, False, False, torch.full((1,), 2.0, device=device),
             torch.zeros(1, device=device), 128, 4)
    torch.library.opcheck(ops.fused_adamw_, adamw)
    lr_on_device = (*adamw[:7], 0.0, torch.full((1,), 1e-2, device=device), *adamw[9:])  # the kernel loads the lr
    torch.library.opcheck(ops.fused_adamw_, lr_on_device)
    torch.library.opcheck(ops.multi_tensor_norm, (st["grads"], 2.0, 128))
    torch.library.opcheck(ops.nonfinite_check_, (st["grads"], torch.zeros(1, device=device), 128))


def test_optimizer_step_compiles_without_graph_break(device):
    st = _adamw_state(device)
    explanation = torch._dynamo.explain(_optimizer_step)(**{k: [t.clone() for t in v] for k, v in st.items()})
    assert explanation.graph_break_count == 0, explanation.break_reasons

    torch._dynamo.reset()
    compiled_state = {k: [t.clone() for t in v] for k, v in st.items()}
    norm = torch.compile(_optimizer_step, backend="aot_eager", fullgraph=True)(**compiled_state)
    ref_norm = _optimizer_step(**st)
    assert torch.equal(norm, ref_norm)
    for key in ("params", "exp_avgs", "exp_avg_sqs", "state_steps"):
        for ours, theirs in zip(compiled_state[key], st[key]):
            assert torch.equal(ours, theirs), key


# ----------------------------------------------------------------------------------------------------------
# Autocast
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_autocast_dtype_and_values_follow_torchs_counterpart(device, case, dtype):
    inputs = case.inputs(device)
    with torch.autocast(device, dtype=dtype):
        out, grads = _forward_backward(case.ours, inputs)
        theirs, their_grads = _forward_backward(case.theirs, inputs)
    assert out.dtype == case.autocast_dtype(dtype), case.name
    if case.autocast_dtype is _fp32 and case.name.endswith("layer_norm") and device == "cpu":
        # CPU autocast leaves F.layer_norm in its input's dtype; CUDA autocast (which the op follows) runs it
        # in fp32. (These inputs are fp32 either way; test_gpu_autocast_dtypes compares on CUDA.)
        pass
    else:
        assert out.dtype == theirs.dtype, case.name
    tol = AUTOCAST_TOLERANCE[dtype]
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), theirs.float()) <= tol, case.name
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype and torch.isfinite(grad).all(), name
        assert rel_err(grad, their_grads[name]) <= tol, name


def test_layer_norm_follows_cuda_autocast_not_cpu_autocast(device):
    """fp32 under autocast, from half-precision inputs too (F.layer_norm on CUDA); CPU autocast would keep bf16."""
    x = torch.randn(5, 33, device=device, dtype=torch.bfloat16)
    w, b = torch.randn(33, device=device), torch.randn(33, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer_norm(x, w, b)
        y2, s = layer_norm(x, w, b, residual=x)
    assert y.dtype == y2.dtype == s.dtype == torch.float32
    torch.testing.assert_close(y, F.layer_norm(x.float(), (33,), w, b), rtol=1e-5, atol=1e-5)


def test_outside_autocast_lora_casts_to_x_dtype_and_attention_wants_one_dtype(device):
    """Without autocast nothing is cast behind the user's back, except LoRA's documented cast of the weights
    to x's dtype (fp32 master adapters with a bf16 model); flash_attention refuses mixed dtypes."""
    lo = _lora_inputs(device)
    y = lora_linear(lo["x"].detach().bfloat16(), lo["weight"], lo["bias"], lo["lora_a"], lo["lora_b"], 2.0)
    assert y.dtype == torch.bfloat16
    a = _attention_inputs(device)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(a["q"], a["k"].bfloat16(), a["v"])
    with torch.autocast(device, dtype=torch.bfloat16):
        assert flash_attention(a["q"], a["k"].bfloat16(), a["v"]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# No host reads
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_host_reads(monkeypatch):
    """Reading a tensor's value on the host (what stalls a GPU) raises inside the test."""

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"host read: Tensor.{name}")

        return read

    def install():
        for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
            monkeypatch.setattr(torch.Tensor, name, refuse(name))

    return install


@pytest.mark.parametrize("case", CASES + [Case("flash_attention_dropout", _attention_inputs, _dropout_attention,
                                               None, None),
                                          Case("lora_linear_dropout", _lora_inputs, _dropout_lora, None, None)],
                         ids=lambda c: c.name)
def test_forward_and_backward_read_nothing_on_the_host(device, case, no_host_reads):
    inputs = case.inputs(device)
    _forward_backward(case.ours, inputs)  # warm-up: compiles the kernels
    no_host_reads()
    _forward_backward(case.ours, inputs)


def test_optimizer_step_reads_nothing_on_the_host(device, no_host_reads):
    st = _adamw_state(device)
    no_host_reads()
    _optimizer_step(**st)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_no_synchronisation_in_forward_and_backward(device):
    """CUDA's own check: with sync debug mode "error" a synchronising call raises. After a warm-up (autotuning
    benchmarks do synchronise), forward and backward of every op, and the optimizer step."""
    runs = [(case, case.inputs(device)) for case in CASES]
    st = _adamw_state(device)
    for case, inputs in runs:
        _forward_backward(case.ours, inputs)
    _optimizer_step(**st)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for case, inputs in runs:
            _forward_backward(case.ours, inputs)
        _optimizer_step(**st)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_autocast_dtypes(device):
    """On CUDA every op's output dtype under autocast is its torch counterpart's, LayerNorm included."""
    for dtype in (torch.bfloat16, torch.float16):
        for case in CASES:
            inputs = case.inputs(device)
            with torch.autocast("cuda", dtype=dtype):
                assert case.ours(**inputs).dtype == case.theirs(**inputs).dtype == case.autocast_dtype(dtype)


def test_attention_counterpart_is_the_plain_pytorch_reference_here(device):
    """The counterpart above is SDPA; on these inputs (no query without a key) it agrees with the plain-PyTorch
    reference, and so does the kernel."""
    a = _attention_inputs(device)
    reference = attention_reference(a["q"], a["k"], a["v"], causal=True, attention_mask=a["mask"])
    assert rel_err(_attention_theirs(**a), reference) <= 1e-5
    assert rel_err(_attention_ours(**a), reference) <= 1e-5
