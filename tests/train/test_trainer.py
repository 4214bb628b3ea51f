"""The training loop against a reference loop written here with `transformers`, `torch.optim.AdamW`, `LambdaLR`
(and `peft` for LoRA): same initial weights, same batches, per-step losses within 1e-5 relative (fp32, no dropout).
"""

import json
import math
from pathlib import Path

import pytest
import torch

from scratchformer import CausalLM, MaskedLM, SequenceClassifier, apply_lora, save_adapter
from scratchformer.train import Trainer, TrainConfig
from scratchformer.train.checkpoints import latest_checkpoint, list_checkpoints

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)
STEPS = 20


def reference_schedule(warmup, total, min_ratio=0.0):
    """Linear warmup from 0, then cosine decay to min_ratio: the schedule TrainConfig(decay="cosine") describes."""

    def f(step):
        if step < warmup:
            return step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def reference_losses(model, batches, cfg: TrainConfig):
    """A plain PyTorch loop: what our Trainer must reproduce step for step."""
    no_decay_markers = ("bias", "LayerNorm", "ln_", "wte", "wpe", "embeddings")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(m in name for m in no_decay_markers) or p.dim() < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, reference_schedule(cfg.warmup_steps, cfg.max_steps))
    params = decay + no_decay
    model.train()
    with torch.no_grad():  # the untrained model's losses on the same batches: training must move away from them
        it = iter(batches)
        frozen = [sum(model(**next(it)).loss.item() / cfg.grad_accum for _ in range(cfg.grad_accum))
                  for _ in range(cfg.max_steps)]
    losses, it = [], iter(batches)
    for _ in range(cfg.max_steps):
        total = 0.0
        for _ in range(cfg.grad_accum):
            loss = model(**next(it)).loss / cfg.grad_accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total)
    moved = max(abs(a - b) / abs(b) for a, b in zip(losses, frozen))
    assert moved > 1e-3, f"the reference run barely trained (max relative change {moved:.1e}): parity would be vacuous"
    return losses


