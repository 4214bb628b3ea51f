"""Triton kernels of FlashAttention-2: forward, backward and the dropout mask. Kernels only.

The autograd Function and the public `flash_attention` live in `flash_attention.py`; the semantics are those
of `attention_reference.attention_reference`. Notation used in every docstring below:

- `B` batch, `H` heads, `Sq` = seq_q, `Sk` = seq_k, `D` = head_dim (16..128), `BLOCK_D` = next power of two
  of `D` (the head dim is padded inside the kernel with masked loads, so 24, 48, 80 work).
- `diag = Sk - Sq`: with `CAUSAL`, query `i` sees key `j` iff `j <= i + diag` (bottom-right alignment).
- Scores are kept in base 2: `s2 = q.k * softmax_scale * log2(e)`, so the softmax uses `exp2`, and the
  saved log-sum-exp `lse` is `log2(sum_j exp2(s2_ij))` (base 2, of the scaled scores). A query that sees no
  key stores `lse = +inf`, which makes every recomputed probability `exp2(s2 - inf) = 0` in the backward.
- Dropout: element `(b, h, i, j)` of the attention matrix is kept iff
  `tl.rand(seed, offset + ((b * H + h) * Sq + i) * Sk + j) >= dropout_p`. The counter depends only on the
  element's position, never on block sizes, so the forward, the backward (whatever blocks autotuning
  picked) and the test helper `_dropout_mask_kernel` all draw the same mask. The seed is read from an
  int64 `[1]` device tensor (`DropoutSeed`), never passed as a number from the host.
- Tensors are addressed through explicit strides (no contiguity assumed) except the fp32 `lse`/`delta`
  buffers, which the Python side allocates contiguous as `[B, H, Sq]`.
- Every element offset is computed in int64 (`_head_ptr`, `_tile_offsets`, the row offsets of the inner
  loops). Products such as `row * stride_row` pass 2**31 well before a tensor is huge: the engine's heads are
  strided views of the QKV projection, so `stride_row` is `3 * hidden` and row 58K of a hidden-12288 model is
  past 2**31 elements; int32 would wrap to a negative offset and read outside the tensor. Only the 1-D offset
  vectors (`[BLOCK_M]`, `[BLOCK_N]`, `[BLOCK_D]`) and scalars are widened before being broadcast into a
  tile, and the pointer tiles they are added to are 64-bit anyway, so the cost is a few registers per
  thread, not a second copy of a tile.

Why the backward is split in two kernels (as in FlashAttention-2): the dK/dV kernel owns a block of keys
and walks over the query blocks, the dQ kernel owns a block of queries and walks over the key blocks. Each
output is written once by a single program, so there are no atomics, and autotuning (which launches every
config on the same buffers) is safe because nothing accumulates in place.

GPU notes: the matrix products take their operands in the input dtype (fp16/bf16 tensor cores, fp32
accumulation); the probabilities are cast to V's dtype before `P @ V` as FlashAttention-2 does. fp32 inputs use
`input_precision="ieee"` (exact fp32, like PyTorch's default matmul) rather than tf32. Under the Triton
interpreter (`UPCAST=True`) every load is converted to fp32 first, because the interpreter's bf16
arithmetic is wrong.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
import triton.testing

from scratchformer.kernels.dropout_seed import load_dropout_seed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------------------------
# Keys: bucketed sequence lengths (next power of two, so KV-cache decoding, where Sk grows by one per step,
# does not retune at every step), the padded head dim and the three mask flags. The bucket arguments are
# passed by the launcher only for this purpose. Each flag compiles a different kernel (the padding mask adds a
# load per key block, dropout a random number per score), so each variant gets its own tuning rather than
# inheriting the block sizes the first variant to run happened to pick. (Triton adds the tensors' dtypes.)
_AUTOTUNE_KEY = ["seq_q_bucket", "seq_k_bucket", "BLOCK_D", "CAUSAL", "HAS_MASK", "HAS_DROPOUT"]


def _configs(options: list[tuple[int, int, int, int]]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples -> triton.Config list; a single small config under
    the interpreter, where autotuning cannot run and fewer, larger programs are faster."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in options]


_FWD_OPTIONS = (
    [
        (128, 64, 8, 3),
        (128, 64, 4, 3),
        (128, 128, 8, 3),
        (128, 32, 4, 4),
        (64, 64, 4, 3),
        (64, 32, 4, 4),
        (16, 64, 4, 3),  # decoding with a KV cache: one or a few queries
        (16, 128, 4, 3),
    ]
)
_FWD_CONFIGS = _configs(_FWD_OPTIONS)
# Backward: the dK/dV kernel keeps a block of K, V, dK, dV resident and streams Q/dO; the dQ kernel the
# reverse. Smaller tiles than the forward because each iteration holds more live tiles.
_BWD_KV_OPTIONS = [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 2)]
_BWD_Q_OPTIONS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)]
_BWD_KV_CONFIGS = _configs(_BWD_KV_OPTIONS)
_BWD_Q_CONFIGS = _configs(_BWD_Q_OPTIONS)


def _shared_memory_limit() -> int:
    """Bytes of shared memory one program may use on the current GPU (227 KiB on an H100)."""
    import torch

    device = torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]


def _shared_memory_estimate(config: triton.Config, elem: int, block_d: int, resident: str, tiles: int) -> int:
    """Bytes of the tiles a program keeps in shared memory, by the convention of Triton's own matmul pruning
    (`(BLOCK_M + BLOCK_N) * BLOCK_K * num_stages * dtype size`): `tiles` resident tiles of the `resident`
    block ("m": BLOCK_M query rows, "n": BLOCK_N key rows) plus two streamed tiles of the other block per
    pipeline stage, each `block_d` wide."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    kept, streamed = (m, n) if resident == "m" else (n, m)
    return elem * block_d * (tiles * kept + 2 * streamed * config.num_stages)


