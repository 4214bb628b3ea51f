"""The `scratchformer` command line: every command's --help and one bad input, and real runs on the tiny random
checkpoints of tests/tiny_checkpoints.py (copied, with a small WordPiece tokenizer added) checked against
`transformers`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scratchformer.cli import main
from scratchformer.engine import SequenceClassifier
from scratchformer.engine.models import CausalLM
from scratchformer.engine.lora import apply_lora, lora_modules, save_adapter
from tests.tiny_checkpoints import max_rel_err

transformers = pytest.importorskip("transformers")

COMMANDS = ["embed", "generate", "merge", "info", "attention-map", "bench"]
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "once upon a time there was a fox",
         "birds fly over the quiet river"]
FP32_TOL = 1e-5  # CPU and GPU alike: the CLI runs fp32 on the eager / sdpa paths, HF the same maths


@pytest.fixture(scope="module")
def models(hf_checkpoints, tmp_path_factory):
    """name -> (folder with a tokenizer, HF model): copies of the shared tiny checkpoints, never the originals."""
    from scratchformer.tokenize import train_tokenizer

    tok = train_tokenizer(TEXTS * 5, kind="wordpiece", vocab_size=90, min_frequency=1)  # < both tiny vocabularies
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for name in ("bert_base", "bert_seq", "gpt2_lm"):
        folder, hf = hf_checkpoints[name]
        shutil.copytree(folder, root / name)
        tok.save_pretrained(root / name)
        out[name] = (root / name, hf)
    return out


def run(argv, capsys):
    """(exit status, stdout, stderr) of `scratchformer argv`, in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse: --help and usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- --help and bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(command, capsys):
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    assert "example:" in out and f"scratchformer {command}" in out.split("example:")[1]


def _bad_inputs(tmp, models):
    gpt2, bert = models["gpt2_lm"][0], models["bert_base"][0]
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("keep me")
    return {
        "embed": ["embed", "--file", tmp / "missing.txt"],
        "generate": ["generate", gpt2, "the cat", "--top-p", "1.5"],
        "merge": ["merge", gpt2, tmp / "no-adapter", tmp / "full"],  # OUT is not empty and there is no --force
        "info": ["info", tmp / "nowhere"],
        "attention-map": ["attention-map", bert, "the cat", "--layer", "7", "-o", tmp / "m.png"],
        "attention-map-no-layer": ["attention-map", bert, "the cat", "-o", tmp / "m.png"],  # argparse's own error
        "bench": ["bench", "no_such_benchmark"],
    }


@pytest.mark.parametrize("case", COMMANDS + ["attention-map-no-layer"])
def test_bad_input_is_one_line_and_exit_2(case, models, tmp_path, capsys):
    code, out, err = run(_bad_inputs(tmp_path, models)[case], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    assert (tmp_path / "full" / "x").read_text() == "keep me"  # merge refused before touching OUT


def test_entry_point_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-m", "scratchformer", "info", str(tmp_path / "nowhere")],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "no such file or directory" in result.stderr


# ---- real runs -------------------------------------------------------------------------------------------


def test_generate_greedy_matches_transformers(models, capsys):
    folder, hf = models["gpt2_lm"]
    from scratchformer.tokenize import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    ids = tok(["once upon a time"], return_tensors="pt")["input_ids"]
    eos = hf.config.eos_token_id  # the tokenizer has no eos: the CLI falls back to config.json's
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, do_sample=False,
                      eos_token_id=eos, pad_token_id=eos)
    code, out, _ = run(["generate", folder, "once upon a time", "--max-new-tokens", 9, "--device", "cpu"], capsys)
    assert code == 0
    assert out.strip() == tok.decode(ref[0].tolist(), skip_special_tokens=True).strip()


