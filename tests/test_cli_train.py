"""`scratchformer pretrain` / `scratchformer finetune`: --help, tiny real runs (a token folder made by
prepare_corpus, a jsonl classification set), --config with a flag on top, --resume, and every kind of bad input
giving exit status 2, one line on stderr and an untouched run folder."""

import json
import math
from pathlib import Path

import pytest
import torch

from scratchformer.cli import main
from scratchformer.engine.models import CausalLM
from scratchformer.tokenize import prepare_corpus, train_tokenizer

WORDS = ("alpha beta gamma delta river stone light dark quick slow cat dog bird tree house road "
         "red green blue small large old new").split()


def _sentences(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """A prepared token folder (train + val) with its byte-level BPE tokenizer inside."""
    root = tmp_path_factory.mktemp("tokens")
    docs = _sentences(120)
    (root / "corpus.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    tok = train_tokenizer(docs, kind="bpe", vocab_size=300, min_frequency=1)
    prepare_corpus([root / "corpus.txt"], tok, root / "tokens", val_fraction=0.2, show_progress=False)
    return root / "tokens"


@pytest.fixture(scope="module")
def cls_data(tmp_path_factory):
    """(train.jsonl, dev.jsonl, a WordPiece tokenizer folder) for a two-label classification task."""
    root = tmp_path_factory.mktemp("cls")
    pos, neg = "good great fine happy bright".split(), "bad awful poor sad grim".split()
    rows = [{"text": f"the {w} {x} day", "label": "pos" if i % 2 == 0 else "neg"}
            for i, (w, x) in enumerate(zip((pos + neg) * 4, (pos[::-1] + neg[::-1]) * 4))]
    rows = [{"text": r["text"], "label": "pos" if r["text"].split()[1] in pos else "neg"} for r in rows]
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows[32:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    tok = train_tokenizer([r["text"] for r in rows] * 3, kind="wordpiece", vocab_size=80, min_frequency=1)
    tok.save_pretrained(root / "tok")
    return root / "train.jsonl", root / "dev.jsonl", root / "tok"


FAST = ["--batch-size", "4", "--lr", "1e-3", "--device", "cpu"]


def run(argv, capsys):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pretrain_args(tokens, out, *extra):
    return ["pretrain", "causal", "--data", tokens, "--model", "gpt2-tiny", "--block-size", "16", "--out", out,
            *FAST, *extra]


def finetune_args(cls_data, out, *extra):
    train, dev, tok = cls_data
    return ["finetune", "classify", "--model", "bert-tiny", "--tokenizer", tok, "--train", train, "--eval", dev,
            "--max-length", "16", "--out", out, *FAST, *extra]


@pytest.fixture(scope="module")
def classifier(cls_data, tmp_path_factory):
    """A LoRA classification run (labels neg/pos): (run folder, its exit status)."""
    out = tmp_path_factory.mktemp("clsrun") / "run"
    code = main([str(a) for a in finetune_args(cls_data, out, "--max-steps", "3", "--lora-r", "4",
                                              "--lora-targets", "query,value")])
    return out, code


# ---- --help ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_help_has_an_example(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "example:" in out and f"scratchformer {command} " in out.split("example:")[1]
    for flag in ("--out", "--max-steps", "--resume", "--config", "--precision", "--grad-accum"):
        assert flag in out


def test_top_level_help_lists_the_commands(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "pretrain" in out and "finetune" in out


# ---- real runs ---------------------------------------------------------------------------------------------


def test_pretrain_causal_end_to_end(tokens, tmp_path, capsys):
    out = tmp_path / "gpt"
    code, stdout, err = run(pretrain_args(tokens, out, "--max-steps", "3"), capsys)
    assert code == 0, err
    assert f"wrote {out / 'final'}" in stdout and "step      3" in stdout
    model = CausalLM.from_pretrained(out / "final")
    assert model.config.vocab_size == 300 and model.config.num_layers == 2
    assert (out / "final" / "tokenizer.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [3]
    assert any("eval_loss" in r for r in records)  # the token folder's val split is evaluated at the end
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["task"] == "causal" and run_info["train_config"]["max_steps"] == 3


def test_finetune_classify_lora_end_to_end(classifier):
    out, code = classifier
    assert code == 0
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["query", "value"]
    config = json.loads((final / "config.json").read_text())
    assert sorted(config["id2label"].values()) == ["neg", "pos"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_accuracy" in r for r in records)


PEOPLE, PLACES, OTHER = ["alice", "bob", "carol"], [["paris"], ["new", "york"]], "went to with the city today".split()


@pytest.fixture(scope="module")
def ner_data(tmp_path_factory):
    """NER sets (people B-PER, places B-LOC [I-LOC], other words O), the tags as names in one file and as
    integers in another, with a WordPiece tokenizer: (folder, tokenizer folder, label names in id order)."""
    root = tmp_path_factory.mktemp("ner")
    g = torch.Generator().manual_seed(0)
    names = ["O", "B-LOC", "B-PER", "I-LOC"]  # the reader's order for string tags: O, then sorted
    rows = []
    for _ in range(48):
        words, tags = [], []
        for _ in range(6):
            kind = int(torch.randint(0, 3, (1,), generator=g))
            if kind == 0:
                words.append(PEOPLE[int(torch.randint(0, 3, (1,), generator=g))])
                tags.append("B-PER")
            elif kind == 1:
                place = PLACES[int(torch.randint(0, 2, (1,), generator=g))]
                words += place
                tags += ["B-LOC"] + ["I-LOC"] * (len(place) - 1)
            else:
                words.append(OTHER[int(torch.randint(0, len(OTHER), (1,), generator=g))])
                tags.append("O")
        rows.append((words, tags))
    for split, part in (("train", rows[:40]), ("dev", rows[40:])):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"tokens": w, "ner_tags": t}) + "\n" for w, t in part))
        (root / f"{split}-ids.jsonl").write_text(
            "".join(json.dumps({"tokens": w, "ner_tags": [names.index(x) for x in t]}) + "\n" for w, t in part))
    tok = train_tokenizer([" ".join(w) for w, _ in rows] * 3, kind="wordpiece", vocab_size=80, min_frequency=1)
    tok.save_pretrained(root / "tok")
    return root, root / "tok", names


def _ner_args(ner_data, out, suffix="", *extra):
    root, tok, _ = ner_data
    return ["finetune", "ner", "--model", "bert-tiny", "--tokenizer", tok, "--train", root / f"train{suffix}.jsonl",
            "--eval", root / f"dev{suffix}.jsonl", "--out", out, "--batch-size", "8", "--lr", "1e-3", "--device", "cpu",
            *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetune_ner_end_to_end(ner_data, tmp_path, capsys, monkeypatch):
    """Tags as names, and the same tags as integers named by --label-names: the same run, exactly. On this
    easily learnt set entity F1 and token accuracy start low and end high. Integer tags without names are
    refused, and take their names from the model's id2label when it has them."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the loop's logic, not the kernels: torch's CPU paths
    _, _, names = ner_data
    steps = ["--max-steps", "12", "--eval-every", "1"]
    code, _, err = run(_ner_args(ner_data, tmp_path / "names", "", *steps), capsys)
    assert code == 0, err
    by_name = [r for r in _records(tmp_path / "names") if "eval_entity_f1" in r]
    assert [r["step"] for r in by_name] == list(range(1, 13))
    assert by_name[0]["eval_entity_f1"] < 0.5 and by_name[0]["eval_token_accuracy"] < 0.7, by_name[0]
    assert by_name[-1]["eval_entity_f1"] >= 0.9 and by_name[-1]["eval_token_accuracy"] >= 0.9, by_name[-1]
    config = json.loads((tmp_path / "names" / "final" / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(4)] == names

    code, _, err = run(_ner_args(ner_data, tmp_path / "ids", "-ids", *steps, "--label-names", ",".join(names)), capsys)
    assert code == 0, err
    assert [r for r in _records(tmp_path / "ids") if "eval_entity_f1" in r] == by_name

    _assert_refused(_ner_args(ner_data, tmp_path / "refused", "-ids"), capsys, tmp_path,
                    "integers (0..3) without names")
    _assert_refused(_ner_args(ner_data, tmp_path / "refused", "-ids", "--label-names", "0,1,2,3"), capsys, tmp_path,
                    "--label-names: NER tag '0'")
    root, tok, _ = ner_data  # a model whose id2label names the tags: the integer tags are ids into it
    code, _, err = run(["finetune", "ner", "--model", tmp_path / "names" / "final", "--train", root / "train-ids.jsonl",
                        "--out", tmp_path / "again", "--max-steps", "1", "--device", "cpu"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "final" / "config.json").read_text())["id2label"] == config["id2label"]


def test_finetune_sft_end_to_end(tokens, tmp_path, capsys, monkeypatch):
    """Prompt -> response pairs where the response repeats the prompt's words: the held-out loss (on responses
    only) falls, and the perplexity is its exponential."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    texts = [" ".join(sentence.split()[:4]) for sentence in _sentences(40, seed=3)]
    rows = [{"prompt": f"repeat: {text}\n", "response": text} for text in texts]
    for name, part in (("train.jsonl", rows[:32]), ("dev.jsonl", rows[32:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "sft"
    code, _, err = run(["finetune", "sft", "--model", "gpt2-tiny", "--tokenizer", tokens / "tokenizer",
                        "--train", tmp_path / "train.jsonl", "--eval", tmp_path / "dev.jsonl", "--out", out,
                        "--max-steps", "30", "--eval-every", "10", "--batch-size", "8", "--lr", "3e-3",
                        "--device", "cpu"], capsys)
    assert code == 0, err
    evals = [r for r in _records(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert 0 < r["eval_loss"] < 10 and r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5, evals
    assert (out / "final" / "model.safetensors").is_file()


def test_config_file_with_a_flag_on_top(tokens, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'task = "causal"\ndata = "{tokens}"\nmodel = "gpt2-tiny"\nblock_size = 16\nmax_steps = 50\n'
                   f'lr = 2e-3\nbatch_size = 2\nlog_every = 1\ndecay = "linear"\nout = "{tmp_path / "ignored"}"\n')
    out = tmp_path / "run"
    code, _, err = run(["pretrain", "--config", cfg, "--max-steps", "2", "--out", out, "--device", "cpu"], capsys)
    assert code == 0, err
    train_config = json.loads((out / "run.json").read_text())["train_config"]
    assert train_config["max_steps"] == 2  # the flag wins
    assert train_config["lr"] == 2e-3 and train_config["decay"] == "linear" and train_config["batch_size"] == 2
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]  # log_every from the file
    assert not (tmp_path / "ignored").exists()


def test_resume_continues(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(pretrain_args(tokens, out, "--max-steps", "2", "--save-every", "1"), capsys)
    assert code == 0, err
    code, stdout, err = run(pretrain_args(tokens, out, "--max-steps", "4", "--save-every", "1", "--resume"), capsys)
    assert code == 0, err
    assert "resumed from checkpoint-000002 at step 2" in stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["step"] == 2 for r in records)
    assert [r["step"] for r in records if "loss" in r] == [2, 4]  # log_every 10: the last step of each run
    assert (out / "checkpoint-000004").is_dir() and (out / "final" / "model.safetensors").is_file()


def _scramble_global_generators(salt: int) -> None:
    """Leave torch's, Python's and numpy's generators somewhere else: a run that drew from them unseeded differs."""
    import random

    import numpy as np

    torch.manual_seed(1000 + salt)
    random.seed(1000 + salt)
    np.random.seed(1000 + salt)


@pytest.mark.parametrize("kind", ["pretrain", "finetune-lora"])
def test_same_seed_same_final_weights(kind, tokens, cls_data, tmp_path, capsys):
    """--seed fixes the initial weights too (the preset's, the new head's, LoRA's A), not only the loop."""

    def final_files(name: str, seed: int) -> dict[str, bytes]:
        _scramble_global_generators(len(name) + seed + ord(name[0]))
        out = tmp_path / name
        argv = (pretrain_args(tokens, out, "--max-steps", "1", "--seed", seed) if kind == "pretrain" else
                finetune_args(cls_data, out, "--max-steps", "1", "--lora-r", "4", "--seed", seed))
        code, _, err = run(argv, capsys)
        assert code == 0, err
        return {p.name: p.read_bytes() for p in sorted((out / "final").glob("*.safetensors"))}

    first, again, other = final_files("a", 0), final_files("b", 0), final_files("c", 1)
    expected = {"model.safetensors"} | ({"adapter_model.safetensors"} if kind == "finetune-lora" else set())
    assert set(first) == expected
    assert first == again  # bit-identical files
    assert set(other) == expected and all(other[name] != first[name] for name in expected)


# ---- bad input: exit 2, one line, nothing written -----------------------------------------------------------


def _listing(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _assert_refused(argv, capsys, root: Path, match: str):
    before = _listing(root)
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], lines[0]
    assert _listing(root) == before  # no run folder, no file, nothing touched


def test_bad_flag_values(tokens, cls_data, tmp_path, capsys):
    out = tmp_path / "run"
    _assert_refused(pretrain_args(tokens, out, "--lr", "-1"), capsys, tmp_path, "--lr: lr must be > 0")
    _assert_refused(pretrain_args(tokens, out, "--max-steps", "0"), capsys, tmp_path, "--max-steps: max_steps")
    _assert_refused(pretrain_args(tokens, out, "--block-size", "1"), capsys, tmp_path, "--block-size")
    _assert_refused(finetune_args(cls_data, out, "--lora-r", "0"), capsys, tmp_path, "--lora-r")
    _assert_refused(pretrain_args(tokens, out, "--precision", "fp8"), capsys, tmp_path, "--precision")
    _assert_refused(pretrain_args(tokens, out, "--device", "tpu"), capsys, tmp_path, "--device")
    _assert_refused(["pretrain", "bogus", "--data", tokens, "--model", "gpt2-tiny", "--out", out], capsys, tmp_path,
                    "TASK 'bogus'")


@pytest.mark.parametrize("line,match", [
    ("grad_accum = 1.5", "(grad_accum): grad_accum must be an integer (got 1.5)"),
    ("max_steps = 2.5", "(max_steps): max_steps must be an integer (got 2.5)"),
    ("max_steps = true", "max_steps must be an integer (got True)"),
    ('lr = "fast"', "(lr): lr must be a number (got 'fast')"),
    ("progress = 1", "progress must be true or false (got 1)"),
    ('resume = "yes"', "resume must be true or false"),
    ("block_size = 2.5", "--block-size must be an integer"),
    ("tokenizer = 3", "(tokenizer): tokenizer must be a string (got 3)"),
])
def test_config_values_of_the_wrong_type(line, match, tokens, tmp_path, capsys):
    """A .toml can hold any type: a value of the wrong one is named in one line, and nothing is created."""
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'task = "causal"\ndata = "{tokens}"\nmodel = "gpt2-tiny"\nout = "{tmp_path / "run"}"\n{line}\n')
    _assert_refused(["pretrain", "--config", cfg, "--device", "cpu"], capsys, tmp_path, match)
    assert not (tmp_path / "run").exists()


def test_lora_settings_of_the_wrong_type(cls_data, tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text('lora_r = 4\nlora_dropout = "some"\n')
    _assert_refused(finetune_args(cls_data, tmp_path / "run", "--config", cfg), capsys, tmp_path, "--lora-dropout")
    cfg.write_text("lora_r = 4\nlora_targets = 7\n")
    _assert_refused(finetune_args(cls_data, tmp_path / "run", "--config", cfg), capsys, tmp_path, "--lora-targets")


def test_wrong_kind_of_data(tokens, cls_data, tmp_path, capsys):
    out = tmp_path / "run"
    text = tmp_path / "corpus.txt"
    text.write_text("plain text, not tokens\n")
    _assert_refused(["pretrain", "causal", "--data", text, "--model", "gpt2-tiny", "--out", out], capsys, tmp_path,
                    "not a prepared token folder")
    train, dev, tok = cls_data
    _assert_refused(["finetune", "classify", "--model", "bert-tiny", "--tokenizer", tok, "--train", text, "--out", out],
                    capsys, tmp_path, "--train")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"words": ["no", "text", "field"]}\n')
    _assert_refused(["finetune", "classify", "--model", "bert-tiny", "--tokenizer", tok, "--train", bad, "--out", out],
                    capsys, tmp_path, "no field 'text'")


def test_model_folder_that_is_not_one(tokens, tmp_path, capsys):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    _assert_refused(["pretrain", "causal", "--data", tokens, "--model", empty, "--out", tmp_path / "run"], capsys,
                    tmp_path, "not a model folder")
    _assert_refused(["pretrain", "causal", "--data", tokens, "--model", "gpt5", "--out", tmp_path / "run"], capsys,
                    tmp_path, "not a preset")


def test_label_set_that_does_not_match_the_head(classifier, tmp_path, capsys):
    trained, code = classifier
    assert code == 0
    other = tmp_path / "three.jsonl"
    other.write_text("".join(json.dumps({"text": f"text {i}", "label": lab}) + "\n"
                             for i, lab in enumerate(["x", "y", "z"] * 3)))
    _assert_refused(["finetune", "classify", "--model", trained / "final", "--train", other, "--out", tmp_path / "run",
                     "--device", "cpu"], capsys, tmp_path, "does not match the checkpoint's head")


def test_resume_without_a_checkpoint(tokens, tmp_path, capsys):
    _assert_refused(pretrain_args(tokens, tmp_path / "run", "--resume"), capsys, tmp_path, "no checkpoint")
    (tmp_path / "empty_run").mkdir()
    _assert_refused(pretrain_args(tokens, tmp_path / "empty_run", "--resume"), capsys, tmp_path, "no checkpoint")


def test_existing_run_and_bad_config_file(tokens, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    _assert_refused(pretrain_args(tokens, out), capsys, tmp_path, "already holds a run")
    cfg = tmp_path / "run.toml"
    cfg.write_text("learning_rate = 0.1\n")
    _assert_refused(pretrain_args(tokens, tmp_path / "new", "--config", cfg), capsys, tmp_path,
                    "unknown setting(s) ['learning_rate']")
    cfg.write_text("lr = [\n")
    _assert_refused(pretrain_args(tokens, tmp_path / "new", "--config", cfg), capsys, tmp_path, "--config")
    _assert_refused(pretrain_args(tokens, tmp_path / "new", "--config", tmp_path / "run.yaml"), capsys, tmp_path,
                    "--config")


# ---- stopping early ----------------------------------------------------------------------------------------


def test_ctrl_c_saves_the_step_and_names_the_resume_command(tokens, tmp_path, capsys, monkeypatch):
    """Ctrl-C after step 2: exit 130 and one line naming the checkpoint and the command that continues the run;
    that command, run as printed, finishes it."""
    import os
    import shlex
    import signal

    from scratchformer import cli_train

    printer = cli_train._printer

    def interrupt_after_step_2(record):
        printer(record)
        if record.get("step") == 2 and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli_train, "_printer", interrupt_after_step_2)
    (tmp_path / "run.toml").write_text("log_every = 1\n")
    out = tmp_path / "run"
    argv = [str(a) for a in pretrain_args(tokens, out, "--max-steps", "4", "--config", tmp_path / "run.toml")]
    code, _, err = run(argv, capsys)
    assert code == 130
    command = shlex.join(["scratchformer", *argv, "--resume"])
    assert err == (f"scratchformer pretrain: interrupted at step 2, saved in {out / 'checkpoint-000002'}; "
                   f"resume with: {command}\n")
    monkeypatch.setattr(cli_train, "_printer", printer)
    code, stdout, err = run(shlex.split(command)[1:], capsys)
    assert code == 0, err
    assert "resumed from checkpoint-000002 at step 2" in stdout and (out / "final" / "model.safetensors").is_file()


def test_a_loss_that_turns_nan_stops_with_one_line(tokens, tmp_path, capsys):
    """A learning rate so large that the first step sends the weights to inf: from step 2 on every loss is NaN
    (those steps are skipped). The look at the failures before the checkpoint of step 4 stops the run: exit 2,
    one line naming the steps and the last checkpoint (whose weights are step 1's, finite); no final/."""
    out = tmp_path / "run"
    code, _, err = run(pretrain_args(tokens, out, "--max-steps", "8", "--save-every", "1", "--lr", "1e30"), capsys)
    assert code == 2
    assert err == ("scratchformer pretrain: error: training stopped at step 4: the loss or its gradients were NaN "
                   "or inf at 3 steps in a row (2 to 4); those steps were skipped and changed no weight; the last "
                   f"checkpoint is {out / 'checkpoint-000003'}\n"), err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000003"]
    model = CausalLM.from_pretrained(out / "checkpoint-000003")
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not (out / "final").exists()
