"""Benchmark: our Triton FlashAttention-2 against PyTorch's SDPA backends and an eager baseline.

    PYTHONPATH=. python benchmarks/attention.py [--out DIR] [--quick]

On a GPU: bf16, head dim 64 and 128, sequence 512..16384 at a fixed 16K tokens (batch = tokens / seq),
heads = 2048 / head_dim, causal and not. For each provider it measures forward, backward and forward+backward
(median of `triton.testing.do_bench`) as TFLOP/s, and the peak memory of forward+backward above the inputs.
FLOPs: 4 * batch * heads * seq_q * seq_k * head_dim for the forward (half when causal); the backward is 2.5
times that. Providers: `triton` (ours), `sdpa-flash`, `sdpa-efficient`, `sdpa-cudnn`, `sdpa-math` (via
`torch.nn.attention.sdpa_kernel`), and `eager`: the engine's own `backend="eager"` path,
`scratchformer.engine.transformer.eager_attention` (matmul, softmax in fp32, matmul, all scores in memory). A
provider that errors (unsupported) or would not fit in memory is shown as "-".

On the CPU (no CUDA) it runs tiny fp32 sizes with the reference paths only (eager, sdpa-math and ours under
the Triton interpreter when TRITON_INTERPRET=1), timed with wall clock, so the script never rots.
Writes `attention_<device>.md` and `.png` under --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.harness import Benchmark  # noqa: E402
from scratchformer.engine.transformer import eager_attention  # noqa: E402
from scratchformer.kernels import flash_attention  # noqa: E402

# H100 SXM ceilings for bf16 dense matrix products (attention is matmul-bound).
H100_SPEC_TFLOPS = 989.0
H100_MEASURED_TFLOPS = 790.0  # measured matmul throughput, see shared/REFERENCE.md


def eager(q, k, v, causal):
    """The engine's eager attention as the model runs it: no padding, no dropout, scale head_dim ** -0.5."""
    return eager_attention(q, k, v, causal=causal, key_padding_mask=None, dropout_p=0.0, scale=q.shape[-1] ** -0.5)


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
    found["eager"] = eager
    return found


def attention_flops(batch, heads, seq_q, seq_k, head_dim, causal, mode) -> float:
    fwd = 4.0 * batch * heads * seq_q * seq_k * head_dim * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _quadratic_bytes(name, batch, heads, seq, dtype) -> int:
    """Rough peak of a path that materialises the scores: the scores, the probabilities and their gradients
    in the input dtype; the engine's eager path also holds its softmax's fp32 output and fp32 gradients."""
    elements = batch * heads * seq * seq
    fp32_copies = 2 if name == "eager" else 0
    return elements * (4 * torch.finfo(dtype).bits // 8 + fp32_copies * 4)


def make_provider(name, fn, dtype, device):
    """The harness provider for `fn`: fresh q, k, v for the case, then a callable for its mode.
    fwd: fn under no_grad; bwd: backward of one stored forward (retain_graph); fwd+bwd: both. The backward
    modes reset q, k, v's .grad before each timed run (grad_to_none)."""

    def make(case):
        batch, heads, seq, head_dim, causal = (case[k] for k in ("batch", "heads", "seq", "head_dim", "causal"))
        if name in ("eager", "sdpa-math") and ON_GPU:
            free, _ = torch.cuda.mem_get_info()
            if _quadratic_bytes(name, batch, heads, seq, dtype) > 0.8 * free:
                return None  # would not fit
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad_out = torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype)
        if case["mode"] == "fwd":
            def run():
                with torch.no_grad():
                    return fn(q, k, v, causal)
            return run
        if case["mode"] == "bwd":
            out = fn(q, k, v, causal)

            def run():
                out.backward(grad_out, retain_graph=True)
        else:
            def run():
                fn(q, k, v, causal).backward(grad_out)
        run.grad_to_none = [q, k, v]
        return run

    return make


