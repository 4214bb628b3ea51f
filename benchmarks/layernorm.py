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

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from scratchformer.kernels import bias_gelu, layer_norm  # noqa: E402

ON_GPU = torch.cuda.is_available()
HBM_SPEC_GBS = 3350.0  # H100 SXM HBM3, published


def time_ms(fn):
    """(median, p20, p80) in ms: do_bench on the GPU, three wall-clock runs on the CPU."""
    fn()
    if ON_GPU:
        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8]))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def copy_bandwidth(device):
    """GB/s of a device copy of 1 GiB (256 KiB on the CPU): bytes read + bytes written over the time."""
    n = (1 << 30) if ON_GPU else (1 << 18)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src))
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


def device_tag():
    if not ON_GPU:
        return "CPU"
    name = torch.cuda.get_device_name()
    match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]*)\b", name)
    return match.group(1) if match else re.sub(r"\W+", "_", name)


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
    elt = torch.empty((), dtype=dtype).element_size()
    copy_gbs = copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)

    rows = []
    for op, spec in OPS.items():
        providers = {"torch": spec["torch"], "ours": spec["ours"]}
        if args.compile:
            providers["compiled"] = torch.compile(spec["torch"], dynamic=False)
        for hidden in hiddens:
            n = hidden * spec["width"]
            x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            check_agreement(op, x, w, b)
            for mode in ("fwd", "fwd+bwd"):
                nbytes = (2 if mode == "fwd" else 5) * tokens * n * elt
                row = {"op": op, "tokens": tokens, "N": n, "mode": mode}
                for name, fn in providers.items():
                    med, p20, p80 = time_ms(make_fn(fn, mode, x, w, b))
                    row[name] = (med, p20, p80, nbytes / med / 1e6)
                rows.append(row)
                print(format_row(row), flush=True)
            del x, w, b
    write_results(rows, args.out, dtype, copy_gbs, args.compile)


def format_row(row):
    parts = [f"{row['op']:10s} M={row['tokens']:6d} N={row['N']:6d} {row['mode']:8s}"]
    for name in ("torch", "compiled", "ours"):
        if name in row:
            parts.append(f"{name} {row[name][0]:7.3f} ms {row[name][3]:6.0f} GB/s")
    parts.append(f"torch/ours {row['torch'][0] / row['ours'][0]:5.2f}x")
    return "  ".join(parts)


def write_results(rows, out_dir, dtype, copy_gbs, compiled):
    os.makedirs(out_dir, exist_ok=True)
    tag = device_tag()
    device_name = (torch.cuda.get_device_name() if ON_GPU
                   else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    names = ["torch", "compiled", "ours"] if compiled else ["torch", "ours"]
    header = [
        f"# LayerNorm and bias+GELU benchmark: {tag}",
        "",
        f"- device: {device_name}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- dtype {str(dtype).replace('torch.', '')}; times are medians (triton.testing.do_bench on the GPU) "
        "in ms, [20th, 80th] percentiles",
        "- GB/s = minimum traffic / time: fwd 2·M·N elements, fwd+bwd 5·M·N (x, y; x, dy, dx)",
        f"- ceilings: measured copy bandwidth {copy_gbs:.0f} GB/s; H100 SXM HBM3 spec {HBM_SPEC_GBS:.0f} GB/s",
        "- torch = torch.nn.functional eager" + ("; compiled = torch.compile of the same function" if compiled else ""),
        "- goal: layer_norm fwd+bwd at least PyTorch's speed (torch/ours >= 1) at hidden 768 to 4096",
        "",
        "| op | M | N | mode | " + " | ".join(f"{n} ms | {n} GB/s" for n in names) + " | torch / ours |",
        "|:--|---:|---:|:--|" + "---:|---:|" * len(names) + "---:|",
    ]
    lines = []
    for row in rows:
        cells = " | ".join(f"{row[n][0]:.3f} [{row[n][1]:.3f}, {row[n][2]:.3f}] | {row[n][3]:.0f}" for n in names)
        ratio = row["torch"][0] / row["ours"][0]
        mark = " ✓" if row["op"] == "layer_norm" and row["mode"] == "fwd+bwd" and ratio >= 1.0 else ""
        lines.append(f"| {row['op']} | {row['tokens']} | {row['N']} | {row['mode']} | {cells} | {ratio:.2f}x{mark} |")
    goal_rows = [r for r in rows if r["op"] == "layer_norm" and r["mode"] == "fwd+bwd"]
    held = sum(r["torch"][0] / r["ours"][0] >= 1.0 for r in goal_rows)
    summary = ["", f"layer_norm fwd+bwd at least PyTorch's speed in {held} of {len(goal_rows)} cases (marked ✓)."]
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed; "
                       "this only keeps the script from rotting.")
    md_path = os.path.join(out_dir, f"layernorm_{tag}.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(header + lines + summary) + "\n")
    print("\n".join(summary))
    print(f"wrote {md_path}")
    plot(rows, names, os.path.join(out_dir, f"layernorm_{tag}.png"), tag, copy_gbs)


def plot(rows, names, path, tag, copy_gbs):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    panels = [(op, mode) for op in OPS for mode in ("fwd", "fwd+bwd")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (op, mode) in zip(axes, panels):
        sel = [r for r in rows if r["op"] == op and r["mode"] == mode]
        xs = range(len(sel))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([x + (i - (len(names) - 1) / 2) * width for x in xs], [r[name][3] for r in sel], width=width,
                   label=name)
        ax.axhline(copy_gbs, color="black", linestyle="--", linewidth=0.8, label="copy")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([str(r["N"]) for r in sel])
        ax.set_xlabel("N (row width)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {mode} ({tag})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