def _prune(resident: str, tiles: int):
    """An early_config_prune for one kernel: the forward keeps 1 Q tile and streams K, V ("m", 1); the dQ
    kernel keeps Q, dO and streams K, V ("m", 2); the dK/dV kernel keeps K, V and streams Q, dO ("n", 2)."""

    def prune(configs, named_args, **kwargs):
        """Keep the BLOCK_M=16 (decoding) configs only for at most 16 queries, drop blocks much larger than
        the problem, and drop configs whose tiles cannot fit in shared memory (fp32 with a 128 head dim):
        compiling those only to fail costs seconds each. At least one config always survives."""
        seq_q, seq_k = named_args["seq_q"], named_args["seq_k"]
        if len(configs) == 1:
            return configs
        decode = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
        if seq_q <= 16 and decode:
            return decode
        kept = [c for c in configs
                if 16 < c.kwargs["BLOCK_M"] <= max(64, seq_q) and c.kwargs["BLOCK_N"] <= max(64, seq_k)]
        kept = kept or configs
        elem = named_args["Q"].element_size()
        block_d = kwargs.get("BLOCK_D") or max(16, triton.next_power_of_2(named_args["head_dim"]))
        limit = kwargs.get("shared_memory_limit") or _shared_memory_limit()

        def size(c):
            return _shared_memory_estimate(c, elem, block_d, resident, tiles)

        return [c for c in kept if size(c) <= limit] or [min(kept, key=size)]

    return prune


