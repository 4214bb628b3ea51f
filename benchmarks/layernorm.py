"""Benchmark: Triton LayerNorm and fused bias+GELU vs torch.nn.functional (and optionally torch.compile).

Ops (bf16 on the GPU; tokens x hidden rows):
    layer_norm   F.layer_norm(x, (N,), w, b)         vs scratchformer layer_norm(x, w, b)
    bias_gelu    F.gelu(x + b, approximate="tanh")   vs scratchformer bias_gelu(x, b, "tanh")  (N = 4 x hidden)
Modes: fwd, and fwd+bwd (torch.autograd.grad of x, w, b). Reported: median time (20th/80th percentiles)
and effective GB/s, counting the minimum traffic of the op (each [M, N] tensor read or written once):
    layer_norm  fwd 2 M N (x, y)          bwd 3 M N (x, dy, dx)     bias_gelu  fwd 2 M N      bwd 3 M N
next to the copy bandwidth measured in this script (a device-to-device copy_, read + write) and the
H100 SXM HBM3 spec of 3.35 TB/s.

Goal (issue 9, on an H100): LayerNorm fwd+bwd at least PyTorch's speed at hidden 768 to 4096.

    PYTHONPATH=. python -P benchmarks/layernorm.py                 # GPU: full sweep; CPU: tiny, interpreter
    PYTHONPATH=. python -P benchmarks/layernorm.py --compile       # also torch.compile'd PyTorch (slow to start)
    PYTHONPATH=. python -P benchmarks/layernorm.py --out /tmp/res
"""

import argparse
import os

import torch

if not torch.cuda.is_available():  # the kernels run under Triton's interpreter; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import Benchmark, measure_time  # noqa: E402
from scratchformer.kernels import bias_gelu, layer_norm  # noqa: E402

ON_GPU = torch.cuda.is_available()
HBM_SPEC_GBS = 3350.0  # H100 SXM HBM3, published


def copy_bandwidth(device):
    """GB/s of a device copy of 1 GiB (256 KiB on the CPU): bytes read + bytes written over the time."""
    n = (1 << 30) if ON_GPU else (1 << 18)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = measure_time(lambda: dst.copy_(src), warmup=1, repeats=3, gpu_timer="do_bench")
    del src, dst
    return 2 * n / med / 1e6


def torch_layer_norm(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)


def ours_layer_norm(x, w, b):
    return layer_norm(x, w, b, 1e-5)


def torch_bias_gelu(x, w, b):
    return F.gelu(x + b, approximate="tanh")


def ours_bias_gelu(x, w, b):
    return bias_gelu(x, b, "tanh")


OPS = {
    "layer_norm": {"torch": torch_layer_norm, "ours": ours_layer_norm, "width": 1},
    "bias_gelu": {"torch": torch_bias_gelu, "ours": ours_bias_gelu, "width": 4},
}


def make_fn(forward, mode, x, w, b):
    if mode == "fwd":
        return lambda: forward(x, w, b)
    inputs = (x, w, b) if forward in (torch_layer_norm, ours_layer_norm) else (x, b)
    dy = torch.randn_like(x)
    return lambda: torch.autograd.grad(forward(x, w, b), inputs, dy)


def check_agreement(op, x, w, b):
    with torch.no_grad():
        ours, theirs = OPS[op]["ours"](x, w, b).float(), OPS[op]["torch"](x, w, b).float()
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    if err > 2e-2:
        raise RuntimeError(f"{op}: ours and torch disagree (relative error {err:.2e})")


def build_benchmark(device, dtype, copy_gbs, compiled):
    """The harness benchmark: cases {op, M, N, mode}; providers torch, ours (and compiled)."""
    elt = torch.empty((), dtype=dtype).element_size()

    def setup(case):
        shape = (case["M"], case["N"])
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(case["N"], device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(case["N"], device=device, dtype=dtype, requires_grad=True)
        check_agreement(case["op"], x, w, b)
        return {"x": x, "w": w, "b": b}

    bench = Benchmark(
        "layernorm", title="LayerNorm and bias+GELU benchmark", metric="GB/s",
        work=lambda c: (2 if c["mode"] == "fwd" else 5) * c["M"] * c["N"] * elt,
        ceiling=copy_gbs, ceiling_label="measured copy", baseline="torch", setup=setup,
        warmup=1, repeats=3, gpu_timer="do_bench", x="N", panels=("op", "mode"),
        notes=[f"dtype {str(dtype).replace('torch.', '')}",
               "GB/s = minimum traffic / time: fwd 2·M·N elements, fwd+bwd 5·M·N (x, y; x, dy, dx)",
               f"ceilings: measured copy bandwidth {copy_gbs:.0f} GB/s; H100 SXM HBM3 spec {HBM_SPEC_GBS:.0f} GB/s",
               "torch = torch.nn.functional eager" + ("; compiled = torch.compile of the same function"
                                                      if compiled else ""),
               "goal: layer_norm fwd+bwd at least PyTorch's speed (torch / ours >= 1) at hidden 768 to 4096"])

    def provider(name, pick):
        @bench.provider(name)
        def make(case):
            return make_fn(pick(case["op"]), case["mode"], case["x"], case["w"], case["b"])

    provider("torch", lambda op: OPS[op]["torch"])
    if compiled:
        compiled_fns = {op: torch.compile(spec["torch"], dynamic=False) for op, spec in OPS.items()}
        provider("compiled", compiled_fns.get)
    provider("ours", lambda op: OPS[op]["ours"])
    return bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and PNG")
    parser.add_argument("--tokens", type=int, default=None, help="rows (default 16384; CPU 64)")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes (default 768,1024,2048,4096)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd PyTorch")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (automatic on the CPU)")
    args = parser.parse_args(argv)

    quick = args.quick or not ON_GPU
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    tokens = args.tokens or (64 if quick else 16384)
    hiddens = [int(h) for h in args.hidden.split(",")] if args.hidden else ([96] if quick else [768, 1024, 2048, 4096])
    copy_gbs = copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)

    bench = build_benchmark(device, dtype, copy_gbs, args.compile)
    cases = [{"op": op, "M": tokens, "N": hidden * spec["width"], "mode": mode}
             for op, spec in OPS.items() for hidden in hiddens for mode in ("fwd", "fwd+bwd")]
    results = bench.run(cases)
    print(bench.table(results))
    bench.write(results, args.out, summary=summarize(results))


def summarize(results):
    """The goal line (layer_norm fwd+bwd: torch / ours >= 1) and, on the CPU, what the numbers are worth."""
    def median(case, name):
        return next(r.median for r in results if r.case == case and r.provider == name)

    goal_cases = [r.case for r in results if r.provider == "ours" and r.ok
                  and r.case["op"] == "layer_norm" and r.case["mode"] == "fwd+bwd"]
    held = sum(median(c, "torch") / median(c, "ours") >= 1.0 for c in goal_cases)
    summary = [f"layer_norm fwd+bwd at least PyTorch's speed in {held} of {len(goal_cases)} cases "
               "(torch / this >= 1 in the ours rows)."]
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed; "
                       "this only keeps the script from rotting.")
    print("\n".join(summary))
    return summary


if __name__ == "__main__":
    main()
