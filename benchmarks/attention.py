"""Benchmark: our Triton FlashAttention-2 against PyTorch's SDPA backends and an eager baseline.

    PYTHONPATH=. python benchmarks/attention.py [--out DIR] [--quick]

On a GPU: bf16, head dim 64 and 128, sequence 512..16384 at a fixed 16K tokens (batch = tokens / seq),
heads = 2048 / head_dim, causal and not. For each provider it measures forward, backward and forward+backward
(median of `triton.testing.do_bench`) as TFLOP/s, and the peak memory of forward+backward above the inputs.
FLOPs: 4 * batch * heads * seq_q * seq_k * head_dim for the forward (half when causal); the backward is 2.5
times that. Providers: `triton` (ours), `sdpa-flash`, `sdpa-efficient`, `sdpa-cudnn`, `sdpa-math` (via
`torch.nn.attention.sdpa_kernel`), and `eager` (matmul, softmax, matmul in the input dtype). A provider that
errors (unsupported) or would not fit in memory is shown as "-".

On the CPU (no CUDA) it runs tiny fp32 sizes with the reference paths only (eager, sdpa-math and ours under
the Triton interpreter when TRITON_INTERPRET=1), timed with wall clock, so the script never rots.
Writes `attention_<device>.md` and `.png` under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import time
from pathlib import Path

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from scratchformer.kernels import flash_attention  # noqa: E402

# H100 SXM ceilings for bf16 dense matrix products (attention is matmul-bound).
H100_SPEC_TFLOPS = 989.0
H100_MEASURED_TFLOPS = 790.0  # measured matmul throughput, see shared/REFERENCE.md


def eager_attention(q, k, v, causal):
    """The plain matmul-softmax-matmul path, in the input dtype, materialising the scores."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        seq_q, seq_k = q.shape[-2], k.shape[-2]
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def providers(on_gpu: bool) -> dict:
    from torch.nn.attention import SDPBackend

    found = {"triton": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal)}
    if on_gpu:
        for name, attr in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                           ("cudnn", "CUDNN_ATTENTION")):
            if hasattr(SDPBackend, attr):
                found[f"sdpa-{name}"] = _sdpa(getattr(SDPBackend, attr))
    found["sdpa-math"] = _sdpa(SDPBackend.MATH)
    found["eager"] = eager_attention
    return found


def attention_flops(batch, heads, seq_q, seq_k, head_dim, causal, mode) -> float:
    fwd = 4.0 * batch * heads * seq_q * seq_k * head_dim * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _time_ms(fn, on_gpu, grad_to_none=None) -> float:
    if on_gpu:
        return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none)
    fn()  # warm-up (compiles / traces)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _quadratic_bytes(batch, heads, seq, dtype) -> int:
    """Rough peak of a path that materialises the scores: the scores, the probabilities and their gradients."""
    return 4 * batch * heads * seq * seq * torch.finfo(dtype).bits // 8