def _autotune_bench(kernel_call, quantiles):
    """Shorter timing runs than Triton's default (25 ms warm-up, 100 ms measured) so that tuning a new shape
    costs well under a second per kernel; the ranking of the configs is stable at this length."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def _autotune(configs, prune):
    return triton.autotune(configs=configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": prune},
                           do_bench=_autotune_bench)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _dropout_keep(seed, offset, pid_bh, seq_q, seq_k, rows, cols, dropout_p):
    """Keep-mask of dropout for the attention elements at query positions `rows` and key positions `cols`
    (broadcastable int tensors) of batch*head `pid_bh`: True where the element is kept. The counter is the
    element's flat index in `[B, H, Sq, Sk]` plus `offset`, in int64 (it exceeds 2**31 at long sequences)."""
    counter = offset + (pid_bh.to(tl.int64) * seq_q + rows.to(tl.int64)) * seq_k + cols.to(tl.int64)
    return tl.rand(seed, counter) >= dropout_p


@triton.jit
def _block_and_head(num_rows, BLOCK: tl.constexpr):
    """(row block, batch * head) of this program. The launch grid is 1-D, `cdiv(num_rows, BLOCK) * B * H`
    programs with the row block varying fastest: CUDA allows 65535 programs on grid axes 1 and 2 only, fewer
    than batch * heads at large batches, but 2**31 - 1 on axis 0."""
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(num_rows, BLOCK)
    return pid % num_blocks, pid // num_blocks


