"""Our engine against `transformers` on the same model: forward and forward+backward step time.

Models: a MiniLM-sized BERT (the real all-MiniLM-L6-v2 shape) and a GPT-2-small-shaped random model, batch 8 x
128 tokens. Both libraries get identical weights (ours are loaded from the checkpoint HF wrote) and the same
inputs; timings alternate between the two, so drift on the machine hits both equally. Reports medians and
the ratio ours / HF (goal: at most 1.0).

Before anything is timed, both models' logits on the timed batch must agree (max |ours - HF| / max |HF|
<= 1e-4 in fp32 on the CPU; 5e-3 on CUDA, where the triton path's kernels multiply in TF32 as the engine tests
allow), so a fast wrong model can never be reported. The results go to `results/engine_<device>.md`, the
device named by `benchmarks/harness.py`'s `device_info` (`CPU`, `H100`, ...), like every other benchmark;
`--quick` (tiny sizes, only checks that the script works) writes nothing unless `--out` is given.

    PYTHONPATH=. python benchmarks/engine.py [--quick] [--device cpu|cuda] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import device_info  # noqa: E402
from scratchformer import CausalLM, MaskedLM  # noqa: E402

# How far our logits may be from HF's before the benchmark refuses to time: fp32 on the CPU computes the same
# sums in a different order (measured ~1e-6); on CUDA our triton kernels use TF32 dots (the tests' 5e-3).
LOGITS_TOL = {"cpu": 1e-4, "cuda": 5e-3}


def _models(kind: str, quick: bool):
    import transformers

    if kind == "bert":
        config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                         intermediate_size=1536, max_position_embeddings=512)
        return transformers.BertForMaskedLM(config), MaskedLM, config.vocab_size
    layers = 2 if quick else 12
    config = transformers.GPT2Config(n_embd=768, n_layer=layers, n_head=12, n_positions=1024)
    return transformers.GPT2LMHeadModel(config), CausalLM, config.vocab_size


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def check_same_logits(kind: str, ours, hf, ids, mask, tol: float) -> float:
    """Raise SystemExit unless our logits `[batch, seq, vocab]` equal HF's within `tol` (max abs error over the
    largest HF logit); returns that error. Both models run in eval mode; timing later runs them in train mode
    with every dropout at zero, which computes the same function."""
    ours.eval()
    hf.eval()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits.double()
        want = hf(input_ids=ids, attention_mask=mask).logits.double()
    err = ((got - want).abs().max() / want.abs().max()).item()
    if not err <= tol:  # also catches NaN
        raise SystemExit(f"{kind}: our logits differ from transformers' by {err:.2e} (> {tol:g}); not timing a wrong model")
    print(f"{kind}: logits match transformers (rel. err {err:.1e} <= {tol:g})")
    return err


def bench(kind: str, device: str, batch: int, seq: int, reps: int, quick: bool, dtype=torch.float32):
    torch.manual_seed(0)
    hf, ours_cls, vocab = _models(kind, quick)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = ours_cls.from_pretrained(tmp, device=device, dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0,
                                        embedding_dropout=0.0)
    hf = hf.to(device=device, dtype=dtype)
    hf.config.hidden_dropout_prob = hf.config.attention_probs_dropout_prob = 0.0
    for m in hf.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, vocab, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    check_same_logits(kind, ours, hf, ids, mask, LOGITS_TOL["cuda" if device == "cuda" else "cpu"])

    def fwd(model, hf_style):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask) if hf_style else model(ids, attention_mask=mask)

    def step(model, hf_style):
        out = model(input_ids=ids, attention_mask=mask, labels=labels) if hf_style else model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    rows = []
    for phase, fn in [("forward", fwd), ("forward+backward", step)]:
        for m, hf_style in [(ours, False), (hf, True)]:  # warm-up
            m.train(phase != "forward")
            fn(m, hf_style)
        t_ours, t_hf = [], []
        for _ in range(reps):  # alternate, one call each, so both see the same machine state
            ours.train(phase != "forward")
            hf.train(phase != "forward")
            t_ours += _time(lambda: fn(ours, False), device, 1)
            t_hf += _time(lambda: fn(hf, True), device, 1)
        mo, mh = statistics.median(t_ours), statistics.median(t_hf)
        rows.append((kind, phase, mo * 1e3, mh * 1e3, mo / mh))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny run that only checks the script works")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results; with --quick: none)")
    args = parser.parse_args(argv)
    batch, seq = (2, 32) if args.quick else (8, 128)
    reps = args.reps or (2 if args.quick else 7)
    dtype = torch.float32
    rows = []
    for kind in ("bert", "gpt2"):
        rows += bench(kind, args.device, batch, seq, reps, args.quick, dtype)

    info = device_info(args.device)
    threads = "" if args.device == "cuda" else f", {torch.get_num_threads()} PyTorch threads"
    header = (f"# Engine vs transformers, batch {batch} x {seq} tokens, {str(dtype).removeprefix('torch.')}\n\n"
              f"Device: {info['name']}{threads}. Date: {info['date']}. Python {info['python']}, torch {info['torch']}, "
              f"transformers {__import__('transformers').__version__}, Triton {info['triton']}. "
              f"Medians of {reps} alternating runs; logits checked against transformers before timing.\n\n")
    table = "| model | phase | ours (ms) | transformers (ms) | ours / HF |\n|---|---|---:|---:|---:|\n"
    table += "".join(f"| {k} | {p} | {o:.1f} | {h:.1f} | {r:.2f} |\n" for k, p, o, h, r in rows)
    print(header + table)
    if args.quick and args.out is None:
        return  # toy sizes: never overwrite the committed results by default
    out = Path(args.out or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine_{info['tag']}{'_quick' if args.quick else ''}.md"
    path.write_text(header + table)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
