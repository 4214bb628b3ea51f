"""flash_attention (Triton, FlashAttention-2) against the plain-PyTorch reference, forward and backward.

Runs under the Triton interpreter on the CPU and natively on a GPU. Errors are relative, in the max norm:
max |ours - reference| / max |reference|, with the reference in float64 on the same (rounded) inputs (see
`_rel_err` for the one case where the reference is exactly zero).
Tolerances: fp32 1e-5 in the interpreter (its dots are exact fp32) and 1e-4 on a GPU (ieee fp32 dots but
different summation order and the hardware exp2); fp16 1e-2; bf16 2e-2 (8-bit mantissa, products of bf16
operands in the backward).
"""

import importlib
import math
import pathlib
import subprocess
import sys

import pytest
import torch

from scratchformer.kernels import attention_reference, flash_attention
from scratchformer.kernels.dropout_seed import draw_dropout_seed
from scratchformer.kernels.flash_attention import flash_attention_dropout_mask

# The module, not the function of the same name that scratchformer.kernels re-exports.
fa_module = importlib.import_module("scratchformer.kernels.flash_attention")
ON_GPU = torch.cuda.is_available()
TOLERANCE = {
    torch.float32: 1e-4 if ON_GPU else 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Outputs and gradients start as NaN, so an element the kernels never wrote fails the comparison."""
    monkeypatch.setattr(fa_module, "_POISON_OUTPUTS", True)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor, zero_scale: float | None = None) -> float:
    """max |ours - ref| / max |ref|, the max-norm relative error of the other kernel tests.

    A reference that is exactly zero everywhere has no relative error to speak of: with a single visible key
    the softmax is constant, so dS = P * (dP - delta) = 0 and dq = dk = 0 exactly, while ours is the rounding
    of dP - delta. The caller then passes `zero_scale`, the size of the terms that cancel, and the error is
    relative to that."""
    assert not torch.isnan(ours).any(), "NaN in kernel output (unwritten element or masked-row NaN)"
    scale = ref.double().abs().max().item()
    if scale == 0.0:
        assert zero_scale is not None, "the reference is exactly zero: pass the scale of the terms that cancel"
        scale = zero_scale
    return (ours.double() - ref.double()).abs().max().item() / scale


def _inputs(batch, heads, seq_q, seq_k, head_dim, dtype, device):
    q = torch.randn(batch, heads, seq_q, head_dim, device=device).to(dtype).requires_grad_()
    k = torch.randn(batch, heads, seq_k, head_dim, device=device).to(dtype).requires_grad_()
    v = torch.randn(batch, heads, seq_k, head_dim, device=device).to(dtype).requires_grad_()
    return q, k, v


def _next_dropout_seed(device):
    """The seed the next `flash_attention` call on `device` will draw, leaving the generators where they are."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
        return draw_dropout_seed(device)


def _seed(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


def _padding_mask(batch, seq_k, device):
    """Rows of different lengths: the first full, the middle ones random lengths, the last fully padded."""
    lengths = [seq_k] + torch.randint(1, seq_k + 1, (batch - 2,)).tolist() + [0]
    mask = torch.arange(seq_k)[None, :] < torch.tensor(lengths)[:, None]
    return mask.to(device)


def _check_against_reference(q, k, v, *, causal, attention_mask, softmax_scale=None, dropout_mask=None,
                             dropout_p=0.0):
    """Runs both, compares output and the three gradients; returns the kernel output and gradients."""
    out = flash_attention(q, k, v, causal=causal, attention_mask=attention_mask, softmax_scale=softmax_scale,
                          dropout_p=dropout_p)
    assert out.dtype == q.dtype and out.shape == q.shape
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, causal=causal, attention_mask=attention_mask,
                              softmax_scale=softmax_scale, dropout_mask=dropout_mask, dropout_p=dropout_p,
                              compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())

    # What dq = scale * dS K and dk = scale * dS^T Q would be if dP - delta did not cancel (used only where
    # the reference gradient is exactly zero, see _rel_err).
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    dp = (grad_out.double() @ v64.detach().transpose(-1, -2)).abs().max().item()
    zero_scales = {"dq": scale * dp * k64.detach().abs().max().item(),
                   "dk": scale * dp * q64.detach().abs().max().item()}
    tol = TOLERANCE[q.dtype]
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        err = _rel_err(ours, theirs, zero_scales.get(name))
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    return out, grads


# (batch, heads, seq_q, seq_k, head_dim, causal, padded, dtype): odd lengths that are not block multiples,
# seq_q < seq_k and seq_q > seq_k with both masks (the latter has causal rows that see no key), decoding
# (seq_q = 1), head dims 8/16/24/40/48/64/80/128, all three dtypes, causal and not in each.
CASES = [
    (2, 2, 17, 17, 16, False, False, torch.float32),
    (3, 2, 67, 45, 24, True, True, torch.float32),
    (3, 1, 45, 130, 80, True, True, torch.float32),
    (2, 2, 1, 67, 64, True, False, torch.float32),
    (3, 2, 130, 67, 64, False, True, torch.float16),
    (3, 2, 67, 67, 80, True, True, torch.bfloat16),
    (3, 2, 33, 17, 24, False, True, torch.float16),
    (2, 3, 45, 77, 48, True, True, torch.float16),  # fp16 causal, seq_q < seq_k (a KV-cache chunk)
    (3, 2, 70, 33, 40, True, False, torch.float16),  # fp16 causal, seq_q > seq_k: the first rows see no key
    (2, 1, 17, 1, 16, True, False, torch.float32),
    (3, 1, 19, 23, 8, True, True, torch.float32),  # head_dim below 16 (tiny test models): padded to 16
    (1, 2, 40, 37, 128, False, False, torch.bfloat16),
]


@pytest.mark.parametrize("batch,heads,seq_q,seq_k,head_dim,causal,padded,dtype", CASES)
def test_matches_reference(device, batch, heads, seq_q, seq_k, head_dim, causal, padded, dtype):
    q, k, v = _inputs(batch, heads, seq_q, seq_k, head_dim, dtype, device)
    mask = _padding_mask(batch, seq_k, device) if padded else None
    out, (dq, dk, dv) = _check_against_reference(q, k, v, causal=causal, attention_mask=mask)
    if padded:  # the fully padded batch row: exactly zero output and gradients, padded keys get zero dK, dV
        assert (out[-1] == 0).all() and (dq[-1] == 0).all() and (dk[-1] == 0).all() and (dv[-1] == 0).all()
        assert (dk.transpose(1, 2)[~mask] == 0).all() and (dv.transpose(1, 2)[~mask] == 0).all()
    if causal and seq_q > seq_k:  # the first seq_q - seq_k queries see no key
        assert (out[:, :, : seq_q - seq_k] == 0).all() and (dq[:, :, : seq_q - seq_k] == 0).all()


def test_custom_scale_and_int_mask(device):
    q, k, v = _inputs(3, 2, 29, 41, 48, torch.float32, device)
    mask = _padding_mask(3, 41, device).to(torch.int64)
    _check_against_reference(q, k, v, causal=False, attention_mask=mask, softmax_scale=0.3)


def test_non_contiguous_inputs(device):
    """q from a transposed [batch, seq, heads, head_dim] view, k and v slices of one fused tensor."""
    batch, seq, heads, head_dim = 2, 37, 3, 24
    q = torch.randn(batch, seq, heads, head_dim, device=device).transpose(1, 2).detach().requires_grad_()
    kv = torch.randn(batch, seq, 2, heads, head_dim, device=device)
    k = kv[:, :, 0].transpose(1, 2).detach().requires_grad_()
    v = kv[:, :, 1].transpose(1, 2).detach().requires_grad_()
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check_against_reference(q, k, v, causal=True, attention_mask=_padding_mask(batch, seq, device))


def check_offsets_past_int32(device):
    """q, k, v, the output gradient and the key mask are `[1, 2, 37, 16]` / `[1, 37]` views whose rows are
    2**26 elements apart, so rows 32..36 start past 2**31 elements (cf. the engine's heads: strided views of
    the QKV projection). Only the touched pages of the 5 GB of virtual memory are ever allocated on the CPU.
    With int32 offsets those rows wrap to negative addresses: a crash or garbage."""
    fa_module._POISON_OUTPUTS = True
    heads, seq, head_dim, row = 2, 37, 16, 2**26
    width = heads * head_dim
    big = torch.empty(seq * row, dtype=torch.float16, device=device)

    def view(i):  # the i-th [1, heads, seq, head_dim] tensor in the rows of `big`
        t = big.as_strided((1, heads, seq, head_dim), (0, head_dim, row, 1), storage_offset=i * width)
        t.copy_(torch.randn(t.shape))
        return t

    q, k, v, grad_out = view(0), view(1), view(2), view(3)
    assert (seq - 1) * q.stride(2) > 2**31
    key_mask = torch.empty(seq * row, dtype=torch.bool, device=device).as_strided((1, seq), (0, row))
    key_mask.copy_(torch.tensor([[j not in (3, 33) for j in range(seq)]]))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = flash_attention(q, k, v, attention_mask=key_mask)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, attention_mask=key_mask, compute_dtype=torch.float64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        err = _rel_err(ours, theirs)
        assert err <= TOLERANCE[torch.float16], f"{name}: relative error {err:.2e}"


def test_offsets_past_int32(device):
    """`check_offsets_past_int32` in a fresh process: an int32 offset regression crashes (segfault on the
    CPU, illegal address on a GPU) rather than fail, and must not take the rest of the run down with it."""
    if device == "cuda" and torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs 7.5 GB of GPU memory")
    code = f"from {__name__} import check_offsets_past_int32; check_offsets_past_int32({device!r})"
    root = pathlib.Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", "import torch; torch.manual_seed(0); " + code], cwd=root,
                         capture_output=True, text=True, timeout=600)
    # A negative exit code is the signal that killed it: -11, a segfault, is a wrapped int32 offset.
    assert run.returncode == 0, f"exit code {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"


