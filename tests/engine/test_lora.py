"""LoRA in the engine: PEFT adapters in and out with PEFT's logits, merge / unmerge, what training touches."""

import json

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
from scratchformer.engine.lora import LoRALinear, lora_modules

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
    apply_lora(model, r=4)
    save_adapter(model, tmp_path)
    other = CausalLM.from_pretrained(hf_checkpoints["gpt2_lm"][0])
    apply_lora(other, r=6)  # a different rank: the shapes do not fit
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_attn.*lora_A"):
        load_adapter(other, tmp_path)


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
