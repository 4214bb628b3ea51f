"""benchmarks/engine.py refuses to time a model whose logits are not transformers'."""

import pytest
import torch

from benchmarks.engine import LOGITS_TOL, check_same_logits
from scratchformer.engine import CausalLM, MaskedLM

from .conftest import padded_batch


@pytest.mark.parametrize("name, ours_cls", [("bert_mlm", MaskedLM), ("gpt2_lm", CausalLM)])
def test_benchmark_checks_logits_before_timing(hf_checkpoints, name, ours_cls):
    folder, hf = hf_checkpoints[name]
    ours = ours_cls.from_pretrained(folder)
    ids, mask, _ = padded_batch(hf.config.vocab_size, [9, 9], seed=8)
    assert check_same_logits(name, ours, hf, ids, mask, LOGITS_TOL["cpu"]) <= 1e-5
    with torch.no_grad():  # one wrong LayerNorm scale: a model that still runs, just not the same function
        next(p for n, p in ours.named_parameters() if n.endswith("ln_mlp.weight")).mul_(1.01)
    with pytest.raises(SystemExit, match="not timing a wrong model"):
        check_same_logits(name, ours, hf, ids, mask, LOGITS_TOL["cpu"])