def test_dropout_fraction_and_determinism(device):
    p = 0.25
    mask = flash_attention_dropout_mask(2, 4, 61, 67, p, _seed(2**31 + 7, device))
    kept = mask.float().mean().item()
    # 32,776 Bernoulli draws: the standard deviation of the kept fraction is 0.0024.
    assert abs(kept - (1 - p)) < 0.012, kept
    other = flash_attention_dropout_mask(2, 4, 61, 67, p, _seed(2**31 + 8, device))
    assert (mask != other).float().mean() > 0.2  # another seed, another mask

    q, k, v = _inputs(2, 2, 23, 31, 16, torch.float32, device)
    torch.manual_seed(1)
    a = flash_attention(q, k, v, dropout_p=p)
    torch.manual_seed(1)
    b = flash_attention(q, k, v, dropout_p=p)
    c = flash_attention(q, k, v, dropout_p=p)  # generator moved on: a new mask
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference_under_same_mask(device, causal):
    p = 0.3
    batch, heads, seq_q, seq_k, head_dim = 3, 2, 37, 45, 24
    q, k, v = _inputs(batch, heads, seq_q, seq_k, head_dim, torch.float32, device)
    attention_mask = _padding_mask(batch, seq_k, device)
    dropout_mask = flash_attention_dropout_mask(batch, heads, seq_q, seq_k, p, _next_dropout_seed(device))
    _check_against_reference(q, k, v, causal=causal, attention_mask=attention_mask, dropout_mask=dropout_mask,
                             dropout_p=p)