def measure(name, fn, batch, heads, seq, head_dim, causal, dtype, device, on_gpu) -> dict:
    """{mode: TFLOP/s (GPU) or ms (CPU)} plus 'peak_mib'; missing entries mean the provider was skipped."""
    result = {}
    if name in ("eager", "sdpa-math") and on_gpu:
        free, _ = torch.cuda.mem_get_info()
        if _quadratic_bytes(batch, heads, seq, dtype) > 0.8 * free:
            return result  # would not fit
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            fwd_ms = _time_ms(lambda: fn(q, k, v, causal), on_gpu)
        out = fn(q, k, v, causal)
        bwd_ms = _time_ms(lambda: out.backward(grad_out, retain_graph=True), on_gpu, grad_to_none=[q, k, v])
        del out

        def step():
            fn(q, k, v, causal).backward(grad_out)

        full_ms = _time_ms(step, on_gpu, grad_to_none=[q, k, v])
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    except (RuntimeError, torch.OutOfMemoryError) as err:  # unsupported shape/dtype for this backend, or OOM
        print(f"  {name}: skipped ({str(err).splitlines()[0][:80]})")
        return {}
    finally:
        q.grad = k.grad = v.grad = None
        if on_gpu:
            torch.cuda.empty_cache()
    for mode, ms in (("fwd", fwd_ms), ("bwd", bwd_ms), ("fwd+bwd", full_ms)):
        if on_gpu:
            result[mode] = attention_flops(batch, heads, seq, seq, head_dim, causal, mode) / (ms * 1e-3) / 1e12
        else:
            result[mode] = ms
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and plot")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the default without a GPU)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq, fixed across the sweep")
    parser.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    args = parser.parse_args()

    on_gpu = ON_GPU and not args.quick
    device = "cuda" if ON_GPU else "cpu"
    if on_gpu:
        dtype, tokens, seqs, head_dims, hidden = torch.bfloat16, args.tokens, args.seqs, args.head_dims, 2048
    else:  # tiny and fp32: the interpreter and the CPU have no fast bf16
        dtype, tokens, seqs, head_dims, hidden = torch.float32, 128, [32, 64], [16, 32], 64
    provs = providers(on_gpu)
    if not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        provs.pop("triton")  # CPU tensors need the interpreter
    unit = "TFLOP/s" if on_gpu else "ms"
    device_name = torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()})"

    rows = []
    start = time.perf_counter()
    for head_dim in head_dims:
        heads = max(1, hidden // head_dim)
        for causal in (False, True):
            for seq in seqs:
                batch = max(1, tokens // seq)
                print(f"head_dim={head_dim} heads={heads} causal={causal} seq={seq} batch={batch}", flush=True)
                for name, fn in provs.items():
                    res = measure(name, fn, batch, heads, seq, head_dim, causal, dtype, device, on_gpu)
                    rows.append(dict(provider=name, head_dim=head_dim, heads=heads, causal=causal, seq=seq,
                                     batch=batch, **res))
    elapsed = time.perf_counter() - start

    def fmt(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    header = (f"| head_dim | causal | seq | batch | provider | fwd {unit} | bwd {unit} | fwd+bwd {unit} "
              f"| peak MiB |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['head_dim']} | {r['causal']} | {r['seq']} | {r['batch']} | {r['provider']} "
                     f"| {fmt(r.get('fwd'))} | {fmt(r.get('bwd'))} | {fmt(r.get('fwd+bwd'))} "
                     f"| {fmt(r.get('peak_mib'), 0)} |")
    table = "\n".join(lines)
    print(table)
    print(f"sweep took {elapsed:.0f} s")

    versions = (f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}, "
                f"{datetime.date.today().isoformat()}")
    ceiling = (f"H100 SXM bf16 dense ceilings: {H100_SPEC_TFLOPS:.0f} TFLOP/s (spec), about "
               f"{H100_MEASURED_TFLOPS:.0f} measured for matrix products." if on_gpu else
               "CPU run: tiny fp32 shapes, wall-clock milliseconds (not TFLOP/s); only checks the script runs.")
    tag = "".join(ch if ch.isalnum() else "_" for ch in (device_name.split()[-1] if ON_GPU else "CPU"))
    tag = next((t for t in ("H100", "H200", "A100", "L4") if t in device_name), tag)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"attention_{tag}.md"
    md.write_text(
        f"# Attention benchmark on {device_name}\n\n{versions}\n\n"
        f"dtype {str(dtype).replace('torch.', '')}, {tokens} tokens per point (batch = tokens / seq), "
        f"heads = {hidden} / head_dim. FLOPs: 4*b*h*s*s*d forward (half when causal), backward 2.5x. "
        f"Peak memory is the allocation above the inputs during forward+backward.\n\n{ceiling}\n\n"
        f"{table}\n\nSweep time {elapsed:.0f} s (including autotuning).\n"
    )
    print(f"wrote {md}")
    _plot(rows, out_dir / f"attention_{tag}.png", unit, device_name, head_dims)


def _plot(rows, path, unit, device_name, head_dims) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(len(head_dims), 2, figsize=(11, 4 * len(head_dims)), squeeze=False)
    for i, head_dim in enumerate(head_dims):
        for j, causal in enumerate((False, True)):
            ax = axes[i][j]
            for provider in dict.fromkeys(r["provider"] for r in rows):
                pts = [(r["seq"], r["fwd+bwd"]) for r in rows if r["provider"] == provider
                       and r["head_dim"] == head_dim and r["causal"] == causal and "fwd+bwd" in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=provider)
            ax.set_xscale("log", base=2)
            ax.set_title(f"fwd+bwd, head_dim {head_dim}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(unit)
            ax.legend(fontsize=8)
    fig.suptitle(f"Attention on {device_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
