"""Benchmark: fused Triton LoRA linear vs the unfused PEFT computation vs the frozen base linear alone.

Providers (bf16, with bias, LoRA dropout 0 as in the goals):
    base     y = x Wᵀ + b with W frozen: forward + backward computes dX only
    unfused  PEFT's order: base(x) + lora_B(lora_A(x)) * scaling (cuBLAS matmuls + elementwise ops)
    fused    scratchformer.kernels.lora_linear
Modes: forward, and forward+backward (torch.autograd.grad of x, A, B; base: of x).
Reported: median time (20th/80th percentiles), TFLOP/s next to the ceiling, extra peak memory of one call.

Goals (issue 4, on an H100): fused fwd+bwd <= 1.10x the base's, and >= 1.3x faster than unfused.

    PYTHONPATH=. python benchmarks/lora.py                  # GPU: full sweep; CPU: tiny sizes, interpreter
    PYTHONPATH=. python benchmarks/lora.py --out /tmp/res   # write the results elsewhere
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():  # the kernels run under Triton's interpreter; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

from scratchformer.kernels import lora_linear  # noqa: E402

ON_GPU = torch.cuda.is_available()
CEILING_TFLOPS = 790.0  # bf16 matrix products measured on an H200 (shared/REFERENCE.md); H100 SXM is close
GOAL_VS_BASE = 1.10
GOAL_VS_UNFUSED = 1.3


def unfused(x, weight, bias, lora_a, lora_b, scaling):
    """What PEFT's lora.Linear runs (dropout 0 is the identity): three matmuls, a scale and an add."""
    result = torch.nn.functional.linear(x, weight, bias)
    return result + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b) * scaling


def make_case(tokens, in_f, out_f, r, dtype, device):
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(out_f, in_f, device=device) / in_f**0.5).to(dtype)
    bias = torch.randn(out_f, device=device, dtype=dtype)
    lora_a = (torch.randn(r, in_f, device=device) / in_f**0.5).to(dtype).requires_grad_()
    lora_b = (torch.randn(out_f, r, device=device) / r**0.5).to(dtype).requires_grad_()
    return x, weight, bias, lora_a, lora_b


def make_fns(provider, mode, x, weight, bias, lora_a, lora_b, scaling):
    if provider == "base":
        forward = lambda: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
        inputs = (x,)
    elif provider == "unfused":
        forward = lambda: unfused(x, weight, bias, lora_a, lora_b, scaling)  # noqa: E731
        inputs = (x, lora_a, lora_b)
    else:
        forward = lambda: lora_linear(x, weight, bias, lora_a, lora_b, scaling)  # noqa: E731
        inputs = (x, lora_a, lora_b)
    if mode == "fwd":
        return forward
    dy = torch.randn(x.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    return lambda: torch.autograd.grad(forward(), inputs, dy)


def check_agreement(case, scaling):
    """Refuse to time a wrong kernel: fused and unfused outputs must agree to the dtype's precision."""
    with torch.no_grad():
        ours = lora_linear(*case, scaling).float()
        theirs = unfused(*case, scaling).float()
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    if err > 2e-2:
        raise RuntimeError(f"fused and unfused outputs disagree (relative error {err:.2e})")


def flops(mode, provider, tokens, in_f, out_f, r):
    base = 2 * tokens * in_f * out_f
    low_rank = 2 * tokens * r * (in_f + out_f)
    if provider == "base":
        return base if mode == "fwd" else 2 * base
    # backward: dX base, plus dY B, (dY B) A, dA and dB: two more low-rank products
    return base + low_rank if mode == "fwd" else 2 * base + 3 * low_rank


def measure(fn):
    """(median, p20, p80) in ms and the extra peak memory of one call in MiB (None on the CPU)."""
    fn()  # compile / autotune outside the timing
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        del out
        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80, peak
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1], None


def device_tag():
    if not ON_GPU:
        return "CPU"
    name = torch.cuda.get_device_name()
    match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name)
    return match.group(1) if match else re.sub(r"\W+", "_", name)


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and PNG")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096,16384)")
    parser.add_argument("--shapes", default=None, help="comma-separated INxOUT (default 768x768,768x3072,4096x4096)")
    parser.add_argument("--ranks", default=None, help="comma-separated LoRA ranks (default 8,16,64)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (automatic on the CPU)")
    args = parser.parse_args(argv)

    quick = args.quick or not ON_GPU
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter's bf16 is slow and not the point
    tokens_list = [int(t) for t in args.tokens.split(",")] if args.tokens else ([64] if quick else [4096, 16384])
    shapes = parse_shapes(args.shapes) if args.shapes else ([(48, 40)] if quick else
                                                             [(768, 768), (768, 3072), (4096, 4096)])
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else ([8] if quick else [8, 16, 64])
    scaling = 2.0

    rows = []
    for tokens in tokens_list:
        for in_f, out_f in shapes:
            for r in ranks:
                case = make_case(tokens, in_f, out_f, r, dtype, device)
                check_agreement(case, scaling)
                for mode in ("fwd", "fwd+bwd"):
                    result = {"tokens": tokens, "in": in_f, "out": out_f, "r": r, "mode": mode}
                    for provider in ("base", "unfused", "fused"):
                        med, p20, p80, peak = measure(make_fns(provider, mode, *case, scaling))
                        result[provider] = (med, p20, p80, peak)
                        result[provider + "_tflops"] = flops(mode, provider, tokens, in_f, out_f, r) / med / 1e9
                    rows.append(result)
                    print(format_row(result), flush=True)
                del case
                if ON_GPU:
                    torch.cuda.empty_cache()
    write_results(rows, args.out, dtype)