def build_benchmark(provs, dtype, device, tokens, hidden):
    on_h100 = ON_GPU and "H100" in torch.cuda.get_device_name()
    bench = Benchmark(
        "attention", title="Attention benchmark", metric="TFLOP/s" if ON_GPU else "GFLOP/s",
        work=lambda c: attention_flops(c["batch"], c["heads"], c["seq"], c["seq"], c["head_dim"], c["causal"],
                                       c["mode"]),
        ceiling=H100_SPEC_TFLOPS if on_h100 else None, ceiling_label="H100 SXM bf16 dense spec",
        memory=True, warmup=1, repeats=1, gpu_timer="do_bench", do_bench_args={"warmup": 10, "rep": 50},
        x="seq", panels=("head_dim", "causal"), log_x=True, plot_cases=lambda c: c["mode"] == "fwd+bwd",
        notes=[f"dtype {str(dtype).replace('torch.', '')}, {tokens} tokens per point (batch = tokens / seq), "
               f"heads = {hidden} / head_dim",
               "FLOPs: 4·b·h·s·s·d forward (half when causal), backward 2.5x that, fwd+bwd 3.5x",
               "peak = allocation above the inputs during one call of the mode, in MiB",
               f"H100 SXM bf16 dense ceilings: {H100_SPEC_TFLOPS:.0f} TFLOP/s (spec, the plot's line), about "
               f"{H100_MEASURED_TFLOPS:.0f} measured for matrix products",
               "plot: fwd+bwd only"]
        + ([] if ON_GPU else ["CPU run: tiny fp32 shapes, one wall-clock run after one warm-up, ours under "
                              "the Triton interpreter; only checks the script runs"]))
    for name, fn in provs.items():
        bench.provider(name)(make_provider(name, fn, dtype, device))
    return bench


def summarize(results, provs, elapsed, unit):
    """fwd+bwd rates side by side, one column per provider, and the sweep time."""
    names = list(provs)
    lines = [f"fwd+bwd {unit} by provider:", "",
             "| head_dim | causal | seq | batch | " + " | ".join(names) + " |", "|---:" * 4 + "|---:" * len(names) + "|"]
    for key in dict.fromkeys((r.case["head_dim"], r.case["causal"], r.case["seq"], r.case["batch"])
                             for r in results if r.case["mode"] == "fwd+bwd"):
        rate = {r.provider: r.rate for r in results if r.ok and r.case["mode"] == "fwd+bwd"
                and (r.case["head_dim"], r.case["causal"], r.case["seq"], r.case["batch"]) == key}
        lines.append("| " + " | ".join(str(v) for v in key) + " | "
                     + " | ".join(f"{rate[n]:.3g}" if n in rate else "-" for n in names) + " |")
    lines += ["", f"Sweep time {elapsed:.0f} s (including autotuning)."]
    print("\n".join(lines))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and plot")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the default without a GPU)")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq, fixed across the sweep")
    parser.add_argument("--seqs", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="*", default=[64, 128])
    args = parser.parse_args()

    full = ON_GPU and not args.quick
    device = "cuda" if ON_GPU else "cpu"
    if full:
        dtype, tokens, seqs, head_dims, hidden = torch.bfloat16, args.tokens, args.seqs, args.head_dims, 2048
    else:  # tiny and fp32: the interpreter and the CPU have no fast bf16
        dtype, tokens, seqs, head_dims, hidden = torch.float32, 128, [32, 64], [16, 32], 64
    provs = providers(full)
    if not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        provs.pop("triton")  # CPU tensors need the interpreter

    bench = build_benchmark(provs, dtype, device, tokens, hidden)
    cases = [{"head_dim": head_dim, "heads": max(1, hidden // head_dim), "causal": causal, "seq": seq,
              "batch": max(1, tokens // seq), "mode": mode}
             for head_dim in head_dims for causal in (False, True) for seq in seqs
             for mode in ("fwd", "bwd", "fwd+bwd")]
    start = time.perf_counter()
    results = bench.run(cases)
    elapsed = time.perf_counter() - start
    print(bench.table(results))
    bench.write(results, args.out, summary=summarize(results, provs, elapsed, bench.metric))


if __name__ == "__main__":
    main()