def test_empty_key_sequence_gives_zeros(device):
    q, k, v = _inputs(2, 2, 5, 0, 16, torch.float32, device)
    out = flash_attention(q, k, v)
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_bad_inputs(device):
    q, k, v = (t.detach() for t in _inputs(2, 2, 5, 7, 16, torch.float32, device))
    with pytest.raises(ValueError, match="q must be 4-D"):
        flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        flash_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match="agree on batch, heads and head_dim"):
        flash_attention(q[:, :1], k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        flash_attention(q.half(), k, v)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch, seq_k\] = \[2, 7\]"):
        flash_attention(q, k, v, attention_mask=torch.ones(2, 5, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match="bool or integer"):
        flash_attention(q, k, v, attention_mask=torch.ones(2, 7, device=device))
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attention(q, k, v, dropout_p=1.0)
    big = torch.randn(1, 1, 3, 160, device=device)
    with pytest.raises(ValueError, match="head_dim must be in"):
        flash_attention(big, big, big)


class _LaunchSpy:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the grid, evaluated as Triton would with the
    launch's constexprs plus the given tile sizes, and launches nothing."""

    def __init__(self, name, grids, tiles):
        self.name, self.grids, self.tiles = name, grids, tiles

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, grid({**self.tiles, **kwargs}) if callable(grid) else grid))

        return launch