def format_row(row):
    b, u, f = (row[p][0] for p in ("base", "unfused", "fused"))
    return (f"tokens={row['tokens']:6d} in={row['in']:5d} out={row['out']:5d} r={row['r']:3d} {row['mode']:8s} "
            f"base {b:8.3f} ms  unfused {u:8.3f} ms  fused {f:8.3f} ms  "
            f"fused/base {f / b:5.2f}x  unfused/fused {u / f:5.2f}x")


def write_results(rows, out_dir, dtype):
    os.makedirs(out_dir, exist_ok=True)
    tag = device_tag()
    device_name = torch.cuda.get_device_name() if ON_GPU else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    header = [
        f"# LoRA linear benchmark: {tag}",
        "",
        f"- device: {device_name}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- dtype {str(dtype).replace('torch.', '')}, with bias, LoRA dropout 0; times are medians "
        "(triton.testing.do_bench on the GPU) in ms, [20th, 80th] percentiles",
        "- base = frozen linear alone (its backward computes dX only); unfused = PEFT's lora.Linear order; "
        "fused = scratchformer lora_linear",
        f"- TFLOP/s count each provider's own FLOPs; ceiling about {CEILING_TFLOPS:.0f} (bf16 matmul, H200)",
        "- peak = extra peak memory of one call in MiB (outputs and autograd state included)",
        f"- goals: fused fwd+bwd <= {GOAL_VS_BASE:.2f}x base; unfused / fused >= {GOAL_VS_UNFUSED:.1f}x",
        "",
        "| tokens | in | out | r | mode | base ms | unfused ms | fused ms | fused TFLOP/s | fused / base | "
        "unfused / fused | peak MiB base / unfused / fused |",
        "|---:|---:|---:|---:|:--|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines = []
    for row in rows:
        b, u, f = (row[p] for p in ("base", "unfused", "fused"))
        peak = " / ".join("n/a" if p[3] is None else f"{p[3]:.0f}" for p in (b, u, f))
        vs_base, vs_unfused = f[0] / b[0], u[0] / f[0]
        mark_base = " ✓" if row["mode"] == "fwd+bwd" and vs_base <= GOAL_VS_BASE else ""
        mark_unfused = " ✓" if row["mode"] == "fwd+bwd" and vs_unfused >= GOAL_VS_UNFUSED else ""
        lines.append(
            f"| {row['tokens']} | {row['in']} | {row['out']} | {row['r']} | {row['mode']} | "
            f"{b[0]:.3f} [{b[1]:.3f}, {b[2]:.3f}] | {u[0]:.3f} [{u[1]:.3f}, {u[2]:.3f}] | "
            f"{f[0]:.3f} [{f[1]:.3f}, {f[2]:.3f}] | {row['fused_tflops']:.0f} | {vs_base:.2f}x{mark_base} | "
            f"{vs_unfused:.2f}x{mark_unfused} | {peak} |"
        )
    full = [r for r in rows if r["mode"] == "fwd+bwd"]
    held_base = sum(r["fused"][0] / r["base"][0] <= GOAL_VS_BASE for r in full)
    held_unfused = sum(r["unfused"][0] / r["fused"][0] >= GOAL_VS_UNFUSED for r in full)
    summary = [
        "",
        f"fwd+bwd goal fused <= {GOAL_VS_BASE:.2f}x base holds in {held_base} of {len(full)} cases; "
        f"unfused/fused >= {GOAL_VS_UNFUSED:.1f}x holds in {held_unfused} of {len(full)} (marked ✓).",
    ]
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed; "
                       "this only keeps the script from rotting.")
    md_path = os.path.join(out_dir, f"lora_{tag}.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(header + lines + summary) + "\n")
    print("\n".join(summary))
    print(f"wrote {md_path}")
    plot(rows, os.path.join(out_dir, f"lora_{tag}.png"), tag)


def plot(rows, path, tag):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5), sharey=False)
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['tokens'] // 1024 if r['tokens'] >= 1024 else r['tokens']}{'K' if r['tokens'] >= 1024 else ''}"
                  f" {r['in']}x{r['out']} r{r['r']}" for r in sel]
        xs = range(len(sel))
        for i, provider in enumerate(("unfused", "fused")):
            ratio = [r[provider][0] / r["base"][0] for r in sel]
            ax.bar([x + (i - 0.5) * 0.4 for x in xs], ratio, width=0.4, label=provider)
        ax.axhline(1.0, color="black", linewidth=0.8)
        if mode == "fwd+bwd":
            ax.axhline(GOAL_VS_BASE, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL_VS_BASE}x")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=70, fontsize=7)
        ax.set_ylabel("time / frozen base linear")
        ax.set_title(f"LoRA linear {mode} ({tag})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
