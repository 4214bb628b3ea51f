"""What a run leaves in its folder: metrics.jsonl (strict JSON, peak memory, no step twice after a resume) and
checkpoints that reach the disk before they get their name, rotated to the last K plus the best."""

import json
import os
from pathlib import Path

import pytest
import torch

from scratchformer import CausalLM
from scratchformer.train import Trainer, TrainConfig
from scratchformer.train.checkpoints import list_checkpoints, save_checkpoint
from tests.train.test_trainer import NO_DROPOUT, lm_batches


def tiny_config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=4, lr=3e-3, log_every=1, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def strict_records(out) -> list[dict]:
    """metrics.jsonl parsed as standard JSON: NaN / Infinity, which Python's json would accept, are an error."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def poison_gradient(model, steps: set[int]):
    """Make one weight's gradient inf in the backward passes numbered `steps` (1-based), as an fp16 overflow does."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] in steps else grad

    model.body.blocks[0].mlp.up.weight.register_hook(hook)


def _peak_rss_from_proc() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc (Linux)")
def test_every_record_has_peak_memory_on_the_cpu(hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    with open("/proc/self/statm") as f:
        resident_before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    cfg = tiny_config(tmp_path, max_steps=3)
    Trainer(CausalLM.from_pretrained(folder, **NO_DROPOUT), cfg, train_data=lm_batches(3, 97)).train()
    records = [r for r in strict_records(cfg.out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:  # in bytes between what was resident before and the kernel's own peak mark after;
        # round(): bytes / 1e9 * 1e9 can land one ulp below the byte count, rounding gives it back exactly
        assert resident_before <= round(r["peak_memory_gb"] * 1e9) <= _peak_rss_from_proc(), r


def test_a_skipped_step_has_a_null_grad_norm(hf_tiny, tmp_path, torch_optimizer_paths):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    model = CausalLM.from_pretrained(folder, **NO_DROPOUT)
    poison_gradient(model, {2})
    cfg = tiny_config(tmp_path, max_steps=3)
    history = Trainer(model, cfg, train_data=lm_batches(3, 97)).train()
    assert history[1]["grad_norm"] == float("inf") and history[1]["skipped"]  # the callbacks see the number
    records = strict_records(cfg.out)
    assert [r["grad_norm"] is None for r in records] == [False, True, False]
    assert records[1]["skipped"] is True and "skipped" not in records[0]


class Killed(Exception):
    pass


def test_resume_drops_the_records_after_the_checkpoint(hf_tiny, tmp_path, torch_optimizer_paths):
    """A run killed at step 4 logged step 3 after its last checkpoint (step 2), and its last line half: resumed,
    the file holds every step once and equals the unbroken run's records."""
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(6, 97)

    def run(name, resume=False, callbacks=()):
        cfg = tiny_config(tmp_path / name, max_steps=6, save_every=2)
        Trainer(CausalLM.from_pretrained(folder, **NO_DROPOUT), cfg, train_data=batches,
                callbacks=callbacks).train(resume=resume)
        return Path(cfg.out)

    def kill_at_step_4(record):
        if record.get("step") == 4:
            raise Killed

    with pytest.raises(Killed):
        run("split", callbacks=[kill_at_step_4])
    out = tmp_path / "split" / "run"
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert [r["step"] for r in strict_records(out)] == [1, 2, 3]
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # torn by the kill
    run("split", resume=True)
    resumed = [r for r in strict_records(out) if "event" not in r]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    straight = [r for r in strict_records(run("straight")) if "event" not in r]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]


def test_checkpoint_reaches_the_disk_before_its_name(hf_tiny, tmp_path, monkeypatch):
    """Every file and the folder are fsynced before the rename that names the checkpoint, the run folder after."""
    folder, _ = hf_tiny("gpt2")
    model = CausalLM.from_pretrained(folder)
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(src), Path(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "run"
    for _ in range(2):  # the second time replaces the checkpoint of the same step
        events.clear()
        final = save_checkpoint(out, 5, model, {"step": 5}, {"eval_loss": 1.0})
        renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
        assert len(renames) == 1
        tmp = events[renames[0]][1]
        synced_before = {e[1] for e in events[:renames[0]] if e[0] == "fsync"}
        files = {tmp / p.name for p in final.iterdir()}
        assert {"model.safetensors", "config.json", "trainer_state.pt", "info.json"} <= {p.name for p in files}
        assert files | {tmp} <= synced_before
        assert ("fsync", out) in events[renames[0] + 1:]
    assert [p.name for p in out.iterdir()] == ["checkpoint-000005"]  # nothing temporary or replaced left


def test_a_replacement_that_never_arrives_leaves_the_old_folder(hf_tiny, tmp_path, monkeypatch):
    """Saving a step again moves the old folder aside before the new one takes its name. If the new one never
    arrives (an error in between, or the process dying there), the old one is what the run folder holds."""
    from scratchformer.train import checkpoints

    folder, _ = hf_tiny("gpt2")
    model = CausalLM.from_pretrained(folder)
    out = tmp_path / "run"
    first = save_checkpoint(out, 5, model, {"step": 5, "marker": 1}, {"eval_loss": 1.0})
    real_rename = Path.rename

    def fail_on_arrival(self, target):
        if Path(target) == first and self.name.startswith(checkpoints.TMP_PREFIX) and "replaced" not in self.name:
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", fail_on_arrival)
    with pytest.raises(OSError, match="disk gone"):
        save_checkpoint(out, 5, model, {"step": 5, "marker": 2}, {"eval_loss": 0.5})
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == ["checkpoint-000005"]
    assert torch.load(first / "trainer_state.pt", weights_only=True)["marker"] == 1
    # A process killed between the two renames: only the moved-aside folder is left; listing restores it.
    first.rename(out / f"{checkpoints.TMP_PREFIX}checkpoint-000005-k1ll3d_x{checkpoints.REPLACED_SUFFIX}")
    assert list_checkpoints(out) == [(5, first)]
    assert torch.load(first / "trainer_state.pt", weights_only=True)["marker"] == 1
