"""TrainConfig(compile=True) and TrainConfig(cuda_graphs=True): the same losses as the plain run.

What runs where. The CPU compiles the torch paths (inductor's C++ backend; the model's default on a CPU):
compile=True is tested end to end here. The Triton kernels under torch.compile, and CUDA graphs at all, need a
GPU: those tests are marked `gpu` and skip on a CPU, where cuda_graphs=True is refused with one clear line.
"""

import warnings

import pytest
import torch

from scratchformer import CausalLM, SequenceClassifier, apply_lora
from scratchformer.train import Trainer, TrainConfig
from scratchformer.train.cuda_graph import CapturedStep
from tests.train.test_trainer import NO_DROPOUT, _classification_batches, assert_losses_close, lm_batches

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def config(tmp_path, **kw):
    base = dict(out=str(tmp_path / "run"), max_steps=4, lr=3e-3, warmup_steps=2, max_grad_norm=0.5, log_every=1,
                progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def losses_and_weights(model, cfg, batches):
    history = Trainer(model, cfg, train_data=batches).train()
    return [r["loss"] for r in history if "loss" in r], {n: p.detach().float().cpu() for n, p in model.named_parameters()}


def assert_same_run(a, b, rel):
    assert_losses_close(a[0], b[0], rel=rel)
    for name, p in b[1].items():
        assert torch.allclose(a[1][name], p, rtol=rel, atol=rel * p.abs().max().item()), name


def test_compile_trains_like_eager_on_the_cpu(hf_tiny, tmp_path, torch_optimizer_paths):
    """GPT-2 on the CPU's torch paths, compiled by inductor: losses and weights within 1e-5 of the eager run."""
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    batches = lm_batches(4, 97, batch=2, seq=9)
    eager = losses_and_weights(CausalLM.from_pretrained(folder, **NO_DROPOUT), config(tmp_path / "e"), batches)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = losses_and_weights(CausalLM.from_pretrained(folder, **NO_DROPOUT),
                                  config(tmp_path / "c", compile=True), batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # inductor really compiled the model
    assert_same_run(compiled, eager, rel=1e-5)


def test_cuda_graphs_are_refused_without_cuda(hf_tiny, tmp_path):
    folder, _ = hf_tiny("gpt2", no_dropout=True)
    with pytest.raises(ValueError, match=r"^cuda_graphs=True needs a CUDA device; this run trains on cpu$"):
        Trainer(CausalLM.from_pretrained(folder), config(tmp_path, cuda_graphs=True), train_data=[])
    with pytest.raises(ValueError, match=r"^cuda_graphs cannot capture gradient_checkpointing"):
        TrainConfig(cuda_graphs=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        CapturedStep(lambda batches: None, torch.device("cpu"))


# ---- on a GPU ------------------------------------------------------------------------------------------------


def gpu_model(hf_tiny, kind):
    """GPT-2 (causal LM) or a BERT classifier with LoRA, on the GPU's default paths (every Triton kernel)."""
    if kind == "gpt2":
        folder, _ = hf_tiny("gpt2", no_dropout=True)
        return CausalLM.from_pretrained(folder, **NO_DROPOUT)
    folder, _ = hf_tiny("bert_seq", no_dropout=True)
    model = SequenceClassifier.from_pretrained(folder, **NO_DROPOUT)
    apply_lora(model, r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    return model


def gpu_batches(kind, n):
    return lm_batches(n, 97, batch=3, seq=13) if kind == "gpt2" else _classification_batches(n)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kind,precision,accum", [("gpt2", "fp32", 1), ("gpt2", "bf16", 2), ("gpt2", "fp16", 1),
                                                  ("bert_lora", "bf16", 1)])
def test_cuda_graphs_train_like_eager(kind, precision, accum, hf_tiny, tmp_path):
    """Two eager warm-up steps, a capture, replays on new batches: the losses and weights of the uncaptured run
    (the same kernels on the same numbers: within 1e-6). A last batch of another shape runs eagerly, with a
    warning, and changes nothing in that."""
    steps = 7
    batches = gpu_batches(kind, steps * accum)
    last = batches[-1]
    batches[-1] = {k: v[:2] for k, v in last.items()}  # fewer rows: not the captured shape
    runs = {}
    for graphs in (False, True):
        cfg = config(tmp_path / str(graphs), max_steps=steps, precision=precision, grad_accum=accum, device="cuda",
                     cuda_graphs=graphs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[graphs] = losses_and_weights(gpu_model(hf_tiny, kind), cfg, batches)
        assert any("ran without the graph" in str(w.message) for w in caught) == graphs
    assert_same_run(runs[True], runs[False], rel=1e-6)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("kind,precision", [("gpt2", "fp16"), ("bert_lora", "bf16")])
def test_no_sync_in_steps_that_log_nothing(kind, precision, graphs, hf_tiny, tmp_path, monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") from the start of each step to the start of the next, except
    after a step that writes a record or a checkpoint (they read once) and while the graph is captured (the
    capture itself synchronises, once): any synchronising call there raises."""
    steps, log_every = 7, 3
    cfg = config(tmp_path, max_steps=steps, precision=precision, device="cuda", cuda_graphs=graphs,
                 log_every=log_every)
    real_setup = Trainer._setup

    def setup(self):
        real_setup(self)
        step = self.run_step

        def run_step(batches):
            torch.cuda.set_sync_debug_mode("error")
            step(batches)
            k = self.step + 1
            if k % log_every == 0 or k == steps:
                torch.cuda.set_sync_debug_mode("default")

        self.run_step = run_step

    real_capture = CapturedStep._capture

    def capture(self, batches):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        real_capture(self, batches)
        torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(Trainer, "_setup", setup)
    monkeypatch.setattr(CapturedStep, "_capture", capture)
    try:
        history = Trainer(gpu_model(hf_tiny, kind), cfg, train_data=gpu_batches(kind, steps)).train()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [r["step"] for r in history if "loss" in r] == [3, 6, 7]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("graphs", [False, True])
def test_compile_on_the_gpu_trains_like_eager(graphs, hf_tiny, tmp_path):
    """compile=True over the Triton kernels (and inside a captured step): within 1e-5 of the eager run."""
    batches = gpu_batches("gpt2", 5)
    eager = losses_and_weights(gpu_model(hf_tiny, "gpt2"), config(tmp_path / "e", max_steps=5, device="cuda"),
                               batches)
    torch._dynamo.reset()
    compiled = losses_and_weights(gpu_model(hf_tiny, "gpt2"), config(tmp_path / "c", max_steps=5, device="cuda",
                                                                    compile=True, cuda_graphs=graphs), batches)
    assert_same_run(compiled, eager, rel=1e-5)