def _launch_grids(monkeypatch, batch, heads, seq_q, seq_k, block):
    """The grids of the forward, the three backward launches and the dropout-mask helper, on `meta` tensors
    (no memory, no kernel), with every autotuned tile size set to `block`."""
    from scratchformer.kernels import flash_attention_kernels as kern

    grids = []
    for name in ("_flash_attn_fwd_kernel", "_bwd_preprocess_kernel", "_flash_attn_bwd_kv_kernel",
                 "_flash_attn_bwd_q_kernel", "_dropout_mask_kernel"):
        monkeypatch.setattr(kern, name, _LaunchSpy(name, grids, {"BLOCK_M": block, "BLOCK_N": block}))
    q = torch.empty(batch, heads, seq_q, 64, device="meta")
    k = torch.empty(batch, heads, seq_k, 64, device="meta")
    seed = torch.empty(1, dtype=torch.int64, device="meta")
    out, lse = fa_module._fwd(q, k, k, True, None, 0.125, 0.1, seed)
    fa_module._bwd(out, q, k, k, out, lse, True, None, 0.125, 0.1, seed)
    flash_attention_dropout_mask(batch, heads, seq_q, seq_k, 0.1, seed)
    return grids


@pytest.mark.parametrize("block", [16, 128])
def test_launch_grids_fit_cuda_limits_at_huge_batch(monkeypatch, block):
    """CUDA allows 2**31 - 1 programs on grid axis 0 but only 65535 on axes 1 and 2; batch 8192 x 12 heads
    (98,304) must not land on either of the small axes. Pure Python: the grids are computed, nothing runs."""
    grids = _launch_grids(monkeypatch, batch=8192, heads=12, seq_q=1000, seq_k=333, block=block)
    assert [name for name, _ in grids] == ["_flash_attn_fwd_kernel", "_bwd_preprocess_kernel",
                                           "_flash_attn_bwd_kv_kernel", "_flash_attn_bwd_q_kernel",
                                           "_dropout_mask_kernel"]
    for name, grid in grids:
        assert 1 <= len(grid) <= 3 and all(n >= 1 for n in grid), (name, grid)
        assert grid[0] <= 2**31 - 1, (name, grid)
        assert all(n <= 65535 for n in grid[1:]), (name, grid)
    # One program per (row block, batch * head): none is lost to the flattening.
    programs = {name: math.prod(grid) for name, grid in grids}
    assert programs["_flash_attn_fwd_kernel"] == 8192 * 12 * math.ceil(1000 / block)
    assert programs["_flash_attn_bwd_q_kernel"] == programs["_flash_attn_fwd_kernel"]
    assert programs["_flash_attn_bwd_kv_kernel"] == 8192 * 12 * math.ceil(333 / block)
    assert programs["_dropout_mask_kernel"] == 8192 * 12 * math.ceil(1000 / 32) * math.ceil(333 / 32)


