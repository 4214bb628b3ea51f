"""Benchmark: fused linear cross-entropy vs F.linear + F.cross_entropy on materialised logits.

GPT-2 small's head: vocab 50257, hidden 768, bf16 hidden states and weight, 30% of labels ignored,
reduction "mean". Mode fwd+bwd: loss, then torch.autograd.grad of hidden and weight.
    torch      F.cross_entropy(F.linear(h, W), labels)        ([tokens, vocab] logits and their gradient)
    compiled   torch.compile of the same function (with --compile)
    fused      scratchformer linear_cross_entropy(h, W, labels) (chunks of tokens, default chunk size)
Reported: median time (20th/80th percentiles) and the extra peak memory of one fwd+bwd call (inputs
excluded; outputs, gradients and temporaries included).

Goal (issue 9, on an H100): at 16K tokens the fused loss has at least 4x lower peak memory than torch's
with no more than 1.1x its time.

    PYTHONPATH=. python -P benchmarks/cross_entropy.py              # GPU: 4K..32K tokens; CPU: tiny sizes
    PYTHONPATH=. python -P benchmarks/cross_entropy.py --compile --out /tmp/res
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

from scratchformer.kernels import default_chunk_size, linear_cross_entropy  # noqa: E402

ON_GPU = torch.cuda.is_available()
GOAL_MEMORY = 4.0
GOAL_TIME = 1.1
GOAL_TOKENS = 16384


def torch_loss(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels)


def fused_loss(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels)


def measure(fn):
    """(median, p20, p80) ms and extra peak MiB of one call (None on the CPU)."""
    fn()
    if ON_GPU:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results", help="folder for the markdown table and PNG")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default 4096..32768)")
    parser.add_argument("--vocab", type=int, default=None, help="default 50257 (CPU 1000)")
    parser.add_argument("--hidden", type=int, default=None, help="default 768 (CPU 32)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd PyTorch")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (automatic on the CPU)")
    args = parser.parse_args(argv)

    quick = args.quick or not ON_GPU
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    tokens_list = ([int(t) for t in args.tokens.split(",")] if args.tokens
                   else ([64] if quick else [4096, 8192, 16384, 32768]))
    vocab = args.vocab or (1000 if quick else 50257)
    hidden_size = args.hidden or (32 if quick else 768)
    providers = {"torch": torch_loss, "fused": fused_loss}
    if args.compile:
        providers["compiled"] = torch.compile(torch_loss, dynamic=False)

    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype).requires_grad_()
    rows = []
    for tokens in tokens_list:
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[torch.rand(tokens, device=device) < 0.3] = -100
        with torch.no_grad():
            ours, ref = fused_loss(hidden, weight, labels).float(), torch_loss(hidden, weight, labels).float()
        if abs(ours - ref) > 1e-2 * abs(ref):
            raise RuntimeError(f"fused and torch losses disagree: {ours.item()} vs {ref.item()}")
        row = {"tokens": tokens, "chunk": default_chunk_size(tokens, vocab)}
        for name, loss_fn in providers.items():
            fn = lambda: torch.autograd.grad(loss_fn(hidden, weight, labels), (hidden, weight))  # noqa: E731
            row[name] = measure(fn)
        rows.append(row)
        print(format_row(row), flush=True)
        del hidden, labels
    write_results(rows, args.out, dtype, vocab, hidden_size, list(providers))


def format_row(row):
    t, f = row["torch"], row["fused"]
    mem = "" if t[3] is None else f"  peak torch {t[3]:8.0f} MiB fused {f[3]:7.0f} MiB ({t[3] / f[3]:4.1f}x less)"
    return (f"tokens={row['tokens']:6d} chunk={row['chunk']:5d}  torch {t[0]:8.3f} ms  fused {f[0]:8.3f} ms  "
            f"fused/torch {f[0] / t[0]:5.2f}x{mem}")


def write_results(rows, out_dir, dtype, vocab, hidden_size, names):
    os.makedirs(out_dir, exist_ok=True)
    tag = device_tag()
    device_name = (torch.cuda.get_device_name() if ON_GPU
                   else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    header = [
        f"# Fused linear cross-entropy benchmark: {tag}",
        "",
        f"- device: {device_name}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}",
        f"- vocab {vocab}, hidden {hidden_size}, dtype {str(dtype).replace('torch.', '')}, 30% ignored labels, "
        "reduction mean; fwd+bwd (grad of hidden and weight)",
        "- times: medians in ms (triton.testing.do_bench on the GPU), [20th, 80th] percentiles; "
        "peak = extra peak memory of one call in MiB",
        "- torch = F.cross_entropy(F.linear(h, W), labels)" + ("; compiled = torch.compile of it" if "compiled" in names else ""),
        f"- goal at {GOAL_TOKENS} tokens: peak torch / fused >= {GOAL_MEMORY:.0f}x and time fused / torch <= {GOAL_TIME}x",
        "",
        "| tokens | chunk | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} peak MiB" for n in names)
        + " | fused / torch time | torch / fused memory |",
        "|---:|---:|" + "---:|" * (2 * len(names) + 2),
    ]
    lines = []
    for row in rows:
        times = " | ".join(f"{row[n][0]:.2f} [{row[n][1]:.2f}, {row[n][2]:.2f}]" for n in names)
        peaks = " | ".join("n/a" if row[n][3] is None else f"{row[n][3]:.0f}" for n in names)
        t_ratio = row["fused"][0] / row["torch"][0]
        m_ratio = None if row["torch"][3] is None else row["torch"][3] / row["fused"][3]
        t_mark = " ✓" if t_ratio <= GOAL_TIME else ""
        m_mark = " ✓" if m_ratio is not None and m_ratio >= GOAL_MEMORY else ""
        m_text = "n/a" if m_ratio is None else f"{m_ratio:.1f}x{m_mark}"
        lines.append(f"| {row['tokens']} | {row['chunk']} | {times} | {peaks} | {t_ratio:.2f}x{t_mark} | {m_text} |")
    summary = [""]
    goal = [r for r in rows if r["tokens"] == GOAL_TOKENS]
    if goal and ON_GPU:
        r = goal[0]
        t_ok = r["fused"][0] / r["torch"][0] <= GOAL_TIME
        m_ok = r["torch"][3] / r["fused"][3] >= GOAL_MEMORY
        summary.append(f"At {GOAL_TOKENS} tokens: memory goal {'holds' if m_ok else 'fails'}, "
                       f"time goal {'holds' if t_ok else 'fails'}.")
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed and peak memory is "
                       "not measured; this only keeps the script from rotting.")
    md_path = os.path.join(out_dir, f"cross_entropy_{tag}.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(header + lines + summary) + "\n")
    print("\n".join(summary))
    print(f"wrote {md_path}")
    plot(rows, names, os.path.join(out_dir, f"cross_entropy_{tag}.png"), tag)


def plot(rows, names, path, tag):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    tokens = [r["tokens"] for r in rows]
    for name in names:
        axes[0].plot(tokens, [r[name][0] for r in rows], marker="o", label=name)
        if rows[0][name][3] is not None:
            axes[1].plot(tokens, [r[name][3] for r in rows], marker="o", label=name)
    for ax, label in zip(axes, ("fwd+bwd time (ms)", "extra peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel(label)
        ax.set_title(f"linear cross-entropy, {label.split(' (')[0]} ({tag})")
        if ax.get_legend_handles_labels()[0]:  # the memory panel is empty on the CPU
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
