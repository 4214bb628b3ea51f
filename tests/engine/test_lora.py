"""LoRA in the engine: PEFT adapters in and out with PEFT's logits, merge / unmerge, what training touches."""

import json
import subprocess
import sys

import pytest
import torch

from scratchformer import (
    CausalLM,
    CheckpointError,
    SequenceClassifier,
    apply_lora,
    count_parameters,
    load_adapter,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from scratchformer.engine.lora import LoRALinear, lora_modules, print_trainable_parameters

from .conftest import max_rel_err, padded_batch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _randomise_lora(model):
    """PEFT starts B at zero, which would hide a wrong B: give every adapter tensor random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def _peft_model(hf_checkpoints, name, **lora_kw):
    folder, _ = hf_checkpoints[name]
    cls = {"bert_seq": transformers.BertForSequenceClassification, "gpt2_lm": transformers.GPT2LMHeadModel}[name]
    base = cls.from_pretrained(folder).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(**lora_kw)).eval()
    _randomise_lora(model)
    return model


CASES = [
    ("bert_seq", SequenceClassifier, dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                                          modules_to_save=["classifier"], task_type="SEQ_CLS")),
    ("gpt2_lm", CausalLM, dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_proj"], use_rslora=True,
                               task_type="CAUSAL_LM")),
]


@pytest.mark.parametrize("name, ours_cls, lora_kw", CASES)
def test_peft_adapter_loads_into_ours(hf_checkpoints, tmp_path, name, ours_cls, lora_kw):
    peft_model = _peft_model(hf_checkpoints, name, **lora_kw)
    if "modules_to_save" in lora_kw:  # a trained head differs from the base checkpoint's
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(ours_cls.from_pretrained(hf_checkpoints[name][0]), tmp_path)
    ids, mask, _ = padded_batch(97, [9, 5], seed=11)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert max_rel_err(got, want, mask.bool() if got.dim() == 3 else None) <= 1e-5


@pytest.mark.parametrize("name, ours_cls, lora_kw", CASES)
def test_our_adapter_loads_into_peft(hf_checkpoints, tmp_path, name, ours_cls, lora_kw):
    ours = ours_cls.from_pretrained(hf_checkpoints[name][0])
    apply_lora(ours, r=lora_kw["r"], alpha=lora_kw["lora_alpha"], target_modules=lora_kw["target_modules"],
               use_rslora=lora_kw.get("use_rslora", False), modules_to_save=lora_kw.get("modules_to_save"))
    _randomise_lora(ours)
    if ours_cls is SequenceClassifier:
        with torch.no_grad():
            ours.classifier.weight.add_(1.0)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (name == "gpt2_lm")
    cls = {"bert_seq": transformers.BertForSequenceClassification, "gpt2_lm": transformers.GPT2LMHeadModel}[name]
    peft_model = peft.PeftModel.from_pretrained(cls.from_pretrained(hf_checkpoints[name][0]), tmp_path).eval()
    ids, mask, _ = padded_batch(97, [9, 5], seed=12)
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours.eval()(ids, attention_mask=mask).logits
    assert max_rel_err(got, want, mask.bool() if got.dim() == 3 else None) <= 1e-5


def test_merge_unmerge_and_merged_checkpoint(hf_checkpoints, tmp_path):
    ours = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0])
    before = {n: p.clone() for n, p in ours.named_parameters()}
    apply_lora(ours, r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    _randomise_lora(ours)
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        unmerged = ours(ids).logits
        merge_lora(ours)
        merged = ours(ids).logits
        assert max_rel_err(merged, unmerged) <= 1e-5
        assert not torch.equal(ours.body.blocks[0].attn.qkv.weight, before["body.blocks.0.attn.qkv.weight"])
        ours.save_pretrained(tmp_path)  # a merged model saves as a plain HF checkpoint
        unmerge_lora(ours)
        for n, p in ours.named_parameters():
            if n in before:
                torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert max_rel_err(hf(ids).logits, merged) <= 1e-5


def test_bf16_bert_classifier_merge_unmerge_and_merged_checkpoint(hf_checkpoints, tmp_path):
    """bf16 rounds every merge: merged matches unmerged, the HF checkpoint and unmerge to bf16 precision."""
    folder = hf_checkpoints["bert_seq"][0]
    ours = SequenceClassifier.from_pretrained(folder, dtype="bf16")
    before = {n: p.clone() for n, p in ours.named_parameters()}
    apply_lora(ours, r=5, alpha=7, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
    _randomise_lora(ours)
    with torch.no_grad():
        ours.classifier.weight.add_(torch.randn_like(ours.classifier.weight))  # a trained head
    ids, mask, types = padded_batch(101, [9, 4, 7], seed=25, type_vocab=2)
    with torch.no_grad():
        unmerged = ours(ids, attention_mask=mask, token_type_ids=types).logits
        merge_lora(ours)
        merged = ours(ids, attention_mask=mask, token_type_ids=types).logits
        assert merged.dtype == torch.bfloat16 and max_rel_err(merged, unmerged) <= 3e-2
        ours.save_pretrained(tmp_path)
        largest = {n: p.abs().max().float() for n, p in ours.named_parameters()}  # of W + scaling * B A
        unmerge_lora(ours)
        for n, p in ours.named_parameters():
            if n in before and not n.startswith("classifier."):
                # Two bf16 roundings, of W + scaling * B A and of W, each at most half a unit in the last place.
                bound = 2**-8 * (largest[n] + before[n].abs().max().float())
                assert (p.float() - before[n].float()).abs().max() <= bound, n
    hf = transformers.BertForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert hf.dtype == torch.bfloat16
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert max_rel_err(merged, want) <= 3e-2


def test_training_touches_only_adapters_and_saved_modules(hf_checkpoints):
    model = SequenceClassifier.from_pretrained(hf_checkpoints["bert_seq"][0], hidden_dropout=0.0,
                                               attention_dropout=0.0)
    apply_lora(model, r=2, alpha=4, modules_to_save=["classifier"])
    trainable, total = count_parameters(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if "lora_" in n or n.startswith("classifier.")}
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n in names) < total
    before = {n: p.clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask, _ = padded_batch(101, [8, 6, 3], seed=13)
    model.train()
    for _ in range(3):
        optim.zero_grad()
        model(ids, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
        optim.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == names  # every trainable tensor moved (B left zero too), nothing else did


def test_lora_errors(hf_checkpoints, tmp_path):
    model = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0])
    with pytest.raises(ValueError, match=r"match no module.*c_attn"):
        apply_lora(model, target_modules=["query"])
    apply_lora(model, r=2)
    with pytest.raises(ValueError, match=r"already has LoRA adapters: load_adapter replaces them"):
        apply_lora(model, r=4)


def _logits(model, name, seed):
    ids, mask, _ = padded_batch(97, [9, 5], seed=seed)
    with torch.no_grad():
        if isinstance(model, peft.PeftModel):
            logits = model(input_ids=ids, attention_mask=mask).logits
        else:
            logits = model(ids, attention_mask=mask).logits
    return logits, (mask.bool() if logits.dim() == 3 else None)


def _peft_adapter(hf_checkpoints, folder, name, **lora_kw):
    peft_model = _peft_model(hf_checkpoints, name, **lora_kw)
    peft_model.save_pretrained(folder)
    return peft_model


LOAD_CASES = ["gpt2_lm", "bert_seq"]
TARGETS = {"gpt2_lm": ["c_attn"], "bert_seq": ["query", "value"]}
OURS = {"gpt2_lm": CausalLM, "bert_seq": SequenceClassifier}


@pytest.mark.parametrize("name", LOAD_CASES)
def test_load_into_lora_model_takes_the_files_alpha_and_dropout(hf_checkpoints, tmp_path, name):
    """Same modules and rank, other alpha / rsLoRA / dropout: the file's settings win, parameters stay the same
    objects (an optimizer holding them stays valid)."""
    peft_model = _peft_adapter(hf_checkpoints, tmp_path, name, r=4, lora_alpha=4, lora_dropout=0.1,
                               use_rslora=True, target_modules=TARGETS[name])
    ours = apply_lora(OURS[name].from_pretrained(hf_checkpoints[name][0]), r=4, alpha=16,
                      target_modules=TARGETS[name])
    params = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    load_adapter(ours, tmp_path)
    assert all(m.scaling == 2.0 and m.dropout_p == 0.1 and not m.training for m in lora_modules(ours).values())
    assert {n: p for n, p in ours.named_parameters() if "lora_" in n} == params  # same tensors, new values
    assert ours.lora_config.lora_alpha == 4 and ours.lora_config.use_rslora
    want, mask = _logits(peft_model, name, seed=21)
    got, _ = _logits(ours, name, seed=21)
    assert max_rel_err(got, want, mask) <= 1e-5


@pytest.mark.parametrize("name", LOAD_CASES)
def test_load_into_merged_model_then_unmerge_restores_the_base(hf_checkpoints, tmp_path, name):
    peft_model = _peft_adapter(hf_checkpoints, tmp_path, name, r=4, lora_alpha=4, target_modules=TARGETS[name])
    base = OURS[name].from_pretrained(hf_checkpoints[name][0])
    before = {n: p.clone() for n, p in base.named_parameters()}
    ours = apply_lora(base, r=4, alpha=16, target_modules=TARGETS[name])
    _randomise_lora(ours)
    merge_lora(ours)
    load_adapter(ours, tmp_path)  # the old update must leave the base weights first
    assert all(m.merged for m in lora_modules(ours).values())  # still merged, now with the file's adapter
    want, mask = _logits(peft_model, name, seed=22)
    got, _ = _logits(ours, name, seed=22)
    assert max_rel_err(got, want, mask) <= 1e-5
    unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)
    got, _ = _logits(ours, name, seed=22)
    assert max_rel_err(got, want, mask) <= 1e-5


@pytest.mark.parametrize("merged", [False, True])
def test_load_with_other_targets_rank_and_saved_modules_rebuilds(hf_checkpoints, tmp_path, merged):
    """Other modules, rank and modules_to_save: the model ends up as a fresh model with the adapter loaded."""
    name = "bert_seq"
    peft_model = _peft_adapter(hf_checkpoints, tmp_path, name, r=3, lora_alpha=5, task_type="SEQ_CLS",
                               target_modules=["key", "dense"], modules_to_save=["classifier"])
    base = OURS[name].from_pretrained(hf_checkpoints[name][0])
    before = {n: p.clone() for n, p in base.named_parameters()}
    ours = apply_lora(base, r=6, alpha=16, target_modules=["query", "value"])
    _randomise_lora(ours)
    if merged:
        merge_lora(ours)
    load_adapter(ours, tmp_path)
    fresh = load_adapter(OURS[name].from_pretrained(hf_checkpoints[name][0]), tmp_path)
    assert {n: m.r for n, m in lora_modules(ours).items()} == {n: m.r for n, m in lora_modules(fresh).items()}
    # The model came from from_pretrained in eval mode: the rebuilt modules are too (no dropout at inference).
    assert not ours.training and not any(m.training for m in ours.modules())
    assert ({n for n, p in ours.named_parameters() if p.requires_grad}
            == {n for n, p in fresh.named_parameters() if p.requires_grad})
    want, mask = _logits(peft_model, name, seed=23)
    got, _ = _logits(ours, name, seed=23)
    assert max_rel_err(got, want, mask) <= 1e-5
    unmerge_lora(ours)
    for n, p in ours.named_parameters():  # the old query / value adapters left no trace in the base weights
        if n in before and not n.startswith("classifier."):
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6, msg=n)


def test_adapter_that_does_not_fit_is_an_error_and_changes_nothing(hf_checkpoints, tmp_path):
    source = apply_lora(CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0]), r=4, target_modules=["c_attn", "c_fc"])
    save_adapter(source, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    model = apply_lora(CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0]), r=2, alpha=3)
    _randomise_lora(model)
    state = {n: p.clone() for n, p in model.state_dict().items()}

    config_file.write_text(json.dumps({**config, "r": 6}))  # the tensors have rank 4
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn' lora_A has shape \[4, 52\].*expects \[6, 52\]"):
        load_adapter(model, tmp_path)
    config_file.write_text(json.dumps({**config, "target_modules": ["c_attn"]}))  # c_fc's tensors left over
    with pytest.raises(CheckpointError, match=r"do not select module 'h\.0\.mlp\.c_fc'"):
        load_adapter(model, tmp_path)
    config_file.write_text(json.dumps({**config, "target_modules": ["c_attn", "c_fc", "c_proj"]}))
    with pytest.raises(CheckpointError, match=r"no lora_A for module 'h\.0\.attn\.c_proj'"):
        load_adapter(model, tmp_path)
    for n, p in model.state_dict().items():
        assert torch.equal(p, state[n]), n
    assert all(m.r == 2 and m.scaling == 1.5 for m in lora_modules(model).values())


# The fields our LoRAConfig sets itself; every other field of adapter_config.json carries PEFT's default.
OUR_FIELDS = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "modules_to_save", "fan_in_fan_out",
              "task_type", "base_model_name_or_path", "inference_mode", "peft_version"}


def test_adapter_config_has_pefts_fields_and_loads_in_peft(hf_checkpoints, tmp_path):
    folder = hf_checkpoints["gpt2_lm"][0]
    ours = apply_lora(CausalLM.from_pretrained(folder), r=3, alpha=5, dropout=0.1, target_modules=["c_attn", "c_fc"],
                      use_rslora=True)
    assert ours.name_or_path == str(folder)
    save_adapter(ours, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    reference = peft.LoraConfig().to_dict()  # the installed peft's field set and defaults
    assert set(written) >= set(reference), sorted(set(reference) - set(written))
    for key in set(reference) - OUR_FIELDS:
        assert written[key] == reference[key], key
    assert written["inference_mode"] is True and written["base_model_name_or_path"] == str(folder)

    config = peft.LoraConfig.from_pretrained(tmp_path)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora) == (3, 5, 0.1, True)
    assert set(config.target_modules) == {"c_attn", "c_fc"} and config.fan_in_fan_out
    assert config.task_type == "CAUSAL_LM" and config.base_model_name_or_path == str(folder)


@pytest.mark.parametrize("name", ["gpt2_lm", "bert_seq"])
def test_auto_peft_model_loads_our_adapter_offline(hf_checkpoints, tmp_path, monkeypatch, name):
    """base_model_name_or_path is the folder our model came from: AutoPeftModel* finds the base by itself."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    saved = ["classifier"] if name == "bert_seq" else None
    ours = apply_lora(OURS[name].from_pretrained(hf_checkpoints[name][0]), r=3, alpha=5,
                      target_modules=(TARGETS[name] + ["dense"]) if saved else TARGETS[name], modules_to_save=saved)
    _randomise_lora(ours)
    if saved:
        with torch.no_grad():
            ours.classifier.weight.add_(1.0)
    save_adapter(ours, tmp_path)
    auto = {"gpt2_lm": peft.AutoPeftModelForCausalLM, "bert_seq": peft.AutoPeftModelForSequenceClassification}[name]
    theirs = auto.from_pretrained(tmp_path).eval()
    want, mask = _logits(theirs, name, seed=24)
    got, _ = _logits(ours.eval(), name, seed=24)
    assert max_rel_err(got, want, mask) <= 1e-5


def test_unsupported_peft_features_are_refused(hf_checkpoints, tmp_path):
    model = apply_lora(CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0]), r=2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for key, value, message in [("use_dora", True, "DoRA"), ("layers_to_transform", [0], "chosen layers"),
                                ("lora_bias", True, "bias on lora_B"), ("bias", "all", "train biases")]:
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=rf"adapter_config.json: {key}=.*{message}"):
            load_adapter(CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0]), tmp_path)