def test_generate_sampling_is_seeded(models, capsys):
    folder, _ = models["gpt2_lm"]
    argv = ["generate", folder, "a dog", "--max-new-tokens", 12, "--do-sample", "--top-k", 20, "--top-p", 0.9,
            "--temperature", 1.3, "--device", "cpu"]
    outs = [run(argv + ["--seed", s], capsys) for s in (3, 3, 4)]
    assert all(code == 0 for code, _, _ in outs)
    assert outs[0][1] == outs[1][1]
    assert outs[0][1] != outs[2][1]  # 12 tokens over a 90-token vocabulary at temperature 1.3: seeds differ


def test_embed_model_folder_matches_transformers(models, tmp_path, capsys):
    folder, hf = models["bert_base"]
    out_file = tmp_path / "vectors.npy"
    code, out, _ = run(["embed", folder, *TEXTS[:3], "-o", out_file, "--batch-size", 2, "--device", "cpu"], capsys)
    assert code == 0 and "wrote (3, 45)" in out
    ours = torch.from_numpy(np.load(out_file))
    from scratchformer.tokenize import Tokenizer

    batch = Tokenizer.from_pretrained(folder)(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = hf(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert max_rel_err(ours, ref) <= FP32_TOL
    # --model says the same thing as the positional MODEL; the texts then start at the first word.
    code, out, _ = run(["embed", "--model", folder, TEXTS[0], "--device", "cpu"], capsys)
    assert code == 0 and repr(TEXTS[0]) in out


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_embed_checks_the_output_before_loading_the_model(where, models, tmp_path, capsys, monkeypatch):
    from scratchformer.engine.sentence import SentenceEncoder

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was checked")

    monkeypatch.setattr(SentenceEncoder, "from_pretrained", no_load)
    target = tmp_path / "missing" / "dir" / "x.npy" if where == "missing-folder" else tmp_path
    code, out, err = run(["embed", models["bert_base"][0], TEXTS[0], "-o", target, "--device", "cpu"], capsys)
    assert code == 2, (out, err)
    assert err.strip().count("\n") == 0 and f"-o {target}:" in err and ".tmp" not in err, err
    assert ("does not exist" if where == "missing-folder" else "is a folder") in err


def test_info_model_and_odd_keys(models, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder, hf = models["gpt2_lm"]
    odd = tmp_path / "odd"
    shutil.copytree(folder, odd)
    state = load_file(odd / "model.safetensors")
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # a buffer old GPT-2 files carry: ignored
    state["transformer.extra.weight"] = torch.randn(3)  # nothing reads it: unexpected
    state["transformer.wte.weight"] = state["transformer.wte.weight"].to(torch.bfloat16)
    save_file(state, odd / "model.safetensors", metadata={"format": "pt"})
    code, out, _ = run(["info", odd, "--json"], capsys)
    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "GPT2LMHeadModel -> scratchformer CausalLM"
    assert info["num_parameters"] == sum(p.numel() for p in hf.parameters())  # tied lm_head counted once, as HF
    assert info["ignored"] == ["transformer.h.0.attn.bias"] and info["unexpected"] == ["transformer.extra.weight"]
    assert info["dtypes"]["bfloat16"] == 1 and sum(info["dtypes"].values()) == len(state)
    assert len(info["mapped"]) == len(state) - 2
    code, out, _ = run(["info", folder], capsys)
    assert code == 0 and "pre-LN" in out and "gelu_new" in out and "head_dim 13" in out


@pytest.mark.parametrize("name", ["bert_seq", "gpt2_lm"])
def test_merge_loads_in_transformers_with_the_lora_logits(name, models, tmp_path, capsys):
    folder, hf = models[name]
    cls = SequenceClassifier if name == "bert_seq" else CausalLM
    targets = ["query", "value"] if name == "bert_seq" else ["c_attn", "c_fc"]  # c_fc: a Conv1D transposed on save
    model = apply_lora(cls.from_pretrained(folder), r=3, alpha=5, target_modules=targets,
                       modules_to_save=["classifier"] if name == "bert_seq" else None)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for m in lora_modules(model).values():
            m.lora_B.normal_(0.0, 0.3)
        if name == "bert_seq":
            model.classifier.weight.normal_(0.0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(1, 90, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits

    out_dir = tmp_path / "merged"
    code, out, err = run(["merge", folder, tmp_path / "adapter", out_dir], capsys)
    assert code == 0, err
    assert "tokenizer.json" in out and (out_dir / "tokenizer.json").is_file()
    merged = type(hf).from_pretrained(out_dir).eval()
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits
    real = mask.bool() if got.dim() == 3 else None
    assert max_rel_err(got, want, real) <= FP32_TOL
    # The adapter changed the outputs (so the check above could fail), and the base is left untouched.
    with torch.no_grad():
        base = hf(input_ids=ids, attention_mask=mask).logits
    assert max_rel_err(base, want, real) > 1e-3

    code, _, _ = run(["merge", folder, tmp_path / "adapter", out_dir], capsys)
    assert code == 2  # not empty now
    code, _, err = run(["merge", folder, tmp_path / "adapter", out_dir, "--force"], capsys)
    assert code == 0, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    code, out, _ = run(["info", tmp_path / "adapter"], capsys)
    assert code == 0 and "adapter:" in out and "scaling 1.66667" in out and targets[0] in out


@pytest.mark.parametrize("head", [None, 1])
def test_attention_map_writes_a_png(head, models, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder, _ = models["bert_base"]
    png = tmp_path / "map.png"
    argv = ["attention-map", folder, "the cat sat on the mat", "--layer", -1, "-o", png, "--device", "cpu"]
    code, out, err = run(argv + ([] if head is None else ["--head", head]), capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert ("all 3 heads" if head is None else "head 1") in out and "layer 1" in out


def test_bench_dry_run_lists_scripts(capsys):
    code, out, _ = run(["bench", "all", "--dry-run"], capsys)
    assert code == 0
    assert "lora.py" in out and "engine.py" in out
    assert ("--quick" in out) == (not torch.cuda.is_available())


def test_bench_names_of_the_issue(capsys):
    """Issue 8 names `bench [attention|lora|adamw|train|all]`: `train` is train_step, asked twice it runs once."""
    code, out, err = run(["bench", "attention", "lora", "adamw", "train", "train_step", "--dry-run"], capsys)
    assert code == 0, err
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("[")] == [
        "[1/4] attention", "[2/4] lora", "[3/4] adamw", "[4/4] train_step"]
    assert "train_step.py" in out
    code, help_text, _ = run(["bench", "--help"], capsys)
    assert code == 0
    names = help_text.split("names:")[1].split("positional arguments")[0]
    for name in ("attention", "lora", "adamw", "train", "train_step", "all"):
        assert f"\n  {name} " in names, name


def test_merge_onto_a_headless_base_raises_no_false_alarm(models, tmp_path, capsys, caplog):
    """A classifier head trained in full (modules_to_save) on a base saved without one: loading the base
    finds the head new, the adapter then fills it. Neither the loader's 'initialised new weights' warning
    nor merge's own 'randomly initialised' line may appear, and the merged head is the adapter's."""
    folder = models["bert_base"][0]
    model = apply_lora(SequenceClassifier.from_pretrained(folder, num_labels=3), r=2, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.5)
    save_adapter(model, tmp_path / "adapter")
    caplog.set_level("WARNING", logger="scratchformer")
    caplog.clear()  # the set-up above loaded the same base: its warning is expected
    code, out, err = run(["merge", folder, tmp_path / "adapter", tmp_path / "merged"], capsys)
    assert code == 0, err
    assert "initialised new weights" not in caplog.text and "randomly initialised" not in out + err
    merged = SequenceClassifier.from_pretrained(tmp_path / "merged")
    assert torch.equal(merged.classifier.weight, model.classifier.weight)