@triton.jit
def _head_ptr(base, b, h, stride_b, stride_h):
    """Pointer to the `[S, D]` slice of batch `b`, head `h` of a `[B, H, S, D]` tensor (int64 offsets)."""
    return base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _tile_offsets(rows, cols, stride_row, stride_col):
    """Element offsets `[len(rows), len(cols)]` of a tile inside one (batch, head) slice, in int64."""
    return rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    K_block_ptr0, V_block_ptr0, mask_ptr0,
    stride_kn, stride_vn, stride_mn,
    offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
    dropout_p, dropout_seed, dropout_offset,
    lo, hi,
    EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online-softmax loop of the forward over key blocks [lo, hi) (lo, hi multiples of BLOCK_N, except
    that hi may be seq_k when EDGE). With EDGE=False the blocks are known to lie inside seq_k and entirely
    below the causal diagonal, so only the key padding mask is applied."""
    d_ok = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        k_ptrs = K_block_ptr0 + offs_n.to(tl.int64)[:, None] * stride_kn
        v_ptrs = V_block_ptr0 + offs_n.to(tl.int64)[:, None] * stride_vn
        if EDGE:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base 2
        if EDGE:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(allowed, s, float("-inf"))
        if HAS_MASK:
            key_ok = tl.load(mask_ptr0 + offs_n.to(tl.int64) * stride_mn, mask=n_ok, other=0) != 0
            s = tl.where(key_ok[None, :], s, float("-inf"))
        # m_i starts at a large finite negative number, so a row whose scores are all -inf so far keeps
        # m_new finite and exp2(-inf - m_new) = 0: no NaN from (-inf) - (-inf).
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            # The denominator l_i uses the undropped probabilities; only the numerator is dropped.
            keep = _dropout_keep(dropout_seed, dropout_offset, pid_bh, seq_q, seq_k, offs_m[:, None],
                                 offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@_autotune(_FWD_CONFIGS, _prune("m", 1))
@triton.jit(do_not_specialize=["dropout_offset"])
def _flash_attn_fwd_kernel(
    Q, K, V, Out, Lse, KeyMask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    num_heads, seq_q, seq_k, head_dim,
    qk_scale, dropout_p, DropoutSeed, dropout_offset,
    seq_q_bucket, seq_k_bucket,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program computes BLOCK_M query rows of one (batch, head). Grid: (cdiv(Sq, BLOCK_M) * B * H,).

    Args:
        Q: `[B, H, Sq, D]` queries (fp32/fp16/bf16), strides `stride_q*`.
        K: `[B, H, Sk, D]` keys, strides `stride_k*`.
        V: `[B, H, Sk, D]` values, strides `stride_v*`.
        Out: `[B, H, Sq, D]` output in the input dtype, strides `stride_o*`. Every element with i < Sq,
            d < D is written (zeros for queries that see no key).
        Lse: `[B, H, Sq]` fp32, contiguous: base-2 log-sum-exp of the scaled scores, +inf for queries that
            see no key.
        KeyMask: `[B, Sk]` integer, nonzero = real key, strides `stride_m*` (unused unless HAS_MASK).
        num_heads, seq_q, seq_k, head_dim: H, Sq, Sk, D.
        qk_scale: softmax_scale * log2(e).
        dropout_p, DropoutSeed, dropout_offset: dropout probability, the int64 `[1]` tensor holding the
            mask's seed, and the mask's counter offset (unused unless HAS_DROPOUT).
        seq_q_bucket, seq_k_bucket: next powers of two of Sq, Sk; autotuning keys only.
        CAUSAL, HAS_MASK, HAS_DROPOUT: which masks apply.
        BLOCK_D: next power of two >= D (>= 16 for tl.dot).
        UPCAST: convert loads to fp32 (interpreter only).
        DOT_PRECISION: "ieee" for fp32 inputs, "tf32" otherwise (ignored for fp16/bf16 operands).
        BLOCK_M, BLOCK_N: tile sizes (autotuned).
    """
    pid_m, pid_bh = _block_and_head(seq_q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    d_ok = offs_d < head_dim
    dropout_seed = load_dropout_seed(DropoutSeed, HAS_DROPOUT)

    q_ptrs = _head_ptr(Q, b, h, stride_qb, stride_qh) + _tile_offsets(offs_m, offs_d, stride_qm, stride_qd)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptr0 = _head_ptr(K, b, h, stride_kb, stride_kh) + offs_d.to(tl.int64)[None, :] * stride_kd
    v_ptr0 = _head_ptr(V, b, h, stride_vb, stride_vh) + offs_d.to(tl.int64)[None, :] * stride_vd
    mask_ptr0 = KeyMask + b.to(tl.int64) * stride_mb

    diag = seq_k - seq_q
    # Key range this query block needs, and the part of it that needs no causal / edge masking.
    if CAUSAL:
        hi = tl.minimum(seq_k, tl.maximum(start_m + BLOCK_M + diag, 0))  # keys past it are above the diagonal
        full_hi = tl.minimum(seq_k, tl.maximum(start_m + diag + 1, 0))  # keys every row of the block sees
    else:
        hi = seq_k
        full_hi = seq_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - 1.0e30
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptr0, v_ptr0, mask_ptr0, stride_kn, stride_vn, stride_mn,
        offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
        dropout_p, dropout_seed, dropout_offset, 0, full_hi,
        False, CAUSAL, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_ptr0, v_ptr0, mask_ptr0, stride_kn, stride_vn, stride_mn,
        offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
        dropout_p, dropout_seed, dropout_offset, full_hi, hi,
        True, CAUSAL, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N,
    )

    seen = l_i > 0.0  # false for a query that sees no key at all
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    out = tl.where(seen[:, None], out, 0.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("inf"))
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=m_ok)
    o_ptrs = _head_ptr(Out, b, h, stride_ob, stride_oh) + _tile_offsets(offs_m, offs_d, stride_om, stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    Out, dOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    num_heads, seq_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) (fp32), the `D_i` of the FlashAttention-2 backward. Grid: (cdiv(Sq, BLOCK_M) * B * H,).

    Args:
        Out: `[B, H, Sq, D]` forward output (after dropout), strides `stride_o*`.
        dOut: `[B, H, Sq, D]` gradient of the output, strides `stride_do*`.
        Delta: `[B, H, Sq]` fp32, contiguous, written.
        num_heads, seq_q, head_dim: H, Sq, D.
        BLOCK_M: rows per program; BLOCK_D: next power of two >= D.
    """
    pid_m, pid_bh = _block_and_head(seq_q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < head_dim)
    o_ptrs = _head_ptr(Out, b, h, stride_ob, stride_oh) + _tile_offsets(offs_m, offs_d, stride_om, stride_od)
    do_ptrs = _head_ptr(dOut, b, h, stride_dob, stride_doh) + _tile_offsets(offs_m, offs_d, stride_dom, stride_dod)
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _bwd_kv_inner(
    dk, dv, k, v, q_ptr0, do_ptr0, Lse_bh, Delta_bh,
    stride_qm, stride_dom,
    offs_n, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
    dropout_p, dropout_seed, dropout_offset,
    lo, hi,
    CAUSAL_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dK/dV accumulation over query blocks [lo, hi) for one key block, in transposed form ([BLOCK_N,
    BLOCK_M] tiles). Query rows past seq_q load q = dO = 0 and lse = +inf, so their probabilities are 0 and
    they contribute nothing; only the causal mask needs applying (CAUSAL_MASK, near the diagonal)."""
    d_ok = offs_d < head_dim
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seq_q
        rows = offs_m.to(tl.int64)[:, None]
        q = tl.load(q_ptr0 + rows * stride_qm, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_ptr0 + rows * stride_dom, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(Lse_bh + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(Delta_bh + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.exp2(s_t - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M] = (dO V^T)^T
        if HAS_DROPOUT:
            keep_t = _dropout_keep(dropout_seed, dropout_offset, pid_bh, seq_q, seq_k, offs_m[None, :],
                                   offs_n[:, None], dropout_p)
            scale_drop = 1.0 / (1.0 - dropout_p)
            pd_t = tl.where(keep_t, p_t * scale_drop, 0.0)  # dropped probabilities, as used in O = Pd V
            dv = tl.dot(pd_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t * scale_drop, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@_autotune(_BWD_KV_CONFIGS, _prune("n", 2))
@triton.jit(do_not_specialize=["dropout_offset"])
def _flash_attn_bwd_kv_kernel(
    Q, K, V, dOut, Lse, Delta, KeyMask, dK, dV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mn,
    num_heads, seq_q, seq_k, head_dim,
    qk_scale, softmax_scale, dropout_p, DropoutSeed, dropout_offset,
    seq_q_bucket, seq_k_bucket,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dK and dV for BLOCK_N keys of one (batch, head), walking over the query blocks that see them.
    Grid: (cdiv(Sk, BLOCK_N) * B * H,).

    Args:
        Q, K, V: as in the forward (`[B, H, Sq, D]`, `[B, H, Sk, D]`, `[B, H, Sk, D]`).
        dOut: `[B, H, Sq, D]` gradient of the output, strides `stride_do*`.
        Lse: `[B, H, Sq]` fp32 contiguous, from the forward. Delta: `[B, H, Sq]` fp32 contiguous, from
            `_bwd_preprocess_kernel`.
        KeyMask: `[B, Sk]` integer, nonzero = real key (unused unless HAS_MASK): padded keys get zero dK, dV.
        dK, dV: `[B, H, Sk, D]` outputs in the input dtype, strides `stride_dk*`, `stride_dv*`.
        num_heads, seq_q, seq_k, head_dim: H, Sq, Sk, D.
        qk_scale: softmax_scale * log2(e); softmax_scale: the plain scale (dK = scale * dS^T Q).
        dropout_p, DropoutSeed, dropout_offset, seq_q_bucket, seq_k_bucket, constexprs: as in the forward.
    """
    pid_n, pid_bh = _block_and_head(seq_k, BLOCK_N)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    dropout_seed = load_dropout_seed(DropoutSeed, HAS_DROPOUT)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seq_k
    d_ok = offs_d < head_dim
    nd_ok = n_ok[:, None] & d_ok[None, :]

    k_ptrs = _head_ptr(K, b, h, stride_kb, stride_kh) + _tile_offsets(offs_n, offs_d, stride_kn, stride_kd)
    v_ptrs = _head_ptr(V, b, h, stride_vb, stride_vh) + _tile_offsets(offs_n, offs_d, stride_vn, stride_vd)
    k = tl.load(k_ptrs, mask=nd_ok, other=0.0)
    v = tl.load(v_ptrs, mask=nd_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptr0 = _head_ptr(Q, b, h, stride_qb, stride_qh) + offs_d.to(tl.int64)[None, :] * stride_qd
    do_ptr0 = _head_ptr(dOut, b, h, stride_dob, stride_doh) + offs_d.to(tl.int64)[None, :] * stride_dod
    Lse_bh = Lse + pid_bh.to(tl.int64) * seq_q
    Delta_bh = Delta + pid_bh.to(tl.int64) * seq_q

    diag = seq_k - seq_q
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Queries before lo see none of these keys; from mid on they see all of them.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M, seq_q)
        mid = tl.maximum(mid, lo)
        dk, dv = _bwd_kv_inner(
            dk, dv, k, v, q_ptr0, do_ptr0, Lse_bh, Delta_bh, stride_qm, stride_dom,
            offs_n, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
            dropout_p, dropout_seed, dropout_offset, lo, mid,
            True, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M,
        )
    else:
        mid = 0
    dk, dv = _bwd_kv_inner(
        dk, dv, k, v, q_ptr0, do_ptr0, Lse_bh, Delta_bh, stride_qm, stride_dom,
        offs_n, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
        dropout_p, dropout_seed, dropout_offset, mid, seq_q,
        False, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_M,
    )

    dk = dk * softmax_scale
    if HAS_MASK:
        # A padded key's probabilities were never part of any softmax: its gradients are zero. Whatever the
        # loop computed for it (possibly inf/NaN, since its scores were not in the log-sum-exp) is discarded.
        mask_ptrs = KeyMask + b.to(tl.int64) * stride_mb + offs_n.to(tl.int64) * stride_mn
        key_ok = tl.load(mask_ptrs, mask=n_ok, other=0) != 0
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    dk_ptrs = _head_ptr(dK, b, h, stride_dkb, stride_dkh) + _tile_offsets(offs_n, offs_d, stride_dkn, stride_dkd)
    dv_ptrs = _head_ptr(dV, b, h, stride_dvb, stride_dvh) + _tile_offsets(offs_n, offs_d, stride_dvn, stride_dvd)
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=nd_ok)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_q_inner(
    dq, q, do, lse, delta, k_ptr0, v_ptr0, mask_ptr0,
    stride_kn, stride_vn, stride_mn,
    offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
    dropout_p, dropout_seed, dropout_offset,
    lo, hi,
    EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ accumulation over key blocks [lo, hi) for one query block. EDGE as in `_fwd_inner`."""
    d_ok = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_k
        k_ptrs = k_ptr0 + offs_n.to(tl.int64)[:, None] * stride_kn
        v_ptrs = v_ptr0 + offs_n.to(tl.int64)[:, None] * stride_vn
        if EDGE:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if EDGE:
            allowed = n_ok[None, :]
            if CAUSAL:
                allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(allowed, p, 0.0)
        if HAS_MASK:
            key_ok = tl.load(mask_ptr0 + offs_n.to(tl.int64) * stride_mn, mask=n_ok, other=0) != 0
            p = tl.where(key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout_seed, dropout_offset, pid_bh, seq_q, seq_k, offs_m[:, None],
                                 offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@_autotune(_BWD_Q_CONFIGS, _prune("m", 2))
@triton.jit(do_not_specialize=["dropout_offset"])
def _flash_attn_bwd_q_kernel(
    Q, K, V, dOut, Lse, Delta, KeyMask, dQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mn,
    num_heads, seq_q, seq_k, head_dim,
    qk_scale, softmax_scale, dropout_p, DropoutSeed, dropout_offset,
    seq_q_bucket, seq_k_bucket,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ for BLOCK_M queries of one (batch, head), walking over the key blocks they see.
    Grid: (cdiv(Sq, BLOCK_M) * B * H,). Arguments as in `_flash_attn_bwd_kv_kernel`, with dQ `[B, H, Sq, D]`
    (input dtype, strides `stride_dq*`) as the output."""
    pid_m, pid_bh = _block_and_head(seq_q, BLOCK_M)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seq_q
    md_ok = m_ok[:, None] & (offs_d[None, :] < head_dim)
    dropout_seed = load_dropout_seed(DropoutSeed, HAS_DROPOUT)

    q_ptrs = _head_ptr(Q, b, h, stride_qb, stride_qh) + _tile_offsets(offs_m, offs_d, stride_qm, stride_qd)
    do_ptrs = _head_ptr(dOut, b, h, stride_dob, stride_doh) + _tile_offsets(offs_m, offs_d, stride_dom, stride_dod)
    q = tl.load(q_ptrs, mask=md_ok, other=0.0)
    do = tl.load(do_ptrs, mask=md_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(Delta + pid_bh.to(tl.int64) * seq_q + offs_m, mask=m_ok, other=0.0)
    k_ptr0 = _head_ptr(K, b, h, stride_kb, stride_kh) + offs_d.to(tl.int64)[None, :] * stride_kd
    v_ptr0 = _head_ptr(V, b, h, stride_vb, stride_vh) + offs_d.to(tl.int64)[None, :] * stride_vd
    mask_ptr0 = KeyMask + b.to(tl.int64) * stride_mb

    diag = seq_k - seq_q
    if CAUSAL:
        hi = tl.minimum(seq_k, tl.maximum(start_m + BLOCK_M + diag, 0))
        full_hi = tl.minimum(seq_k, tl.maximum(start_m + diag + 1, 0))
    else:
        hi = seq_k
        full_hi = seq_k
    full_hi = (full_hi // BLOCK_N) * BLOCK_N

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_q_inner(
        dq, q, do, lse, delta, k_ptr0, v_ptr0, mask_ptr0, stride_kn, stride_vn, stride_mn,
        offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
        dropout_p, dropout_seed, dropout_offset, 0, full_hi,
        False, CAUSAL, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N,
    )
    dq = _bwd_q_inner(
        dq, q, do, lse, delta, k_ptr0, v_ptr0, mask_ptr0, stride_kn, stride_vn, stride_mn,
        offs_m, offs_d, pid_bh, seq_q, seq_k, head_dim, diag, qk_scale,
        dropout_p, dropout_seed, dropout_offset, full_hi, hi,
        True, CAUSAL, HAS_MASK, HAS_DROPOUT, UPCAST, DOT_PRECISION, BLOCK_N,
    )
    dq = dq * softmax_scale
    dq_ptrs = _head_ptr(dQ, b, h, stride_dqb, stride_dqh) + _tile_offsets(offs_m, offs_d, stride_dqm, stride_dqd)
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=md_ok)


# ----------------------------------------------------------------------------------------------------------
# Test helper: the dropout mask itself
# ----------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["dropout_offset"])
def _dropout_mask_kernel(
    Mask, seq_q, seq_k, dropout_p, DropoutSeed, dropout_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the keep-mask the attention kernels use. Grid: (cdiv(Sq, BLOCK_M) * cdiv(Sk, BLOCK_N) * B * H,),
    key blocks varying fastest, then query blocks.

    Args:
        Mask: `[B, H, Sq, Sk]` int8, contiguous, written with 1 = kept.
        seq_q, seq_k: Sq, Sk. dropout_p, DropoutSeed, dropout_offset: as in the forward.
    """
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(seq_q, BLOCK_M)
    blocks_n = tl.cdiv(seq_k, BLOCK_N)
    pid_bh = pid // (blocks_m * blocks_n)
    pid_m = (pid // blocks_n) % blocks_m
    pid_n = pid % blocks_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(load_dropout_seed(DropoutSeed), dropout_offset, pid_bh, seq_q, seq_k, offs_m[:, None],
                         offs_n[None, :], dropout_p)
    ptrs = Mask + (pid_bh.to(tl.int64) * seq_q + offs_m[:, None]) * seq_k + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k))
