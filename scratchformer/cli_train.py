"""`scratchformer pretrain` and `scratchformer finetune`: flags (and a --config file) into the train recipes.

Settings come from three places, later ones winning: the command's defaults, the --config file (.toml / .json,
flat: TrainConfig fields such as `lr` or `decay`, and the task options under their flag names with
underscores, e.g. `block_size`, `lora_r`), then the flags actually given (every flag defaults to None, so an
absent flag never overrides the file). Everything is checked before the run folder is created: a bad value,
a missing or wrong-kind file, a model that is not one, `--resume` with nothing to resume, or a new run over an
old one gives one line on stderr and exit status 2, and leaves --out as it was.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import fields
from pathlib import Path

# Task options and their defaults (the TrainConfig fields are the others a --config file may set).
PRETRAIN_OPTIONS = {"task": None, "data": None, "model": None, "tokenizer": None, "block_size": 128}
FINETUNE_OPTIONS = {"task": None, "model": None, "train": None, "eval": None, "tokenizer": None, "text_field": "text",
                    "label_field": "label", "label_names": None, "max_length": None, "lora_r": None, "lora_alpha": 16.0,
                    "lora_dropout": 0.0, "lora_targets": None}
# Task options that are names or paths; a --config file could give them as numbers or lists.
STRING_OPTIONS = {"task", "data", "model", "tokenizer", "train", "eval", "text_field", "label_field"}
PRETRAIN_TASKS = ("mlm", "causal")
FINETUNE_TASKS = ("classify", "ner", "sft")


def _train_fields() -> set[str]:
    from scratchformer.train.config import TrainConfig

    return {f.name for f in fields(TrainConfig)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _settings(args, options: dict):
    """(TrainConfig, task options, resume) from the --config file with the given flags on top."""
    from scratchformer.train.checkpoints import latest_checkpoint, list_checkpoints
    from scratchformer.train.config import TrainConfig, read_config_file

    train_fields = _train_fields()
    allowed = train_fields | set(options) | {"resume"}
    file = {}
    if args.config:
        raw = read_config_file(args.config)
        if not isinstance(raw, dict):
            raise ValueError(f"--config {args.config}: expected a table of settings")
        file = {str(k).replace("-", "_"): v for k, v in raw.items()}
        unknown = sorted(set(file) - allowed)
        if unknown:
            raise ValueError(f"--config {args.config}: unknown setting(s) {unknown}; known: {', '.join(sorted(allowed))}")
    given = {k: v for k, v in vars(args).items() if k in allowed and v is not None}
    merged = {**file, **given}

    def source(name: str) -> str:
        return _flag(name) if name in given or not args.config else f"--config {args.config} ({name})"

    opts = {k: merged.get(k, default) for k, default in options.items()}
    for name, value in opts.items():
        if name in STRING_OPTIONS and value is not None and not isinstance(value, str):
            raise ValueError(f"{source(name)}: {name} must be a string (got {value!r})")
    if not isinstance(merged.get("resume", False), bool):
        raise ValueError(f"{source('resume')}: resume must be true or false (got {merged['resume']!r})")
    train = {k: merged[k] for k in train_fields if k in merged}
    if "out" not in train:
        raise ValueError("--out is required (or `out` in the --config file)")
    train.setdefault("progress", sys.stderr.isatty())
    if "device" in given or "device" in train:
        train["device"] = _check_device(train["device"])
    try:
        config = TrainConfig(**train)
    except TypeError as err:
        raise ValueError(f"--config {args.config}: a setting has the wrong type ({err})") from None
    except ValueError as err:
        raise ValueError(f"{source(str(err).split()[0])}: {err}") from None

    resume = merged.get("resume", False)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    if resume and latest_checkpoint(out) is None:
        raise ValueError(f"--resume: no checkpoint in {out} to continue from")
    if not resume and out.is_dir():
        old = [p.name for p in (out / "run.json", out / "metrics.jsonl", out / "final") if p.exists()]
        old += [p.name for _, p in list_checkpoints(out)]
        if old:
            raise ValueError(f"--out {out} already holds a run ({', '.join(sorted(old)[:3])}); "
                             "pass --resume to continue it, or choose a new --out")
    return config, opts, resume


def _check_device(device):
    if device is None:
        return None
    from scratchformer.cli import _device

    return _device(argparse.Namespace(device=device))


def _positive(opts: dict, name: str, minimum: int = 1) -> None:
    value = opts[name]
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")


def _require(opts: dict, *names: str) -> None:
    for name in names:
        if opts[name] in (None, ""):
            raise ValueError(f"{_flag(name) if name != 'task' else 'TASK'} is required (or `{name}` in --config)")


def _check_model(spec: str) -> None:
    from scratchformer.train.tasks import PRESETS

    path = Path(spec)
    if spec in PRESETS or (path.is_file() and path.suffix == ".json"):
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"--model {spec}: the folder has no config.json, so it is not a model folder")
        return
    raise ValueError(f"--model {spec}: not a preset ({', '.join(PRESETS)}), a config.json or a model folder")


def _check_folder(flag: str, spec) -> None:
    if spec is not None and not Path(spec).is_dir():
        raise ValueError(f"{flag} {spec}: no such folder")


def _printer(record: dict) -> None:
    """Each logged record as one line on stdout (the Trainer also appends it to metrics.jsonl)."""
    if record.get("event") == "resumed":
        print(f"resumed from {record['checkpoint']} at step {record['step']}", flush=True)
        return
    if record.get("event") in ("stopped", "interrupted"):  # the error line on stderr says it
        return
    parts = [f"step {record.get('step', '?'):>6}"]
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, float):
            text = f"{value:.2e}" if key == "lr" else f"{value:.0f}" if key == "tokens_per_s" else f"{value:.4f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    print("  ".join(parts), flush=True)


def interruption_message(err: KeyboardInterrupt, argv: list[str]) -> str:
    """The line for a Ctrl-C: after a training run saved the step it finished, the command that continues it
    (the same command and flags, with --resume)."""
    from scratchformer.train.interrupt import TrainingInterrupted

    if not isinstance(err, TrainingInterrupted) or err.checkpoint is None:
        return "interrupted"
    command = shlex.join(["scratchformer", *argv, *([] if "--resume" in argv else ["--resume"])])
    return f"interrupted at step {err.step}, saved in {err.checkpoint}; resume with: {command}"


def _report(final: Path, out: Path) -> int:
    if final.is_dir():
        extra = " (with the LoRA adapter)" if (final / "adapter_config.json").is_file() else ""
        print(f"wrote {final}{extra}; metrics in {out / 'metrics.jsonl'}")
    else:
        print(f"stopped before the last step; checkpoints in {out}")
    return 0


# ---- pretrain ---------------------------------------------------------------------------------------------


def cmd_pretrain(args) -> int:
    config, opts, resume = _settings(args, PRETRAIN_OPTIONS)
    _require(opts, "task", "data", "model")
    if opts["task"] not in PRETRAIN_TASKS:
        raise ValueError(f"TASK {opts['task']!r}: expected one of {', '.join(PRETRAIN_TASKS)}")
    _positive(opts, "block_size", 3 if opts["task"] == "mlm" else 2)
    data = Path(opts["data"])
    if not (data / "train.json").is_file():
        raise ValueError(f"--data {data}: not a prepared token folder (no train.json); "
                         "make one with scratchformer.tokenize.prepare_corpus")
    _check_folder("--tokenizer", opts["tokenizer"])
    _check_model(opts["model"])

    from scratchformer.train.recipes import pretrain

    final = pretrain(opts["task"], data, opts["model"], config, tokenizer=opts["tokenizer"],
                     block_size=opts["block_size"], resume=resume, callbacks=[_printer])
    return _report(final, Path(config.out))


# ---- finetune ---------------------------------------------------------------------------------------------


def _lora(opts: dict):
    from scratchformer.train.recipes import LoRASettings

    if opts["lora_r"] is None:
        return None
    _positive(opts, "lora_r")
    alpha, dropout = opts["lora_alpha"], opts["lora_dropout"]
    if not _is_number(alpha) or alpha <= 0:
        raise ValueError(f"--lora-alpha must be > 0, got {alpha!r}")
    if not _is_number(dropout):
        raise ValueError(f"--lora-dropout must be a number in [0, 1), got {dropout!r}")
    targets = opts["lora_targets"]
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            raise ValueError("--lora-targets: give module names separated by commas, e.g. query,value")
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ValueError(f"--lora-targets: module names separated by commas, or a list of them, got {targets!r}")
    return LoRASettings(r=opts["lora_r"], alpha=float(alpha), dropout=float(dropout), targets=targets)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label_names(value) -> list[str] | None:
    """--label-names "O,B-PER,I-PER" (or a list of strings in the --config file) -> the names in id order."""
    if value is None:
        return None
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"--label-names: give the label names in id order, separated by commas (e.g. O,B-PER,I-PER), "
                         f"got {value!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--label-names: each name once, got {repeated} more than once")
    return names


def _check_file(flag: str, path, task: str) -> None:
    suffixes = (".jsonl", ".csv") if task == "classify" else (".jsonl",) if task == "sft" else (".jsonl", ".json",
                                                                                                  ".csv", ".txt")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{flag} {p}: no such file")
    if task != "ner" and p.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {p}: a {task} data set is a {' or '.join(suffixes)} file, not {p.suffix or 'a file without a suffix'}")


def cmd_finetune(args) -> int:
    config, opts, resume = _settings(args, FINETUNE_OPTIONS)
    _require(opts, "task", "model", "train")
    task = opts["task"]
    if task not in FINETUNE_TASKS:
        raise ValueError(f"TASK {task!r}: expected one of {', '.join(FINETUNE_TASKS)}")
    _positive(opts, "max_length")
    label_names = _label_names(opts["label_names"])
    lora = _lora(opts)
    _check_file("--train", opts["train"], task)
    if opts["eval"] is not None:
        _check_file("--eval", opts["eval"], task)
    _check_folder("--tokenizer", opts["tokenizer"])
    _check_model(opts["model"])

    from scratchformer.train.recipes import finetune

    final = finetune(task, opts["model"], opts["train"], config, eval_file=opts["eval"], tokenizer=opts["tokenizer"],
                     lora=lora, resume=resume, max_length=opts["max_length"], text_field=opts["text_field"],
                     label_field=opts["label_field"], label_names=label_names, callbacks=[_printer])
    return _report(final, Path(config.out))


# ---- the parsers ------------------------------------------------------------------------------------------


def _add_run_flags(p) -> None:
    g = p.add_argument_group("run (TrainConfig; a flag overrides the --config file)")
    g.add_argument("--config", default=None, metavar="RUN.toml|RUN.json",
                   help="TrainConfig fields and task options, flat (e.g. lr = 3e-4, block_size = 256)")
    g.add_argument("--out", default=None, metavar="DIR", help="the run folder: checkpoints, metrics.jsonl, final/")
    g.add_argument("--max-steps", type=int, default=None, metavar="N", help="optimizer steps (default: 100)")
    g.add_argument("--batch-size", type=int, default=None, metavar="N", help="micro-batch size (default: 8)")
    g.add_argument("--grad-accum", type=int, default=None, metavar="N",
                   help="micro-batches per optimizer step (default: 1)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 3e-4)")
    g.add_argument("--warmup-steps", type=int, default=None, metavar="N", help="linear warmup (default: 0)")
    g.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="fp32, or autocast bf16 / fp16 with loss scaling (default: fp32)")
    g.add_argument("--eval-every", type=int, default=None, metavar="N", help="evaluate every N steps (0: at the end)")
    g.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="checkpoint every N steps (0: at the end)")
    g.add_argument("--seed", type=int, default=None, metavar="N", help="seed of the weights and data order (default: 0)")
    g.add_argument("--resume", action="store_true", default=None,
                   help="continue from the latest checkpoint in --out (same settings)")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when there is one, else cpu)")


def add_train_commands(sub, formatter_class, example) -> None:
    """Register `pretrain` and `finetune` on the subparsers of `scratchformer`'s parser."""
    pre = sub.add_parser(
        "pretrain", help="pretrain a BERT (mlm) or GPT-2 (causal) model on a prepared token folder",
        formatter_class=formatter_class,
        description="Pretrain TASK (mlm: BERT masked LM, causal: GPT-2 next-token LM) on a token folder made by\n"
                    "scratchformer.tokenize.prepare_corpus (its val split, if any, is evaluated). --model is a\n"
                    "preset (gpt2-tiny, bert-tiny, gpt2, bert-base: fresh weights sized to the tokenizer), a\n"
                    "config.json (fresh weights) or an HF model folder (continued pretraining). The run folder gets\n"
                    "run.json, metrics.jsonl, checkpoint-NNNNNN/ folders and final/, an HF checkpoint.",
        epilog=example("scratchformer pretrain causal --data tokens/ --model gpt2-tiny --block-size 128 \\\n"
                       "      --out runs/gpt --max-steps 2000 --batch-size 16 --lr 6e-4 --warmup-steps 100 \\\n"
                       "      --eval-every 200 --save-every 500\n"
                       "  scratchformer pretrain causal --data tokens/ --model gpt2-tiny --out runs/gpt --max-steps 4000 "
                       "--resume"))
    pre.add_argument("task", nargs="?", default=None, metavar="TASK", help="mlm or causal")
    pre.add_argument("--data", default=None, metavar="TOKEN_FOLDER", help="a prepared token folder (train.json, ...)")
    pre.add_argument("--model", default=None, metavar="PRESET|config.json|FOLDER")
    pre.add_argument("--tokenizer", default=None, metavar="DIR",
                     help="tokenizer folder (default: the token folder's own, else the model folder's)")
    pre.add_argument("--block-size", type=int, default=None, metavar="N", help="tokens per row (default: 128)")
    _add_run_flags(pre)
    pre.set_defaults(run=cmd_pretrain)

    fine = sub.add_parser(
        "finetune", help="fine-tune for classify / ner / sft, fully or with LoRA",
        formatter_class=formatter_class,
        description="Fine-tune --model for TASK: classify (.jsonl/.csv with text and label fields), ner (words and\n"
                    "BIO tags), sft (prompt / response pairs, loss on the responses). The head is made for the\n"
                    "label set of --train (saved as id2label); a checkpoint whose head has another label set is\n"
                    "refused. --lora-r R trains LoRA adapters (plus the head) instead of every weight; final/\n"
                    "then also holds a PEFT adapter (fold it in with `scratchformer merge`).",
        epilog=example("scratchformer finetune classify --model path/to/bert --train train.jsonl --eval dev.jsonl \\\n"
                       "      --lora-r 8 --lora-alpha 16 --lora-targets query,value --max-length 128 \\\n"
                       "      --out runs/cls --max-steps 500 --lr 5e-4 --batch-size 32 --eval-every 100"))
    fine.add_argument("task", nargs="?", default=None, metavar="TASK", help="classify, ner or sft")
    fine.add_argument("--model", default=None, metavar="FOLDER|PRESET|config.json",
                      help="usually an HF model folder (its tokenizer is used)")
    fine.add_argument("--train", default=None, metavar="FILE", help="training examples")
    fine.add_argument("--eval", default=None, metavar="FILE", help="held-out examples, evaluated during the run")
    fine.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: the model's)")
    fine.add_argument("--text-field", default=None, help="classify: the text field (default: text)")
    fine.add_argument("--label-field", default=None, help="classify: the label field (default: label)")
    fine.add_argument("--label-names", default=None, metavar="O,B-PER,...",
                      help="the label set in id order; names integer labels or NER tags (default: the names in "
                           "--train; integer NER tags: the model's id2label)")
    fine.add_argument("--max-length", type=int, default=None, metavar="N", help="truncate examples to N tokens")
    lora = fine.add_argument_group("LoRA (absent --lora-r: full fine-tuning)")
    lora.add_argument("--lora-r", type=int, default=None, metavar="R", help="adapter rank")
    lora.add_argument("--lora-alpha", type=float, default=None, help="scaling numerator (default: 16)")
    lora.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter input (default: 0)")
    lora.add_argument("--lora-targets", default=None, metavar="query,value",
                      help="module names, comma-separated (default: PEFT's for the family)")
    _add_run_flags(fine)
    fine.set_defaults(run=cmd_finetune)
