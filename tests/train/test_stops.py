"""How a run stops early: a loss that stays NaN or inf (NonFiniteLoss, naming the steps; the checkpoints before it
kept, nothing written after), and Ctrl-C (the step finishes, a checkpoint of it is written, TrainingInterrupted
says where; resuming from it ends where the unbroken run ends; a second Ctrl-C stops at once)."""

import os
import signal
from pathlib import Path

import pytest
import torch

from scratchformer import CausalLM
from scratchformer.train import Trainer, TrainConfig
from scratchformer.train.checkpoints import latest_checkpoint, list_checkpoints
from scratchformer.train.interrupt import TrainingInterrupted
from scratchformer.train.trainer import NonFiniteLoss
from tests.train.test_run_folder import strict_records
from tests.train.test_trainer import NO_DROPOUT, lm_batches


def tiny_config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=12, lr=3e-3, log_every=1, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def poison_from(model, first: int, kind: str = "grad"):
    """From backward pass `first` on (1-based), make the gradients NaN ("grad") or inf ("overflow": an fp16 scale
    too large at any scale), or make the forward's loss NaN from forward pass `first` on ("loss")."""
    calls = {"backward": 0, "forward": 0}
    weight = model.body.blocks[0].mlp.up.weight
    if kind == "loss":
        def forward_hook(module, args, output):
            calls["forward"] += 1
            return output * float("nan") if calls["forward"] >= first else output

        model.body.blocks[0].mlp.register_forward_hook(forward_hook)
        return

    def hook(grad):
        calls["backward"] += 1
        if calls["backward"] < first:
            return grad
        return torch.full_like(grad, float("nan") if kind == "grad" else float("inf"))

    weight.register_hook(hook)


def _model(hf_tiny):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    return CausalLM.from_pretrained(folder, **NO_DROPOUT)


@pytest.mark.parametrize("precision,kind", [("fp32", "grad"), ("bf16", "loss")])
def test_a_loss_that_stays_nonfinite_stops_the_run(precision, kind, hf_tiny, tmp_path, torch_optimizer_paths):
    """NaN from step 5 on, three in a row allowed, a record every 2 steps: the check after step 8 stops the run
    (steps 5-8 failed), naming the steps and the checkpoint of step 4, which holds the weights of step 4 and is
    still there; nothing was saved after it, and there is no final/."""
    model = _model(hf_tiny)
    poison_from(model, 5, kind)
    cfg = tiny_config(tmp_path, precision=precision, log_every=2, save_every=4, keep_last=1, stop_after_nonfinite=3)
    weights = {}
    trainer = Trainer(model, cfg, train_data=lm_batches(12, 97),
                      callbacks=[lambda r: r.get("step") == 4 and "loss" in r and weights.update(
                          {n: p.detach().clone() for n, p in model.named_parameters()})])
    with pytest.raises(NonFiniteLoss) as stop:
        trainer.train()
    out = Path(cfg.out)
    message = str(stop.value)
    assert message.startswith("training stopped at step 8: the loss or its gradients were NaN or inf at 4 steps "
                              "in a row (5 to 8); those steps were skipped"), message
    assert f"the last checkpoint is {out / 'checkpoint-000004'}" in message and "\n" not in message
    assert [s for s, _ in list_checkpoints(out)] == [4] and not (out / "final").exists()
    records = strict_records(out)
    assert records[-1] == {"step": 8, "event": "stopped", "reason": message.split(": ", 1)[1].rsplit("; ", 1)[0]}
    assert [r["grad_norm"] is None for r in records if "loss" in r] == [False, False, True, True]
    for name, p in model.named_parameters():  # the failed steps changed nothing
        assert torch.equal(p, weights[name]), name


def test_a_stop_comes_before_a_checkpoint(hf_tiny, tmp_path, torch_optimizer_paths):
    """Records only at the end, a checkpoint every 3 steps, NaN from step 4: the look at the failures before
    the checkpoint of step 6 stops the run; checkpoint 3 is kept, no checkpoint 6 is written."""
    model = _model(hf_tiny)
    poison_from(model, 4)
    cfg = tiny_config(tmp_path, log_every=100, save_every=3, stop_after_nonfinite=3)
    with pytest.raises(NonFiniteLoss, match=r"^training stopped at step 6: .* 3 steps in a row \(4 to 6\)"):
        Trainer(model, cfg, train_data=lm_batches(12, 97)).train()
    assert [s for s, _ in list_checkpoints(Path(cfg.out))] == [3]