def test_parameter_counts_are_printed_as_peft_prints_them(hf_checkpoints, capsys):
    folder = hf_checkpoints["gpt2_lm"][0]
    quiet = apply_lora(CausalLM.from_pretrained(folder), r=3, target_modules=["c_attn", "c_fc"])
    assert capsys.readouterr().out == ""  # verbose=False (the default) only logs
    ours = apply_lora(CausalLM.from_pretrained(folder), r=3, target_modules=["c_attn", "c_fc"], verbose=True)
    line = capsys.readouterr().out
    trainable, total = count_parameters(ours)
    assert count_parameters(quiet) == (trainable, total) and 0 < trainable < total
    assert line.startswith("LoRA r=3 on 4 modules: ") and f"trainable params: {trainable:,} ||" in line

    base = transformers.GPT2LMHeadModel.from_pretrained(folder)
    peft.get_peft_model(base, peft.LoraConfig(r=3, target_modules=["c_attn", "c_fc"])).print_trainable_parameters()
    theirs = capsys.readouterr().out
    print_trainable_parameters(ours)
    assert capsys.readouterr().out == theirs and line.endswith(theirs)


def test_the_package_never_imports_peft():
    code = ("import sys, scratchformer, scratchformer.engine.lora, scratchformer.engine.merge, scratchformer.train; "
            "sys.exit('peft' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_default_targets_are_peft_defaults(hf_checkpoints):
    bert = apply_lora(SequenceClassifier.from_pretrained(hf_checkpoints["bert_seq"][0]))
    assert sorted(n.rsplit(".", 1)[-1] for n in lora_modules(bert)) == ["query", "query", "value", "value"]
    gpt2 = apply_lora(CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0]))
    assert all(isinstance(m, LoRALinear) and n.endswith("attn.qkv") for n, m in lora_modules(gpt2).items())


def test_fused_kernel_path_matches_torch_path(hf_checkpoints, device):
    """The same LoRA model through the Triton kernel and through plain PyTorch: logits and adapter gradients."""
    ids, mask, _ = padded_batch(97, [7, 4], seed=14)
    ids, mask = ids.to(device), mask.to(device)
    results = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(5)
        model = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0], device=device, hidden_dropout=0.0,
                                         attention_dropout=0.0, embedding_dropout=0.0, attention="eager")
        apply_lora(model, r=3, alpha=6, target_modules=["c_attn", "c_fc"], backend=backend)
        _randomise_lora(model)
        model.train()
        loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    tol = 1e-5 if device == "cpu" else 1e-3  # on the GPU, the reference's matmuls and ours differ in order
    assert abs(results["triton"][0] - results["torch"][0]) <= tol * abs(results["torch"][0])
    for name, grad in results["torch"][1].items():
        assert max_rel_err(results["triton"][1][name], grad) <= 10 * tol, name
