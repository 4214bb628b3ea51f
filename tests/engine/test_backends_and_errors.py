"""Attention backends agree with each other; bad checkpoints and configs fail with errors that name the culprit."""

import json
import re

import pytest
import torch

from scratchformer.engine import CausalLM, CheckpointError, ConfigError, Encoder, MaskedLM, ModelConfig
from scratchformer.engine.fused import attend

from .conftest import max_rel_err, padded_batch

BACKENDS = ["eager", "sdpa", "triton"]  # triton runs under TRITON_INTERPRET=1 on a CPU (tests/conftest.py)


def tolerance(device) -> float:
    """fp32 relative tolerance against eager: exact dots in the interpreter, tf32 dots on a GPU."""
    return 1e-5 if device == "cpu" else 5e-3


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("causal, seq_q, seq_k", [(False, 19, 19), (True, 19, 19), (True, 5, 23), (False, 6, 17)])
def test_backends_agree_with_eager(device, backend, causal, seq_q, seq_k):
    q = torch.randn(3, 2, seq_q, 24, device=device)
    k, v = torch.randn(3, 2, seq_k, 24, device=device), torch.randn(3, 2, seq_k, 24, device=device)
    mask = (torch.arange(seq_k)[None, :] < torch.tensor([seq_k, seq_k - 4, 2])[:, None]).long().to(device)
    want = attend(q, k, v, backend="eager", causal=causal, key_padding_mask=mask)
    got = attend(q, k, v, backend=backend, causal=causal, key_padding_mask=mask)
    assert torch.isfinite(got).all()
    assert max_rel_err(got, want) <= tolerance(device)


def test_fully_masked_rows_are_zero_in_every_backend(device):
    q, k, v = (torch.randn(1, 2, n, 8, device=device) for n in (4, 6, 6))
    mask = torch.zeros(1, 6, dtype=torch.long, device=device)
    for backend in BACKENDS:
        out = attend(q, k, v, backend=backend, causal=False, key_padding_mask=mask)
        assert torch.equal(out, torch.zeros_like(out)), backend


@pytest.mark.parametrize("name, cls", [("bert_mlm", MaskedLM), ("gpt2_lm", CausalLM)])
def test_model_backends_agree(device, hf_checkpoints, name, cls):
    """Whole models: logits and every parameter gradient of a padded batch match eager in each backend."""
    folder, _ = hf_checkpoints[name]
    ids, mask, _ = padded_batch(97, [9, 4, 6], seed=7)
    ids, mask = ids.to(device), mask.to(device)
    labels = ids.masked_fill(mask == 0, -100)
    outs = {}
    for backend in BACKENDS:
        model = cls.from_pretrained(folder, attention=backend, hidden_dropout=0.0, attention_dropout=0.0,
                                    embedding_dropout=0.0).to(device)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        with torch.no_grad():  # the triton path trains with the fused loss, which returns no logits
            logits = model(ids, attention_mask=mask).logits
        outs[backend] = (logits, {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    want_logits, want_grads = outs["eager"]
    for backend, (logits, grads) in outs.items():
        assert max_rel_err(logits, want_logits, mask.bool()) <= tolerance(device), backend
        assert grads.keys() == want_grads.keys()
        for n, g in grads.items():
            if n.endswith("key.bias"):
                # A key bias shifts every score of a query equally: softmax cancels it, its true gradient is 0
                # (rounding noise ~1e-12), so it is compared in absolute terms.
                assert (g - want_grads[n]).abs().max() <= 1e-6, (backend, n)
                continue
            assert max_rel_err(g, want_grads[n]) <= 20 * tolerance(device), (backend, n)


# ---- bad input -------------------------------------------------------------------------------------------


def _copy(folder, dest):
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Encoder.from_pretrained(tmp_path / "nope")


def test_folder_without_weights(tmp_path, hf_checkpoints):
    (tmp_path / "config.json").write_text((hf_checkpoints["bert_base"][0] / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Encoder.from_pretrained(tmp_path)


def test_truncated_file(tmp_path, hf_checkpoints):
    folder = _copy(hf_checkpoints["bert_base"][0], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Encoder.from_pretrained(folder)


def test_corrupt_header(tmp_path, hf_checkpoints):
    folder = _copy(hf_checkpoints["bert_base"][0], tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Encoder.from_pretrained(folder)


def test_missing_key_is_named(tmp_path, hf_checkpoints):
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_checkpoints["bert_base"][0], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    del state["encoder.layer.1.attention.self.key.weight"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layer\.1\.attention\.self\.key\.weight"):
        Encoder.from_pretrained(folder)


def test_wrong_shape_is_named(tmp_path, hf_checkpoints):
    from safetensors.torch import load_file, save_file

    folder = _copy(hf_checkpoints["gpt2_lm"][0], tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"] = torch.randn(71, 52)  # [out, in] instead of Conv1D's [in, out]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight.*\[71, 52\]"):
        CausalLM.from_pretrained(folder)


def test_index_pointing_at_the_wrong_shard_is_named(tmp_path, hf_checkpoints):
    """An index whose weight_map sends a key to a shard without it: the index is blamed, not the shard."""
    _, hf = hf_checkpoints["gpt2_lm"]
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = "transformer.h.1.mlp.c_fc.weight"
    wrong = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})[0]
    index["weight_map"][key] = wrong
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape(f"index {index_file} maps '{key}' to {wrong}, "
                                                       "which does not hold it")):
        CausalLM.from_pretrained(tmp_path)
    index["weight_map"][key] = "model-09999-of-09999.safetensors"  # a shard that is not there at all
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model-09999-of-09999\.safetensors: shard named in .* does not exist"):
        CausalLM.from_pretrained(tmp_path)


def test_unknown_model_type_is_named(tmp_path, hf_checkpoints):
    folder = _copy(hf_checkpoints["bert_base"][0], tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="llama"):
        Encoder.from_pretrained(folder)


def test_wrong_head_for_family(hf_checkpoints):
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        CausalLM.from_pretrained(hf_checkpoints["bert_base"][0])


def test_config_round_trip(hf_checkpoints):
    for name in ["bert_seq", "gpt2_lm"]:
        d = json.loads((hf_checkpoints[name][0] / "config.json").read_text())
        config = ModelConfig.from_hf_dict(d)
        again = ModelConfig.from_hf_dict(config.to_hf_dict())
        assert again == config
    assert ModelConfig.from_hf_dict(json.loads((hf_checkpoints["bert_seq"][0] / "config.json").read_text())).num_labels == 3
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig().replace(hiden_size=3)