def test_a_streak_that_ended_between_two_checks_still_stops(hf_tiny, tmp_path, torch_optimizer_paths):
    """Steps 3-5 fail, step 6 does not (a hook that heals): the record of step 6 still stops the run, naming the
    streak, which began before the previous record."""
    model = _model(hf_tiny)
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if 3 <= calls["n"] <= 5 else grad

    model.body.blocks[0].mlp.up.weight.register_hook(hook)
    cfg = tiny_config(tmp_path, log_every=3, stop_after_nonfinite=3)
    with pytest.raises(NonFiniteLoss, match=r"^training stopped at step 6: .* 3 steps in a row \(3 to 5\)"):
        Trainer(model, cfg, train_data=lm_batches(12, 97)).train()


@pytest.mark.parametrize("limit,steps", [(3, 2), (0, 9)])
def test_fewer_failures_than_the_limit_or_no_limit_train_on(limit, steps, hf_tiny, tmp_path, torch_optimizer_paths):
    """Two failed steps in a row under a limit of 3 (or all the last 9 with stop_after_nonfinite=0): the run ends
    normally, those steps skipped."""
    model = _model(hf_tiny)
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if 4 <= calls["n"] < 4 + steps else grad

    model.body.blocks[0].mlp.up.weight.register_hook(hook)
    history = Trainer(model, tiny_config(tmp_path, stop_after_nonfinite=limit), train_data=lm_batches(12, 97)).train()
    assert [r["step"] for r in history if r.get("skipped")] == list(range(4, 4 + steps))
    assert (Path(tmp_path) / "run" / "final").is_dir()


def test_fp16_overflows_stop_only_at_the_smallest_scale(hf_tiny, tmp_path, torch_optimizer_paths):
    """Every step from step 2 on overflows: the scale halves from 2**16 to 1 (steps 2-17, normal fp16 skips),
    then three overflows at scale 1 (steps 18-20) stop the run."""
    model = _model(hf_tiny)
    poison_from(model, 2, "overflow")
    cfg = tiny_config(tmp_path, precision="fp16", max_steps=30, stop_after_nonfinite=3)
    trainer = Trainer(model, cfg, train_data=lm_batches(30, 97))
    with pytest.raises(NonFiniteLoss, match=r"^training stopped at step 20: .* 3 steps in a row \(18 to 20, "
                                            r"at the smallest fp16 loss scale\)"):
        trainer.train()
    assert trainer.scaler.scale.item() == 1.0


def _interrupt_at(step: int):
    """A callback sending this process SIGINT (Ctrl-C) when the record of `step` is written."""

    def callback(record):
        if record.get("step") == step and "loss" in record:
            os.kill(os.getpid(), signal.SIGINT)

    return callback


def test_ctrl_c_finishes_the_step_saves_it_and_resumes_to_the_same_end(hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(6, 97)

    def run(name, resume=False, callbacks=()):
        model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
        history = Trainer(model, tiny_config(tmp_path / name, max_steps=6, save_every=4), train_data=batches,
                          callbacks=callbacks).train(resume=resume)
        return model, [r["loss"] for r in history if "loss" in r]

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stopped:
        run("split", callbacks=[_interrupt_at(3)])
    out = tmp_path / "split" / "run"
    assert isinstance(stopped.value, KeyboardInterrupt)  # code that catches Ctrl-C still does
    assert stopped.value.step == 3 and stopped.value.checkpoint == out / "checkpoint-000003"
    assert [s for s, _ in list_checkpoints(out)] == [3] and not (out / "final").exists()
    assert strict_records(out)[-1] == {"step": 3, "event": "interrupted"}
    assert signal.getsignal(signal.SIGINT) is handler  # the usual Ctrl-C again
    _, second = run("split", resume=True)
    straight_model, straight = run("straight")
    first = [r["loss"] for r in strict_records(out) if "loss" in r][:3]
    assert first + second == straight
    resumed = CausalLM.from_pretrained(out / "final")
    for (name, a), (_, b) in zip(straight_model.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_second_ctrl_c_stops_at_once(hf_tiny, tmp_path, monkeypatch, torch_optimizer_paths):
    """The second Ctrl-C comes while the interrupted step's checkpoint is being written: a plain KeyboardInterrupt
    at once; the checkpoint of step 2 stays whole and nothing half-written is left."""
    model = _model(hf_tiny)
    cfg = tiny_config(tmp_path, max_steps=6, save_every=2)
    real_save = torch.save

    def save_interrupted_again(obj, path, *a, **kw):
        if isinstance(obj, dict) and obj.get("step") == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", save_interrupted_again)
    with pytest.raises(KeyboardInterrupt) as stopped:
        Trainer(model, cfg, train_data=lm_batches(6, 97), callbacks=[_interrupt_at(3)]).train()
    assert not isinstance(stopped.value, TrainingInterrupted)
    out = Path(cfg.out)
    assert latest_checkpoint(out).name == "checkpoint-000002" and [s for s, _ in list_checkpoints(out)] == [2]
    assert not list(out.glob(".tmp-*"))
