"""Benchmark: one training step, ours against `transformers` (+ `peft`) with torch.optim.AdamW, side by side.

Cases (the same model and batch in both libraries; ours is loaded from the checkpoint HF wrote):
    gpt2 causal   GPT-2 small (12 layers, d=768, 50257 tokens), causal-LM pretraining, every weight trained
    bert LoRA     BERT-base sequence classification (2 labels), LoRA r=8 on query,value + the classifier
A step is what a training loop does per optimizer update: forward (bf16 autocast on CUDA, fp32 on a CPU),
backward, global-norm clipping to 1.0, AdamW (weight decay off for biases / LayerNorms), the LR scheduler,
zero_grad. Ours is the Trainer's own step (scratchformer.train.Trainer: our model, our fused AdamW, our
clipping); theirs is the usual PyTorch loop around the transformers model (peft's get_peft_model for LoRA).

Reported: tokens/s from the median of several timed steps after warm-up (the two alternate step by step, so
drift on the machine hits both equally), peak memory of a step (CUDA: max_memory_allocated; CPU: peak
resident set minus the resident set before the model was loaded), each measured in a fresh process holding
one model (after one step of a tiny model of the same kind, so lazily imported code does not count),
so it counts weights, gradients, optimizer state and activations; on CUDA also MFU (PaLM's
6N + 12LHS FLOPs per token over the GPU's bf16 peak; for LoRA the frozen weights need no weight gradients,
so the same convention overstates the work: compare the two columns, not against 100%).

--cuda-graphs runs ours with TrainConfig(cuda_graphs=True): each step replayed from one CUDA graph (after the
Trainer's eager warm-up steps and the capture, done before timing).

Sizes: on a GPU the real shapes above (GPT-2 at 8 x 1024 tokens, BERT at 32 x 128). On a CPU, and with
--quick anywhere, the models shrink (2 layers, d=256, 8192 tokens) so the whole run takes about a minute on a
2-core CPU. --full runs the real widths on a CPU too; --batch / --seq override every case's batch shape (BERT
has 512 positions). Writes benchmarks/results/train_step_<device>[_full][_b<batch>][_s<seq>].md.

How long `--full` takes on a CPU, and what fits (measured 2026-12-02 on a 2-core, 24 GB machine, fp32): the
BERT case at its real 32 x 128 ran in about 8 minutes beside another job (a step: 20 s ours, 26 s transformers
+ peft). The GPT-2 case at 8 x 1024 does not fit in 24 GB: transformers' eager attention and logits took 9.2
GB at 2 x 1024 (ours 4.0 GB), so 8 x 1024 needs some 36 GB and was killed for memory. `--case gpt2 --batch 2`
runs in about 12 minutes (a step: 27 s ours, 44 s transformers). `--steps 3 --warmup 1` shortens any run.

    PYTHONPATH=. python benchmarks/train_step.py [--quick | --full] [--case gpt2|bert] [--batch B] [--seq S]
                                                 [--device cpu|cuda] [--steps 7] [--warmup 2] [--cuda-graphs]
                                                 [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real paths: Triton on CUDA, torch's fused kernels on a CPU

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import device_info  # noqa: E402

HERE = Path(__file__).resolve()
LORA = dict(r=8, alpha=16, targets=["query", "value"])


def cases(full: bool) -> list[dict]:
    """Model shapes and batches: the real GPT-2 small / BERT-base (full), or small stand-ins."""
    if full:
        return [
            dict(name="gpt2 causal", kind="gpt2", layers=12, hidden=768, heads=12, vocab=50257, batch=8, seq=1024),
            dict(name="bert LoRA", kind="bert", layers=12, hidden=768, heads=12, vocab=30522, batch=32, seq=128),
        ]
    return [
        dict(name="gpt2 causal", kind="gpt2", layers=2, hidden=256, heads=4, vocab=8192, batch=4, seq=128),
        dict(name="bert LoRA", kind="bert", layers=2, hidden=256, heads=4, vocab=8192, batch=8, seq=128),
    ]


def write_checkpoint(case: dict, folder: str) -> None:
    import transformers

    torch.manual_seed(0)
    if case["kind"] == "gpt2":
        config = transformers.GPT2Config(vocab_size=case["vocab"], n_embd=case["hidden"], n_layer=case["layers"],
                                         n_head=case["heads"], n_positions=max(case["seq"], 256),
                                         bos_token_id=case["vocab"] - 1, eos_token_id=case["vocab"] - 1)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=case["vocab"], hidden_size=case["hidden"],
                                         num_hidden_layers=case["layers"], num_attention_heads=case["heads"],
                                         intermediate_size=4 * case["hidden"], num_labels=2)
        model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(folder)


def make_batch(case: dict, device: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, case["vocab"], (case["batch"], case["seq"]), generator=g)
    labels = ids.clone() if case["kind"] == "gpt2" else torch.randint(0, 2, (case["batch"],), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def _autocast(device: str, precision: str):
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def ours_step(case: dict, folder: str, device: str, precision: str, workdir: str, cuda_graphs: bool = False):
    """(model, step function): the Trainer's step on our model, our AdamW and our clipping (replayed from a CUDA
    graph with cuda_graphs: the warm-up steps and the capture happen here)."""
    from scratchformer.engine.lora import apply_lora
    from scratchformer.engine.models import CausalLM, SequenceClassifier
    from scratchformer.train import TrainConfig, Trainer

    cls = CausalLM if case["kind"] == "gpt2" else SequenceClassifier
    model = cls.from_pretrained(folder, device=device)
    if case["kind"] == "bert":
        apply_lora(model, r=LORA["r"], alpha=LORA["alpha"], target_modules=LORA["targets"],
                   modules_to_save=["classifier"])
    config = TrainConfig(out=workdir, max_steps=10**6, batch_size=case["batch"], lr=1e-4, precision=precision,
                         device=device, progress=False, cuda_graphs=cuda_graphs)
    batch = make_batch(case, device)
    trainer = Trainer(model, config, train_data=[batch])
    trainer._setup()

    def step():
        trainer.run_step([batch])

    if cuda_graphs:
        for _ in range(trainer.run_step.warmup_steps + 1):
            step()
    return model, step


def hf_step(case: dict, folder: str, device: str, precision: str):
    """(model, step function): the plain PyTorch loop around transformers (+ peft) and torch.optim.AdamW."""
    import transformers

    from scratchformer.train.trainer import parameter_groups

    if case["kind"] == "gpt2":
        model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    else:
        import peft

        model = transformers.BertForSequenceClassification.from_pretrained(folder)
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=LORA["r"],
                                                           lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                           target_modules=LORA["targets"]))
    model.to(device).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    batch = make_batch(case, device)

    def step():
        with _autocast(device, precision):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _provider_step(spec: dict, case: dict, folder: str, work: str):
    if spec["provider"] == "ours":
        return ours_step(case, folder, spec["device"], spec["precision"], work, spec.get("cuda_graphs", False))[1]
    return hf_step(case, folder, spec["device"], spec["precision"])[1]


def _warm_up_code(spec: dict) -> None:
    """One step of a tiny model of the same kind through the same provider, then freed: the lazily imported
    modules (transformers imports its model code on first use, about 170 MiB resident) and one-time set-up
    are in place before the baseline, for both providers alike."""
    tiny = {**spec["case"], "layers": 1, "hidden": 16, "heads": 2, "vocab": 64, "batch": 1, "seq": 8}
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as work:
        write_checkpoint(tiny, folder)
        _provider_step(spec, tiny, folder, work)()
    gc.collect()


def child(spec: dict) -> None:
    """One provider alone in this process: load, warm up, run a few steps; print the peak memory as JSON."""
    case, device = spec["case"], spec["device"]
    _warm_up_code(spec)
    make_batch(case, device)
    _sync(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss()
        _reset_peak_rss()
    with tempfile.TemporaryDirectory() as work:
        step = _provider_step(spec, case, spec["folder"], work)
        for _ in range(3):
            step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else _peak_rss() - before
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(spec: dict) -> float | None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parents[1]), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, str(HERE), "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        print(f"  memory run failed ({spec['provider']}): {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


def bench(case: dict, device: str, precision: str, steps: int, warmup: int, cuda_graphs: bool = False) -> dict:
    from scratchformer.train.trainer import model_flops_utilisation

    tokens = case["batch"] * case["seq"]
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as work:
        write_checkpoint(case, folder)
        ours, step_ours = ours_step(case, folder, device, precision, work, cuda_graphs)
        _, step_hf = hf_step(case, folder, device, precision)
        for _ in range(warmup):
            step_ours()
            step_hf()
        times = {"ours": [], "hf": []}
        for _ in range(steps):  # alternate, one step each, so both see the same machine state
            for name, fn in (("ours", step_ours), ("hf", step_hf)):
                _sync(device)
                start = time.perf_counter()
                fn()
                _sync(device)
                times[name].append(time.perf_counter() - start)
        del step_ours, step_hf
        if device == "cuda":
            torch.cuda.empty_cache()
        mem = {p: peak_memory(dict(case=case, folder=folder, device=device, precision=precision, provider=p,
                                   cuda_graphs=cuda_graphs))
               for p in ("ours", "hf")}
    row = {"case": case, "tokens": tokens}
    for p in ("ours", "hf"):
        median = statistics.median(times[p])
        row[p] = {"ms": median * 1e3, "tok_s": tokens / median, "mem_mb": mem[p]}
        if device == "cuda":
            row[p]["mfu"] = model_flops_utilisation(ours, tokens / median, case["seq"])
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    row["params"] = sum(p.numel() for p in ours.parameters())
    row["trainable"] = trainable
    return row


def _fmt_mem(mb):
    return "n/a" if mb is None else f"{mb:.0f}"


def table(rows: list[dict], device: str) -> str:
    mfu = device == "cuda"
    head = ("| case | params (trainable) | batch x seq | ours ms | HF ms | ours tok/s | HF tok/s | ours / HF tok/s "
            "| ours peak MiB | HF peak MiB | ours / HF memory |" + (" ours MFU | HF MFU |" if mfu else ""))
    lines = [head, "|" + "---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        c, o, h = r["case"], r["ours"], r["hf"]
        mem_ratio = "n/a" if not (o["mem_mb"] and h["mem_mb"]) else f"{o['mem_mb'] / h['mem_mb']:.2f}"
        line = (f"| {c['name']} ({c['layers']}L, d={c['hidden']}, vocab {c['vocab']}) | {r['params'] / 1e6:.1f}M "
                f"({r['trainable'] / 1e6:.2f}M) | {c['batch']} x {c['seq']} | {o['ms']:.1f} | {h['ms']:.1f} | "
                f"{o['tok_s']:.0f} | {h['tok_s']:.0f} | {o['tok_s'] / h['tok_s']:.2f} | {_fmt_mem(o['mem_mb'])} | "
                f"{_fmt_mem(h['mem_mb'])} | {mem_ratio} |")
        if mfu:
            line += " " + " | ".join("n/a" if x.get("mfu") is None else f"{100 * x['mfu']:.1f}%" for x in (o, h)) + " |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small models even on a GPU")
    size.add_argument("--full", action="store_true",
                      help="the real GPT-2 small / BERT-base widths even on a CPU (time and memory: the docstring)")
    parser.add_argument("--case", default="all", choices=["all", "gpt2", "bert"],
                        help="run one case only (e.g. GPT-2 with a smaller --batch, BERT at its own)")
    parser.add_argument("--batch", type=int, default=None, help="rows per batch in every case (default: the case's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row in every case (default: the case's)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per library (default: 7, CPU: 5)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="default: bf16 autocast on CUDA, fp32 on a CPU")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="ours with TrainConfig(cuda_graphs=True): each step replayed from a CUDA graph")
    parser.add_argument("--out", default=str(HERE.parent / "results"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.cuda_graphs and args.device != "cuda":
        parser.error("--cuda-graphs: CUDA graphs need --device cuda")
    for name in ("batch", "seq", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.seq is not None and args.seq > 512 and args.case != "gpt2":
        parser.error(f"--seq {args.seq}: BERT has 512 positions (--case gpt2 takes longer rows)")
    return args


def plan(args: argparse.Namespace) -> tuple[list[dict], str]:
    """(the cases to run with the --batch / --seq overrides applied, the results file's tag)."""
    full = args.full or (args.device == "cuda" and not args.quick)
    overrides = {k: v for k, v in (("batch", args.batch), ("seq", args.seq)) if v is not None}
    chosen = [{**case, **overrides} for case in cases(full) if getattr(args, "case", "all") in ("all", case["kind"])]
    tag = device_info(args.device)["tag"]
    if args.device == "cuda" and not full:
        tag += "_quick"
    elif args.device != "cuda" and full:
        tag += "_full"  # the CPU's default is the small models: the real widths get a file of their own
    if getattr(args, "case", "all") != "all":
        tag += f"_{args.case}"
    tag += "".join(f"_{k[0]}{v}" for k, v in overrides.items())  # e.g. _b2_s256
    if getattr(args, "cuda_graphs", False):
        tag += "_graphs"
    return chosen, tag


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    chosen, tag = plan(args)
    precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    steps = args.steps or (7 if args.device == "cuda" else 5)
    rows = []
    for case in chosen:
        print(f"{case['name']}: {case['layers']} layers, d={case['hidden']}, batch {case['batch']} x {case['seq']}",
              flush=True)
        rows.append(bench(case, args.device, precision, steps, args.warmup, args.cuda_graphs))

    import peft
    import transformers
    import triton

    name = (torch.cuda.get_device_name() if args.device == "cuda"
            else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    header = (f"# Training step, ours vs transformers ({tag})\n\n"
              f"Device: {name}. Date: {datetime.date.today()}. torch {torch.__version__}, triton {triton.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}. Precision: {precision}"
              f"{' autocast' if precision != 'fp32' else ''}; medians of {steps} alternating timed steps after "
              f"{args.warmup} warm-up steps. Ours: the Trainer's step (our model, fused AdamW, clipping"
              f"{'; replayed from a CUDA graph' if args.cuda_graphs else ''}); HF: the "
              f"model (+ peft LoRA) with torch.optim.AdamW (default options), torch clip_grad_norm_. Peak memory: "
              f"{'max_memory_allocated' if args.device == 'cuda' else 'peak RSS minus RSS before loading'} in a "
              f"process holding one model, after one step of a tiny model of the same kind (so lazily imported "
              f"code does not count).\n\n")
    text = header + table(rows, args.device)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_step_{tag}.md").write_text(text)
    print(f"wrote {out / f'train_step_{tag}.md'}")


if __name__ == "__main__":
    main()