def our_losses(model, batches, cfg):
    history = Trainer(model, cfg, train_data=batches).train()
    return [r["loss"] for r in history if "loss" in r and "step" in r and "eval_loss" not in r]


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=STEPS, lr=3e-3, warmup_steps=4, weight_decay=0.1,
                max_grad_norm=0.5, log_every=1, progress=False, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def lm_batches(n, vocab, batch=3, seq=13, seed=0, mlm=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # Counting sequences (each token is the previous + a per-row stride): learnable, so the loss must fall.
        start = torch.randint(1, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + stride * torch.arange(seq)) % (vocab - 1) + 1
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if mlm:
            labels = labels.masked_fill(torch.rand(ids.shape, generator=g) > 0.3, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def assert_losses_close(ours, ref, rel=1e-5):
    assert len(ours) == len(ref)
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert abs(a - b) <= rel * abs(b), f"step {step}: ours {a} vs reference {b}"


def test_causal_pretraining_matches_reference(hf_tiny, tmp_path):
    folder, hf = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(STEPS, 97)
    cfg = config(tmp_path)
    ref = reference_losses(hf, batches, cfg)
    ours = our_losses(CausalLM.from_pretrained(folder, **NO_DROPOUT), batches, cfg)
    assert_losses_close(ours, ref)


def test_mlm_pretraining_matches_reference(hf_tiny, tmp_path):
    folder, hf = hf_tiny("bert_mlm", no_dropout=True)
    batches = lm_batches(STEPS, 101, mlm=True)
    cfg = config(tmp_path)
    assert_losses_close(our_losses(MaskedLM.from_pretrained(folder, **NO_DROPOUT), batches, cfg),
                        reference_losses(hf, batches, cfg))


def _classification_batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 101, (4, 11), generator=g)
        lengths = torch.tensor([11, 7, 9, 4])
        mask = (torch.arange(11)[None] < lengths[:, None]).long()
        # The label is a function of the first token, so the classifier has something to learn.
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": ids[:, 0] % 3})
    return out


def test_sequence_classification_matches_reference(hf_tiny, tmp_path):
    folder, hf = hf_tiny("bert_seq", no_dropout=True)
    batches = _classification_batches(STEPS)
    cfg = config(tmp_path)
    assert_losses_close(our_losses(SequenceClassifier.from_pretrained(folder, **NO_DROPOUT), batches, cfg),
                        reference_losses(hf, batches, cfg))


def test_lora_finetuning_matches_peft(hf_tiny, tmp_path):
    folder, hf = hf_tiny("bert_seq", no_dropout=True)
    ours = SequenceClassifier.from_pretrained(folder, **NO_DROPOUT)
    apply_lora(ours, r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # start from a nonzero B so both A and B move from step one
    save_adapter(ours, tmp_path / "init")  # PEFT starts from exactly our adapter
    ref_model = peft.PeftModel.from_pretrained(hf, tmp_path / "init", is_trainable=True)
    batches = _classification_batches(STEPS, seed=1)
    cfg = config(tmp_path)
    ref = reference_losses(ref_model, batches, cfg)
    assert_losses_close(our_losses(ours, batches, cfg), ref)


def test_gradient_accumulation_equals_double_batch(hf_tiny, tmp_path):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    halves = lm_batches(2 * 8, 97, batch=2, seq=9, seed=3)
    doubled = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(halves[0::2], halves[1::2])]
    accum = our_losses(CausalLM.from_pretrained(folder, **NO_DROPOUT), halves, config(tmp_path / "a", max_steps=8, grad_accum=2))
    big = our_losses(CausalLM.from_pretrained(folder, **NO_DROPOUT), doubled, config(tmp_path / "b", max_steps=8))
    assert_losses_close(accum, big)


def test_resume_continues_the_same_run(hf_tiny, tmp_path):
    from scratchformer.tokenize import TokenBlockLoader

    folder, _ = hf_tiny("gpt2", no_dropout=True)
    tokens = torch.randint(0, 97, (5000,)).numpy()

    def run(out, resume=False, stop_after=None):
        model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
        data = TokenBlockLoader(tokens, batch_size=2, block_size=16, seed=5)
        cfg = config(out, max_steps=20, save_every=5, keep_last=1)
        history = Trainer(model, cfg, train_data=data).train(resume=resume, stop_after=stop_after)
        return model, [r["loss"] for r in history if "loss" in r]

    straight_model, straight = run(tmp_path / "straight")
    _, first = run(tmp_path / "resumed", stop_after=10)
    assert len(first) == 10 and not (tmp_path / "resumed" / "run" / "final").exists()
    resumed_model, second = run(tmp_path / "resumed", resume=True)
    assert first + second == straight  # bit-identical losses
    for (n, a), (_, b) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(a, b), n
    run_dir = tmp_path / "resumed" / "run"
    assert [s for s, _ in list_checkpoints(run_dir)] == [20]  # keep_last=1, no eval metric to keep a best
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resumed" and r["step"] == 10 for r in records) and records[-1]["step"] == 20
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_resume_at_the_end_of_an_epoch(hf_tiny, tmp_path, torch_optimizer_paths):
    """A checkpoint taken right after an epoch's last batch: the resumed loader finds that epoch's remainder empty
    and the run goes on with the next epoch, as the unbroken run did."""
    from scratchformer.tokenize import ExampleLoader

    folder, _ = hf_tiny("gpt2", no_dropout=True)
    rows = list(torch.randint(0, 97, (6, 9)))  # 3 batches of two per epoch

    def run(out, **kw):
        model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
        data = ExampleLoader(rows, lambda b: {"input_ids": torch.stack(b), "labels": torch.stack(b)}, batch_size=2)
        history = Trainer(model, config(out, max_steps=6, save_every=3), train_data=data).train(**kw)
        return [r["loss"] for r in history if "loss" in r]

    straight = run(tmp_path / "straight")
    assert run(tmp_path / "split", stop_after=3) + run(tmp_path / "split", resume=True) == straight


def test_killed_checkpoint_write_leaves_previous_loadable(hf_tiny, tmp_path, monkeypatch):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(12, 97, seed=4)
    cfg = config(tmp_path, max_steps=12, save_every=5, keep_last=3)
    calls = {"n": 0}
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):  # the second checkpoint dies half-way (after the model was written)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Trainer(CausalLM.from_pretrained(folder, **NO_DROPOUT), cfg, train_data=batches).train()
    out = Path(cfg.out)
    assert latest_checkpoint(out).name == "checkpoint-000005"
    assert not list(out.glob(".tmp-checkpoint-*"))
    reloaded = CausalLM.from_pretrained(latest_checkpoint(out))  # an ordinary HF folder
    assert reloaded.config.num_layers == 2


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


@pytest.mark.parametrize("setting,match", [
    (dict(grad_accum=1.5), r"^grad_accum must be an integer \(got 1.5\)$"),
    (dict(max_steps=2.5), "^max_steps must be an integer"),
    (dict(max_steps=True), "^max_steps must be an integer"),  # a bool is an int to Python, not to us
    (dict(lr="3e-4"), "^lr must be a number"),
    (dict(max_grad_norm="1"), "^max_grad_norm must be a number or None"),
    (dict(compile="no"), "^compile must be true or false"),
    (dict(precision=None), "^precision must be a string"),
    (dict(device=0), "^device must be a string or None"),
])
def test_config_values_of_the_wrong_type_are_named(setting, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**setting)


def test_config_takes_integers_for_numbers_and_paths_for_out(tmp_path):
    import numpy as np

    cfg = TrainConfig(out=tmp_path / "run", lr=1, max_grad_norm=0, max_steps=np.int64(5))
    assert cfg.lr == 1.0 and type(cfg.lr) is float and type(cfg.max_grad_norm) is float
    assert cfg.max_steps == 5 and type(cfg.max_steps) is int and cfg.out == str(tmp_path / "run")


def test_resume_without_checkpoint_is_an_error(hf_tiny, tmp_path):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    with pytest.raises(ValueError, match="no checkpoint"):
        Trainer(CausalLM.from_pretrained(folder), config(tmp_path), train_data=lm_batches(2, 97)).train(resume=True)
