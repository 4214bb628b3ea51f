"""The Trainer's features one by one, on tiny models: fp16 loss scaling (an overflowed step is skipped and the
scale halved), bf16 autocast, gradient checkpointing (the same losses and gradients), checkpoint rotation
(the last K plus the best, min and max), the evaluation cadence, and which parameters get weight decay."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from scratchformer import CausalLM, MaskedLM, SequenceClassifier, apply_lora
from scratchformer.train import Trainer, TrainConfig
from scratchformer.train.checkpoints import list_checkpoints
from scratchformer.train.trainer import parameter_groups
from tests.train.test_run_folder import poison_gradient, strict_records
from tests.train.test_trainer import NO_DROPOUT, lm_batches


def tiny_config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=3, lr=3e-3, warmup_steps=2, log_every=1, progress=False,
                device="cpu")
    return TrainConfig(**{**base, **kw})


def snapshot_after_each_step(model, into: list):
    """A callback keeping a copy of every parameter at each training record (log_every=1: after each step)."""

    def callback(record):
        if "loss" in record:
            into.append({n: p.detach().clone() for n, p in model.named_parameters()})

    return callback


def test_fp16_overflow_skips_the_step_and_halves_the_scale(hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
    poison_gradient(model, {2})  # step 2's gradients overflow
    weights = []
    trainer = Trainer(model, tiny_config(tmp_path, precision="fp16"), train_data=lm_batches(3, 97),
                      callbacks=[snapshot_after_each_step(model, weights)])
    history = trainer.train()
    assert [r.get("skipped", False) for r in history if "loss" in r] == [False, True, False]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name  # the skipped step changed nothing
    assert any(not torch.equal(weights[1][n], weights[2][n]) for n in weights[0])  # the next one trains
    lrs = [r["lr"] for r in history if "loss" in r]
    assert lrs[0] == lrs[1] < lrs[2]  # warmup: the schedule did not move on the skipped step
    scaler = trainer.scaler
    assert scaler.scale.item() == 2.0**15 and scaler.good_steps.item() == 1  # halved, then one clean step
    steps = {float(s["step"]) for s in trainer.optimizer.state_dict()["state"].values()}
    assert steps == {2.0}  # AdamW's own step count skipped it too
    assert [r["grad_norm"] is None for r in strict_records(tmp_path / "run")] == [False, True, False]

    scaler.good_steps.zero_()
    clean = torch.zeros(())
    for i in range(2000):  # GradScaler's growth rule: after 2000 clean steps the scale doubles
        assert scaler.scale.item() == 2.0**15, i
        scaler.update(clean)
    assert scaler.scale.item() == 2.0**16 and scaler.good_steps.item() == 0
    for _ in range(20):  # overflows halve it down to 1, never below
        scaler.update(torch.ones(()))
    assert scaler.scale.item() == 1.0 and scaler.at_floor().item() == 1.0


def test_bf16_autocast_trains_close_to_fp32(hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(3, 97)
    runs = {}
    for precision in ("fp32", "bf16"):
        model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
        history = Trainer(model, tiny_config(tmp_path / precision, precision=precision), train_data=batches).train()
        runs[precision] = (model, [r["loss"] for r in history if "loss" in r])
    (model, bf16), (_, fp32) = runs["bf16"], runs["fp32"]
    assert bf16 != fp32  # autocast really ran in bf16
    for a, b in zip(bf16, fp32):
        assert abs(a - b) <= 0.02 * b, (bf16, fp32)  # bf16 keeps ~3 significant digits
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast leaves the weights in fp32


def _counting_checkpoint(monkeypatch):
    import scratchformer.engine.transformer as encoder

    calls = {"n": 0}
    real = encoder.checkpoint

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder, "checkpoint", counting)
    return calls


def test_gradient_checkpointing_gives_the_same_losses_and_gradients(hf_tiny, tmp_path, monkeypatch,
                                                                    torch_optimizer_paths):
    """With dropout on (the recomputation must replay the same masks): the same gradients after one backward,
    the same losses and weights after a few Trainer steps, and the blocks really were recomputed."""
    folder, _ = hf_tiny("gpt2")
    calls = _counting_checkpoint(monkeypatch)
    batch = lm_batches(1, 97)[0]
    grads = {}
    for on in (False, True):
        model = CausalLM.from_pretrained(folder).train()
        model.body.gradient_checkpointing = on
        torch.manual_seed(5)
        model(**batch).loss.backward()
        grads[on] = {n: p.grad for n, p in model.named_parameters()}
        assert (calls["n"] > 0) == on
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, rtol=1e-6, atol=1e-7), name

    runs = {}
    for on in (False, True):
        calls["n"] = 0
        model = CausalLM.from_pretrained(folder)
        history = Trainer(model, tiny_config(tmp_path / str(on), gradient_checkpointing=on),
                          train_data=lm_batches(3, 97)).train()
        runs[on] = ([r["loss"] for r in history if "loss" in r], dict(model.named_parameters()))
        assert (calls["n"] > 0) == on
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6)
    for name, p in runs[False][1].items():
        assert torch.allclose(runs[True][1][name], p, rtol=1e-5, atol=1e-6), name


class ScriptedEval:
    """An eval_fn returning the next of `scores` at each call, as `score`."""

    def __init__(self, scores):
        self.scores = list(scores)

    def __call__(self, model, batches):
        return {"score": self.scores.pop(0)}


@pytest.mark.parametrize("mode,best", [("min", 3), ("max", 2)])
def test_rotation_keeps_the_last_k_and_the_best(mode, best, hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(5, 97)
    cfg = tiny_config(tmp_path, max_steps=5, eval_every=1, save_every=1, keep_last=2, best_metric="eval_score",
                      best_mode=mode)
    Trainer(CausalLM.from_pretrained(folder, **NO_DROPOUT), cfg, train_data=batches, eval_data=batches[:1],
            eval_fn=ScriptedEval([3.0, 9.0, 1.0, 4.0, 5.0])).train()
    out = Path(cfg.out)
    assert [s for s, _ in list_checkpoints(out)] == sorted({best, 4, 5})
    info = json.loads((out / f"checkpoint-{best:06d}" / "info.json").read_text())
    assert info["step"] == best and info["eval_score"] == {2: 9.0, 3: 1.0}[best]


@pytest.mark.parametrize("eval_every,steps", [(3, [3, 6, 7]), (0, [7]), (1, [1, 2, 3, 4, 5, 6, 7])])
def test_eval_every_cadence(eval_every, steps, hf_tiny, tmp_path, torch_optimizer_paths):
    """Every eval_every steps, and always at the last one (0: only there)."""
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(7, 97)
    history = Trainer(CausalLM.from_pretrained(folder, **NO_DROPOUT), tiny_config(tmp_path, max_steps=7,
                      eval_every=eval_every, log_every=7), train_data=batches, eval_data=batches[:1]).train()
    assert [r["step"] for r in history if "eval_loss" in r] == steps


def _expected_no_decay(model: nn.Module) -> set[str]:
    """Independently of the name markers: parameters of Embedding and LayerNorm modules, and every bias."""
    spared = (nn.Embedding, nn.LayerNorm)
    names = set()
    for module_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            if p.requires_grad and (isinstance(module, spared) or leaf.endswith("bias")):
                names.add(f"{module_name}.{leaf}" if module_name else leaf)
    return names


@pytest.mark.parametrize("kind", ["gpt2", "bert_mlm", "bert_seq", "bert_seq_lora"])
def test_weight_decay_spares_exactly_biases_layernorms_and_embeddings(kind, hf_tiny):
    folder, _ = hf_tiny(kind.removesuffix("_lora"))
    model = {"gpt2": CausalLM, "bert_mlm": MaskedLM}.get(kind, SequenceClassifier).from_pretrained(folder)
    if kind.endswith("lora"):
        apply_lora(model, r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model, weight_decay=0.1)
    by_decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in groups}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert by_decay[0.0] == _expected_no_decay(model)
    assert by_decay[0.1] == trainable - by_decay[0.0]
    assert all(model.get_parameter(n).dim() == 2 for n in by_decay[0.1])  # only matrices decay


def test_a_clipped_step_reads_the_gradients_once_for_the_norm(hf_tiny, tmp_path, monkeypatch):
    """The Trainer measures the norm (finite: every gradient is), then hands AdamW the clip divisor and a
    found_inf flag of 0, so AdamW does not start a second non-finite check over every gradient (that the
    clipped steps still equal torch's clipping + AdamW is test_trainer's reference parity)."""
    from scratchformer.train import optim

    calls = []
    real = optim.nonfinite_check_
    monkeypatch.setattr(optim, "nonfinite_check_", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
    records = Trainer(model, tiny_config(tmp_path, max_grad_norm=0.01), train_data=lm_batches(3, 97)).train()
    norms = [r["grad_norm"] for r in records if "loss" in r]
    assert len(norms) == 3 and all(n > 0.01 for n in norms)  # every step was clipped (divisor != 1)
    assert calls == []


def test_evaluate_loss_weights_each_batch_by_its_labelled_tokens(hf_tiny):
    """The default eval: the mean over every labelled token of all batches (not the mean of the batch means),
    summed on the device and read once; perplexity is its exp."""
    from scratchformer.train.trainer import evaluate_loss

    folder, _ = hf_tiny("bert_mlm", no_dropout=True)
    model = MaskedLM.from_pretrained(folder, **NO_DROPOUT).eval()
    batches = lm_batches(3, 101, mlm=True, seed=7)
    batches[1]["labels"][:, 4:] = -100  # far fewer labelled tokens than the others
    with torch.no_grad():
        total = sum(torch.nn.functional.cross_entropy(model(**b).logits.flatten(0, 1), b["labels"].flatten(),
                                                      ignore_index=-100, reduction="sum") for b in batches)
        count = sum(int((b["labels"] != -100).sum()) for b in batches)
        metrics = evaluate_loss(model, batches)
    assert metrics["loss"] == pytest.approx(total.item() / count, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-12)
