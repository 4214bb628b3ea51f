"""No host reads inside a training step: on a GPU each one stalls the CPU until the GPU has caught up (and makes
a CUDA graph capture fail). A spy counts every read of a tensor's value on the host while the Trainer runs:

- Tensor.tolist and Tensor.numpy (and so numpy.asarray(tensor)), which read without dispatching an op;
- the aten ops that hand a value to the host or size their result by the data: `_local_scalar_dense` (behind
  .item(), bool(t), int(t), float(t), t.__index__, f"{t:.2f}"), nonzero, masked_select, unique, equal,
  indexing with a boolean mask, repeat_interleave without output_size.

Reads made by Triton's interpreter do not count (on a GPU that code is the kernel, running on the device), nor
those of the functions in HOST_ONLY (they read only tensors that stay on the CPU, on a GPU machine too).
The Trainer runs every kernel the GPU default runs (backend="triton": flash attention, fused LayerNorm,
bias+GELU, linear cross-entropy; LoRA backend "triton"; AdamW and the norm under the interpreter), in fp32,
bf16 and fp16 (with an overflowing, skipped step), with and without clipping, dropout, LoRA and gradient
accumulation. Steps that write no record read nothing; a step that writes one reads once (every value of
the record in one tolist). On a GPU the same is checked with torch.cuda.set_sync_debug_mode("error").
"""

import contextlib
import os
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scratchformer import CausalLM, SequenceClassifier, apply_lora
from scratchformer.train import Trainer, TrainConfig
from tests.train.test_run_folder import poison_gradient
from tests.train.test_trainer import _classification_batches, lm_batches

aten = torch.ops.aten
READING_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten._unique, aten._unique2,
               aten.unique_dim, aten.unique_consecutive, aten.equal}
TRITON_DIR = os.sep + "triton" + os.sep

# Functions whose reads are of CPU tensors on any machine (a CPU test cannot tell them from device reads).
HOST_ONLY = {
    "_launch_table": "a multi-tensor kernel's launch table, built on the host from sizes and addresses",
    "drop_full_mask": "the mask-free shortcut, taken only for a mask on the CPU (a GPU's mask is passed on)",
}


def _bool_index(indices) -> bool:
    return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)


def _reads_on_host(func, args, kwargs) -> bool:
    packet = func.overloadpacket
    if packet in READING_OPS:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_):
        return _bool_index(args[1])
    if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor):
        return kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None)
    return False


def _not_a_device_read() -> bool:
    """Inside Triton's interpreter (kernel code) or a HOST_ONLY function."""
    return any(TRITON_DIR in f.f_code.co_filename or f.f_code.co_name in HOST_ONLY for f in _frames())


class HostReadSpy(TorchDispatchMode):
    """Counts host reads per phase: `phase` is whatever the test sets; reads while it is None are not kept."""

    def __init__(self):
        super().__init__()
        self.phase = None
        self.reads: dict = {}  # phase -> [description of each read]

    def note(self, what: str) -> None:
        if self.phase is not None and not _not_a_device_read():
            caller = next((f"{f.f_code.co_filename.rsplit(os.sep, 1)[-1]}:{f.f_lineno}"
                           for f in _frames() if "test_host_reads" not in f.f_code.co_filename
                           and os.sep + "torch" + os.sep not in f.f_code.co_filename), "?")
            self.reads.setdefault(self.phase, []).append(f"{what} at {caller}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _reads_on_host(func, args, kwargs):
            self.note(str(func))
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching(self, monkeypatch):
        for name in ("tolist", "numpy"):
            real = getattr(torch.Tensor, name)

            def read(t, *a, _real=real, _name=name, **k):
                self.note(f"Tensor.{_name}")
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, read)
        with self:
            yield self
        self.phase = None


def _frames():
    frame = sys._getframe(3)
    while frame is not None:
        yield frame
        frame = frame.f_back