def test_launch_grid_too_large_is_a_clear_error(monkeypatch):
    with pytest.raises(ValueError, match="more than one CUDA grid holds"):
        _launch_grids(monkeypatch, batch=2**22, heads=16, seq_q=4096, seq_k=4096, block=16)


@pytest.mark.skipif(not ON_GPU, reason="large autotuned shapes need a GPU")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_large_shapes_on_gpu(device, causal, head_dim):
    """Block sizes from autotuning (up to 128) over several blocks, bf16, with padding and dropout."""
    batch, heads, seq = 3, 4, 1000
    q, k, v = _inputs(batch, heads, seq, seq, head_dim, torch.bfloat16, device)
    _check_against_reference(q, k, v, causal=causal, attention_mask=_padding_mask(batch, seq, device))
    p = 0.1
    dropout_mask = flash_attention_dropout_mask(batch, heads, seq, seq, p, _next_dropout_seed(device))
    _check_against_reference(q, k, v, causal=causal, attention_mask=None, dropout_mask=dropout_mask, dropout_p=p)


def test_autotune_key_separates_every_compiled_variant():
    """Each mask flag compiles another kernel, so each must be in the tuning key (or the variants share the block
    sizes of whichever ran first), and every key name must be a kernel argument (Triton 3.6 silently drops
    one that is not, so a typo would tune once and never again)."""
    from scratchformer.kernels import flash_attention_kernels as kern

    for kernel in (kern._flash_attn_fwd_kernel, kern._flash_attn_bwd_kv_kernel, kern._flash_attn_bwd_q_kernel):
        assert set(kernel.keys) <= set(kernel.arg_names)
        assert {"CAUSAL", "HAS_MASK", "HAS_DROPOUT", "BLOCK_D", "seq_q_bucket", "seq_k_bucket"} <= set(kernel.keys)


@pytest.mark.parametrize("dtype, head_dim", [(torch.float32, 80), (torch.float32, 128), (torch.bfloat16, 128),
                                             (torch.float16, 64)])
def test_autotune_pruning_keeps_configs_that_fit_shared_memory(dtype, head_dim):
    """The GPU config lists are pruned before compiling: every kept config's tiles fit an H100's 227 KiB of
    shared memory, nothing that fits is dropped, and a 16-bit 64-wide head keeps every non-decode config."""
    import triton

    from scratchformer.kernels import flash_attention_kernels as kern

    limit = 232448  # H100: max shared memory per block (opt-in), bytes
    q = torch.empty(1, 1, 1, 1, dtype=dtype)
    args = {"Q": q, "seq_q": 300, "seq_k": 300, "head_dim": head_dim}
    block_d = max(16, triton.next_power_of_2(head_dim))
    for options, (resident, tiles) in ((kern._FWD_OPTIONS, ("m", 1)), (kern._BWD_KV_OPTIONS, ("n", 2)),
                                       (kern._BWD_Q_OPTIONS, ("m", 2))):
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in options]
        kept = kern._prune(resident, tiles)(configs, args, BLOCK_D=block_d, shared_memory_limit=limit)
        size = {id(c): kern._shared_memory_estimate(c, q.element_size(), block_d, resident, tiles) for c in configs}
        candidates = [c for c in configs if c.kwargs["BLOCK_M"] > 16]
        assert kept and all(size[id(c)] <= limit for c in kept)
        assert [c for c in candidates if size[id(c)] <= limit] == kept
        if dtype != torch.float32 and head_dim == 64:
            assert kept == candidates
    # fp32 with a 128-wide head: the largest forward tiles (128 x 128, 3 stages: 448 KiB) are dropped.
    fwd = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in kern._FWD_OPTIONS]
    kept = kern._prune("m", 1)(fwd, {"Q": torch.empty(1, dtype=torch.float32), "seq_q": 300, "seq_k": 300,
                                     "head_dim": 128}, BLOCK_D=128, shared_memory_limit=limit)
    assert all((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (128, 128) for c in kept)
