"""Benchmark: one AdamW step, ours against torch.optim.AdamW(foreach=True) and (fused=True).

    PYTHONPATH=. python benchmarks/adamw.py [--out DIR] [--quick] [--sweep]

Counts 28 bytes per fp32 parameter (read p, g, m, v; write p, m, v) and compares the resulting GB/s with a
device copy measured here (a 1 GiB tensor copy: bytes read + written / time). Cases: single tensors and
GPT-2-like tensor lists (embeddings, per-layer weights and biases) from about 10M to 1B parameters.
On a GPU: triton.testing.do_bench medians (20th/80th percentiles in the table); on a CPU: small sizes
only, our optimizer's CPU path (torch's fused kernel) against torch's foreach and fused paths, wall-clock
medians. Writes benchmarks/results/adamw_<device>.md and .png (if matplotlib is installed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import triton

from scratchformer.kernels import adamw as adamw_kernels
from scratchformer.train import AdamW

BYTES_PER_PARAM = 28


def gpt2_shapes(n_layer: int, d: int, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style model (wte, wpe, per layer ln/attn/mlp weights and biases, ln_f)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def cases(on_gpu: bool, quick: bool):
    if not on_gpu or quick:
        return [
            ("1 tensor, 1M", [(1 << 20,)]),
            ("GPT-2 tiny list (4L, d=128)", gpt2_shapes(4, 128, vocab=8192, ctx=256)),
            ("1 tensor, 4M", [(4 << 20,)]),
        ]
    return [
        ("1 tensor, 10M", [(10_000_000,)]),
        ("GPT-2-like list, 11M (4L, d=256, 32k vocab)", gpt2_shapes(4, 256, vocab=32000)),
        ("1 tensor, 100M", [(100_000_000,)]),
        ("GPT-2 small list, 124M (148 tensors)", gpt2_shapes(12, 768)),
        ("GPT-2 medium list, 355M", gpt2_shapes(24, 1024)),
        ("GPT-2 large list, 774M", gpt2_shapes(36, 1280)),
        ("1 tensor, 1B", [(1_000_000_000,)]),
    ]


def timer(on_gpu: bool):
    if on_gpu:
        def bench(fn):
            med, lo, hi = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5, 0.2, 0.8])
            return med, lo, hi
    else:
        def bench(fn, reps=7):
            fn()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            return statistics.median(times), times[1], times[-2]
    return bench


def copy_bandwidth(device, bench, nbytes):
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))[0]
    del x, y
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_model(shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def run(args):
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    bench = timer(on_gpu)
    name = torch.cuda.get_device_name() if on_gpu else f"CPU ({os.cpu_count()} cores)"
    tag = next((t for t in ("H200", "H100", "A100", "L4", "A10", "T4") if t in name), None) if on_gpu else "CPU"
    tag = tag or name.replace(" ", "_")
    copy_gbs = copy_bandwidth(device, bench, (1 << 30) if on_gpu else (1 << 26))
    print(f"{name}: device copy {copy_gbs:.0f} GB/s (read + write)")

    providers = {
        "ours": lambda ps: AdamW(ps, lr=1e-5),  # Triton on the GPU, torch's fused kernel on the CPU
        "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.01, foreach=True),
        "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.01, fused=True),
    }
    rows = []
    for label, shapes in cases(on_gpu, args.quick):
        params = make_model(shapes, device)
        n = sum(p.numel() for p in params)
        row = dict(case=label, n=n, tensors=len(shapes))
        for prov, make in providers.items():
            opt = make(params)
            opt.step()  # state allocation and compilation outside the timing
            med, lo, hi = bench(opt.step)
            row[prov] = (med, lo, hi)
            del opt
            if on_gpu:
                torch.cuda.empty_cache()
        rows.append(row)
        gbs = {p: BYTES_PER_PARAM * n / (row[p][0] * 1e-3) / 1e9 for p in providers}
        print(f"{label:45s} {n / 1e6:8.1f}M " + "  ".join(
            f"{p}: {row[p][0]:8.3f} ms {gbs[p]:7.0f} GB/s ({gbs[p] / copy_gbs:4.0%})" for p in providers))
        del params
        if on_gpu:
            torch.cuda.empty_cache()

    if args.sweep and on_gpu:
        params = make_model([(100_000_000,)], device)
        opt = AdamW(params, lr=1e-5)
        opt.step()
        st = opt.state[params[0]]
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                def step():
                    adamw_kernels.fused_adamw_(params, [params[0].grad], [st["exp_avg"]], [st["exp_avg_sq"]],
                                               None, None, [st["step"]], lr=1e-5, beta1=0.9, beta2=0.999,
                                               eps=1e-8, weight_decay=0.01, block=block, num_warps=warps)
                ms = bench(step)[0]
                print(f"sweep 100M BLOCK={block:5d} num_warps={warps:2d}: {ms:.3f} ms "
                      f"{BYTES_PER_PARAM * 1e8 / (ms * 1e-3) / 1e9:.0f} GB/s")
        del params, opt

    write_results(args.out, tag, name, copy_gbs, rows, list(providers), on_gpu)


def write_results(out, tag, name, copy_gbs, rows, providers, on_gpu):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"adamw_{tag}.md")
    lines = [
        f"# AdamW step on {name}",
        "",
        f"{datetime.date.today()}, torch {torch.__version__}, triton {triton.__version__}. "
        f"Measured device copy: {copy_gbs:.0f} GB/s (bytes read + written / time). "
        f"GB/s counts {BYTES_PER_PARAM} bytes per fp32 parameter; % is of the copy bandwidth. "
        + ("Times are do_bench medians [20th-80th percentile]." if on_gpu else
           "CPU: wall-clock medians; 'ours' is our optimizer's CPU path (torch's fused kernel); these small "
           "sizes sit partly in cache, hence more than 100% of the copy bandwidth (64 MiB tensor)."),
        "",
        "| case | params | tensors | " + " | ".join(f"{p} ms | {p} GB/s (%)" for p in providers) + " |",
        "|---|---:|---:|" + "---:|---:|" * len(providers),
    ]
    for r in rows:
        cells = []
        for p in providers:
            med, lo, hi = r[p]
            gbs = BYTES_PER_PARAM * r["n"] / (med * 1e-3) / 1e9
            cells += [f"{med:.3f} [{lo:.3f}-{hi:.3f}]", f"{gbs:.0f} ({gbs / copy_gbs:.0%})"]
        lines.append(f"| {r['case']} | {r['n'] / 1e6:.1f}M | {r['tensors']} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        gbs = [BYTES_PER_PARAM * r["n"] / (r[p][0] * 1e-3) / 1e9 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], gbs, width, label=p)
    ax.axhline(copy_gbs, color="k", linestyle="--", label="device copy")
    ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["case"] for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("GB/s (28 bytes / parameter)")
    ax.set_title(f"AdamW step, {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path[:-3] + ".png", dpi=120)
    print(f"wrote {path[:-3]}.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and PNG")
    parser.add_argument("--quick", action="store_true", help="small sizes only (automatic on a CPU)")
    parser.add_argument("--sweep", action="store_true", help="GPU: also sweep BLOCK / num_warps at 100M")
    run(parser.parse_args())
