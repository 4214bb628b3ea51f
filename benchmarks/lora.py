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
import os

import torch

if not torch.cuda.is_available():  # the kernels run under Triton's interpreter; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.harness import Benchmark  # noqa: E402
from scratchformer.kernels import lora_linear  # noqa: E402

ON_GPU = torch.cuda.is_available()
CEILING_TFLOPS = 790.0  # bf16 matrix products measured on an H200 (shared/REFERENCE.md); H100 SXM is close
GOAL_VS_BASE = 1.10
GOAL_VS_UNFUSED = 1.3
PROVIDERS = ("base", "unfused", "fused")


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


def parse_shapes(text):
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


def build_benchmark(device, dtype, scaling, plot_tokens):
    """The harness benchmark: cases {tokens, in, out, r, mode}; providers base, unfused, fused; peak memory."""

    def setup(case):
        tensors = make_case(case["tokens"], case["in"], case["out"], case["r"], dtype, device)
        check_agreement(tensors, scaling)
        return {"tensors": tensors}

    def work_of(provider):
        return lambda c: flops(c["mode"], provider, c["tokens"], c["in"], c["out"], c["r"])

    bench = Benchmark(
        "lora", title="LoRA linear benchmark", metric="TFLOP/s", ceiling=CEILING_TFLOPS if ON_GPU else None,
        ceiling_label="bf16 matmul measured (H200)", baseline="base", setup=setup, memory=True,
        warmup=1, repeats=3, gpu_timer="do_bench", x="r", panels=("in", "out", "mode"), log_x=True,
        plot_cases=lambda c: c["tokens"] == plot_tokens,
        notes=[f"dtype {str(dtype).replace('torch.', '')}, with bias, LoRA dropout 0, scaling {scaling}",
               "base = frozen linear alone (its backward computes dX only); unfused = PEFT's lora.Linear order; "
               "fused = scratchformer lora_linear",
               "TFLOP/s count each provider's own FLOPs: base 2·T·in·out (fwd+bwd twice that); LoRA adds "
               "2·T·r·(in+out) forward, three times that fwd+bwd",
               "peak = extra peak memory of one call in MiB (outputs and autograd state included)",
               f"goals: fused fwd+bwd <= {GOAL_VS_BASE:.2f}x base; unfused / fused >= {GOAL_VS_UNFUSED:.1f}x"])
    for name in PROVIDERS:
        def make(case, name=name):
            return make_fns(name, case["mode"], *case["tensors"], scaling)

        bench.provider(name, work=work_of(name))(make)
    return bench


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

    bench = build_benchmark(device, dtype, scaling, plot_tokens=max(tokens_list))
    cases = [{"tokens": tokens, "in": in_f, "out": out_f, "r": r, "mode": mode}
             for tokens in tokens_list for in_f, out_f in shapes for r in ranks for mode in ("fwd", "fwd+bwd")]
    results = bench.run(cases)
    print(bench.table(results))
    bench.write(results, args.out, summary=summarize(results))


def summarize(results):
    """Per case: fused / base and unfused / fused times (✓ where a fwd+bwd goal holds), and the goal counts."""
    def median(case, name):
        return next((r.median for r in results if r.case == case and r.provider == name and r.ok), None)

    summary = ["| tokens | in | out | r | mode | fused / base | unfused / fused |", "|---:|---:|---:|---:|:--|---:|---:|"]
    held_base = held_unfused = full = 0
    for case in dict.fromkeys(tuple(r.case.items()) for r in results):
        case = dict(case)
        b, u, f = (median(case, name) for name in PROVIDERS)
        if None in (b, u, f):
            continue
        vs_base, vs_unfused = f / b, u / f
        goal = case["mode"] == "fwd+bwd"
        full += goal
        held_base += goal and vs_base <= GOAL_VS_BASE
        held_unfused += goal and vs_unfused >= GOAL_VS_UNFUSED
        summary.append(f"| {case['tokens']} | {case['in']} | {case['out']} | {case['r']} | {case['mode']} | "
                       f"{vs_base:.2f}x{' ✓' if goal and vs_base <= GOAL_VS_BASE else ''} | "
                       f"{vs_unfused:.2f}x{' ✓' if goal and vs_unfused >= GOAL_VS_UNFUSED else ''} |")
    summary += ["", f"fwd+bwd goal fused <= {GOAL_VS_BASE:.2f}x base holds in {held_base} of {full} cases; "
                    f"unfused/fused >= {GOAL_VS_UNFUSED:.1f}x holds in {held_unfused} of {full} (marked ✓)."]
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed; "
                       "this only keeps the script from rotting.")
    print("\n".join(summary))
    return summary


if __name__ == "__main__":
    main()
