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
import os

import torch

if not torch.cuda.is_available():  # the kernels run under Triton's interpreter; must precede their import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import Benchmark  # noqa: E402
from scratchformer.kernels import default_chunk_size, linear_cross_entropy  # noqa: E402

ON_GPU = torch.cuda.is_available()
GOAL_MEMORY = 4.0
GOAL_TIME = 1.1
GOAL_TOKENS = 16384


def torch_loss(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight), labels)


def fused_loss(hidden, weight, labels):
    return linear_cross_entropy(hidden, weight, labels)


def build_benchmark(device, dtype, vocab, hidden_size, compiled):
    """The harness benchmark: cases {tokens, chunk}; providers torch, fused (and compiled); peak memory."""
    weight = (torch.randn(vocab, hidden_size, device=device) / hidden_size**0.5).to(dtype).requires_grad_()

    def setup(case):
        tokens = case["tokens"]
        hidden = torch.randn(tokens, hidden_size, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[torch.rand(tokens, device=device) < 0.3] = -100
        with torch.no_grad():
            ours, ref = fused_loss(hidden, weight, labels).float(), torch_loss(hidden, weight, labels).float()
        if abs(ours - ref) > 1e-2 * abs(ref):
            raise RuntimeError(f"fused and torch losses disagree: {ours.item()} vs {ref.item()}")
        return {"hidden": hidden, "weight": weight, "labels": labels}

    bench = Benchmark(
        "cross_entropy", title="Fused linear cross-entropy benchmark", baseline="torch", setup=setup, memory=True,
        warmup=1, repeats=3, gpu_timer="do_bench", x="tokens", log_x=True,
        notes=[f"vocab {vocab}, hidden {hidden_size}, dtype {str(dtype).replace('torch.', '')}, 30% ignored "
               "labels, reduction mean; fwd+bwd (grad of hidden and weight)",
               "peak = extra peak memory of one call in MiB (n/a on the CPU)",
               "torch = F.cross_entropy(F.linear(h, W), labels)" + ("; compiled = torch.compile of it"
                                                                     if compiled else ""),
               f"goal at {GOAL_TOKENS} tokens: peak torch / fused >= {GOAL_MEMORY:.0f}x and "
               f"time fused / torch <= {GOAL_TIME}x"])

    def provider(name, loss_fn):
        @bench.provider(name)
        def make(case):
            hidden, weight, labels = case["hidden"], case["weight"], case["labels"]
            return lambda: torch.autograd.grad(loss_fn(hidden, weight, labels), (hidden, weight))

    provider("torch", torch_loss)
    provider("fused", fused_loss)
    if compiled:
        provider("compiled", torch.compile(torch_loss, dynamic=False))
    return bench


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

    bench = build_benchmark(device, dtype, vocab, hidden_size, args.compile)
    cases = [{"tokens": tokens, "chunk": default_chunk_size(tokens, vocab)} for tokens in tokens_list]
    results = bench.run(cases)
    print(bench.table(results))
    bench.write(results, args.out, summary=summarize(results))


def summarize(results):
    """Per case: fused / torch time and torch / fused peak memory (✓ where the goal's bound holds); the goal."""
    def get(case, name):
        return next((r for r in results if r.case == case and r.provider == name and r.ok), None)

    summary = ["| tokens | fused / torch time | torch / fused memory |", "|---:|---:|---:|"]
    verdict = []
    for case in dict.fromkeys(tuple(r.case.items()) for r in results):
        case = dict(case)
        t, f = get(case, "torch"), get(case, "fused")
        if t is None or f is None:
            continue
        t_ratio = f.median / t.median
        m_ratio = None if t.peak is None else t.peak / f.peak
        m_text = "n/a" if m_ratio is None else f"{m_ratio:.1f}x" + (" ✓" if m_ratio >= GOAL_MEMORY else "")
        summary.append(f"| {case['tokens']} | {t_ratio:.2f}x{' ✓' if t_ratio <= GOAL_TIME else ''} | {m_text} |")
        if case["tokens"] == GOAL_TOKENS and m_ratio is not None:
            verdict.append(f"At {GOAL_TOKENS} tokens: memory goal {'holds' if m_ratio >= GOAL_MEMORY else 'fails'}, "
                           f"time goal {'holds' if t_ratio <= GOAL_TIME else 'fails'}.")
    summary += [""] + verdict
    if not ON_GPU:
        summary.append("CPU run under the Triton interpreter: times say nothing about GPU speed and peak memory is "
                       "not measured; this only keeps the script from rotting.")
    print("\n".join(summary))
    return summary


if __name__ == "__main__":
    main()