def phases_of_each_step(monkeypatch, spy: HostReadSpy) -> None:
    """Set spy.phase to ("step", k) while step k runs (Trainer.run_step) and to ("after", k) for the host work
    that follows it (a record, an evaluation, a checkpoint), until step k + 1 starts."""
    real_setup = Trainer._setup

    def setup(self):
        real_setup(self)
        step = self.run_step

        def run_step(batches):
            spy.phase = ("step", self.step + 1)
            step(batches)
            spy.phase = ("after", self.step + 1)

        self.run_step = run_step

    monkeypatch.setattr(Trainer, "_setup", setup)


def gpt2(hf_tiny, dropout: bool):
    folder, _ = hf_tiny("gpt2", no_dropout=not dropout)
    extra = {} if dropout else dict(hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)
    return CausalLM.from_pretrained(folder, backend="triton", **extra)


def bert_lora(hf_tiny, dropout: bool):
    folder, _ = hf_tiny("bert_seq", no_dropout=not dropout)
    extra = {} if dropout else dict(hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)
    model = SequenceClassifier.from_pretrained(folder, backend="triton", **extra)
    apply_lora(model, r=3, alpha=6, dropout=0.1 if dropout else 0.0, target_modules=["query", "value"],
               modules_to_save=["classifier"], backend="triton")
    return model


CASES = {  # name -> (model builder, dropout, TrainConfig settings, fp16 overflow at these steps)
    "fp32 clip dropout": (gpt2, True, dict(precision="fp32", max_grad_norm=0.5), set()),
    "bf16 no clip": (gpt2, False, dict(precision="bf16", max_grad_norm=None), set()),
    "fp16 clip overflow": (gpt2, False, dict(precision="fp16", max_grad_norm=1.0), {3}),
    "fp32 lora accum padding": (bert_lora, True, dict(precision="fp32", grad_accum=2), set()),
}
STEPS, LOG_EVERY = 4, 2  # a record after step 2; step 4 (the last) also saves the checkpoint and final/


@pytest.mark.parametrize("case", list(CASES))
def test_steps_read_nothing_and_a_record_reads_once(case, hf_tiny, tmp_path, monkeypatch):
    build, dropout, settings, overflow = CASES[case]
    model = build(hf_tiny, dropout)
    if overflow:
        poison_gradient(model, {b * settings.get("grad_accum", 1) for b in overflow})
    if build is gpt2:
        batches = lm_batches(STEPS, 97, batch=2, seq=9)
    else:
        # two padded rows (7 and 9 real tokens of 9) per micro-batch: the interpreter's attention is slow
        batches = [{k: v[1:3, :9] if v.dim() == 2 else v[1:3] for k, v in b.items()}
                   for b in _classification_batches(STEPS * settings.get("grad_accum", 1))]
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=STEPS, lr=1e-3, log_every=LOG_EVERY, progress=False,
                      device="cpu", **settings)
    spy = HostReadSpy()
    phases_of_each_step(monkeypatch, spy)
    trainer = Trainer(model, cfg, train_data=batches)
    with spy.watching(monkeypatch):
        history = trainer.train()
    reads = {phase: found for phase, found in spy.reads.items()
             if phase != ("after", STEPS)}  # the end's checkpoint and final/ read what they save
    expected = {("after", k): 1 for k in range(LOG_EVERY, STEPS, LOG_EVERY)}  # the records' one read each
    counted = {phase: len(found) for phase, found in reads.items() if found}
    assert counted == expected, {p: r for p, r in reads.items() if len(r) != expected.get(p, 0)}
    assert all(r.startswith("Tensor.tolist at trainer.py") for k in expected for r in reads[k]), reads
    records = [r for r in history if "loss" in r]
    assert [r["step"] for r in records] == [2, 4]
    if overflow:  # the overflowing step was really skipped (steps 2 and 4 were not: no skip in their records)
        assert trainer.optimizer.state[trainer.params[0]]["step"].item() == STEPS - len(overflow)
        assert trainer.scaler.scale.item() == 2.0**15 and not any(r.get("skipped") for r in records)
