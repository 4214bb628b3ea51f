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

import torch

from benchmarks.harness import Benchmark, measure_time
from scratchformer.kernels import adamw as adamw_kernels
from scratchformer.train import AdamW

BYTES_PER_PARAM = 28
ON_GPU = torch.cuda.is_available()
DO_BENCH_ARGS = {"warmup": 25, "rep": 200}  # ms of warm-up and of timed runs per do_bench call
CPU_REPEATS = 7


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


def time_it(fn):
    """(median, p20, p80) ms: do_bench(warmup=25, rep=200) on the GPU, 7 wall-clock runs after one on the CPU."""
    return measure_time(fn, warmup=1, repeats=CPU_REPEATS, gpu_timer="do_bench", do_bench_args=DO_BENCH_ARGS)


def copy_bandwidth(device, nbytes):
    x = torch.randn(nbytes // 4, device=device)
    y = torch.empty_like(x)
    ms = time_it(lambda: y.copy_(x))[0]
    del x, y
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_model(shapes, device):
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


OPTIMIZERS = {
    "ours": lambda ps: AdamW(ps, lr=1e-5),  # Triton on the GPU, torch's fused kernel on the CPU
    "torch foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.01, foreach=True),
    "torch fused": lambda ps: torch.optim.AdamW(ps, lr=1e-5, weight_decay=0.01, fused=True),
}


def build_benchmark(device, copy_gbs, shapes_of):
    """The harness benchmark: cases {case, M params, tensors}; one provider per optimizer; GB/s = 28 B/param."""

    def setup(case):
        params = make_model(shapes_of[case["case"]], device)
        return {"params_list": params, "n": sum(p.numel() for p in params)}

    bench = Benchmark(
        "adamw", title="AdamW step", metric="GB/s", work=lambda c: BYTES_PER_PARAM * c["n"],
        ceiling=copy_gbs, ceiling_label="measured device copy", baseline="torch fused", setup=setup,
        warmup=1, repeats=CPU_REPEATS, gpu_timer="do_bench", do_bench_args=DO_BENCH_ARGS, x="M params", log_x=True,
        notes=[f"GB/s counts {BYTES_PER_PARAM} bytes per fp32 parameter (read p, g, m, v; write p, m, v)",
               f"measured device copy: {copy_gbs:.0f} GB/s (bytes read + written / time; "
               f"{'1 GiB' if ON_GPU else '64 MiB'} tensor)",
               "ours = scratchformer.train.AdamW: Triton on the GPU, torch's fused kernel on the CPU"]
        + ([] if ON_GPU else ["CPU: these small sizes sit partly in cache, hence possibly more than 100% of "
                              "the copy bandwidth"]))
    for name, make_optimizer in OPTIMIZERS.items():
        def make(case, make_optimizer=make_optimizer):
            opt = make_optimizer(case["params_list"])
            opt.step()  # state allocation and compilation outside the timing
            return opt.step

        bench.provider(name)(make)
    return bench


def sweep(device):
    """GPU: our kernel at 100M parameters for each BLOCK and num_warps."""
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
            ms = time_it(step)[0]
            print(f"sweep 100M BLOCK={block:5d} num_warps={warps:2d}: {ms:.3f} ms "
                  f"{BYTES_PER_PARAM * 1e8 / (ms * 1e-3) / 1e9:.0f} GB/s")
    del params, opt


def summarize(results, copy_gbs):
    """Each provider's GB/s as a share of the measured copy bandwidth."""
    names = list(OPTIMIZERS)
    summary = ["| case | " + " | ".join(f"{n} % of copy" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for case in dict.fromkeys(r.case["case"] for r in results):
        rates = {r.provider: r.rate for r in results if r.case["case"] == case and r.ok}
        summary.append(f"| {case} | " + " | ".join("-" if n not in rates else f"{rates[n] / copy_gbs:.0%}"
                                                  for n in names) + " |")
    print("\n".join(summary))
    return summary


def run(args):
    device = "cuda" if ON_GPU else "cpu"
    copy_gbs = copy_bandwidth(device, (1 << 30) if ON_GPU else (1 << 26))
    print(f"device copy {copy_gbs:.0f} GB/s (read + write)")
    chosen = cases(ON_GPU, args.quick)
    shapes_of = dict(chosen)
    bench = build_benchmark(device, copy_gbs, shapes_of)
    table_cases = []
    for label, shapes in chosen:
        n = sum(torch.Size(s).numel() for s in shapes)
        table_cases.append({"case": label, "M params": round(n / 1e6, 1), "tensors": len(shapes)})
    results = bench.run(table_cases)
    print(bench.table(results))
    if args.sweep and ON_GPU:
        sweep(device)
    bench.write(results, args.out, summary=summarize(results, copy_gbs))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and PNG")
    parser.add_argument("--quick", action="store_true", help="small sizes only (automatic on a CPU)")
    parser.add_argument("--sweep", action="store_true", help="GPU: also sweep BLOCK / num_warps at 100M")
    run(parser.parse_args())
