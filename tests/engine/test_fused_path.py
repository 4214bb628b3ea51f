"""The engine's `triton` path runs our fused kernels (LayerNorm with the residual add, bias + GELU, linear
cross-entropy) and computes the same function as the plain `eager` path.

Two tiny random models with odd sizes (BERT MLM: head_dim 11, token types, padding; GPT-2: head_dim 7,
padding), the same weights on both paths. Compared: the loss (relative error <= 1e-5 in fp32), every
parameter's gradient (max |diff| / max |eager grad| <= GRAD_TOL), a bf16 model (both paths as close to fp32
as bf16 allows), and a 20-step AdamW run (loss curves within 1e-4 relative). Triton runs under its
interpreter on the CPU (tests/conftest.py), on the GPU if any.
"""

import pytest
import torch

import scratchformer.kernels as kernels
from scratchformer.engine import CausalLM, MaskedLM, ModelConfig
from scratchformer.engine.lora import apply_lora
from scratchformer.train import AdamW

from .conftest import max_rel_err, padded_batch

LOSS_TOL = 1e-5  # fp32: the kernels reorder sums (fp32 statistics, chunked softmax), nothing else changes
GRAD_TOL = 1e-4  # gradients pass through several more reordered sums (dW, db reductions over row blocks)
CURVE_TOL = 1e-4
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0, embedding_dropout=0.0)

BERT = ModelConfig(model_type="bert", vocab_size=61, hidden_size=33, num_layers=2, num_heads=3, intermediate_size=29,
                   max_positions=16, type_vocab_size=2, norm_eps=1e-12, activation="gelu", norm_placement="post",
                   fused_qkv=False, initializer_range=0.2, **NO_DROPOUT)
GPT2 = ModelConfig(model_type="gpt2", vocab_size=53, hidden_size=28, num_layers=2, num_heads=4, intermediate_size=37,
                   max_positions=16, type_vocab_size=0, norm_eps=1e-5, activation="gelu_new", norm_placement="pre",
                   fused_qkv=True, pad_token_id=None, initializer_range=0.2, **NO_DROPOUT)
FAMILIES = {"bert": (MaskedLM, BERT), "gpt2": (CausalLM, GPT2)}


@pytest.fixture(autouse=True)
def _one_thread():
    """One CPU thread: on tensors this small every op is pure threading overhead, and on a busy machine
    the plain path's steps then cost as much as the interpreted kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_pair(family, device, seed=0, **overrides):
    """The same random model twice: on the `eager` and on the `triton` path. LayerNorm weights and every
    bias (zero and one at init) are randomised too, so that each is tested. overrides: ModelConfig fields."""
    cls, config = FAMILIES[family]
    config = config.replace(**overrides)
    torch.manual_seed(seed)
    eager = cls.from_config(config.replace(backend="eager"), device=device)
    with torch.no_grad():
        for p in eager.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    fused = cls(config.replace(backend="triton")).to(device)
    fused.load_state_dict(eager.state_dict())
    return eager.train(), fused.train()


def make_batch(family, device, seed, lengths=None):
    """Padded inputs and labels (-100 at padding; BERT: on a random ~40% of the real tokens only)."""
    config = FAMILIES[family][1]
    lengths = lengths or ([13, 7, 10] if family == "bert" else [11, 13])
    ids, mask, types = padded_batch(config.vocab_size, lengths, seed=seed, type_vocab=config.type_vocab_size)
    labels = ids.masked_fill(mask == 0, -100)
    if family == "bert":
        g = torch.Generator().manual_seed(seed + 1)
        labels = labels.masked_fill(torch.rand(ids.shape, generator=g) > 0.4, -100)
        labels[:, 1] = ids[:, 1]  # at least one predicted token per row
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if types is not None:
        batch["token_type_ids"] = types
    return {k: v.to(device) for k, v in batch.items()}


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_triton_path_matches_eager_loss_and_gradients(device, family):
    eager, fused = make_pair(family, device)
    batch = make_batch(family, device, seed=3)
    want, want_grads = loss_and_grads(eager, batch)
    got, grads = loss_and_grads(fused, batch)
    assert got.loss.dtype == torch.float32
    assert max_rel_err(got.loss, want.loss) <= LOSS_TOL
    assert got.logits is None  # training with labels: the fused loss never builds the logits
    assert grads.keys() == want_grads.keys() == {n for n, _ in eager.named_parameters()}
    for name, g in grads.items():
        if name.endswith("key.bias"):  # softmax cancels a key bias: its true gradient is 0 (rounding noise)
            assert (g - want_grads[name]).abs().max() <= 1e-6, name
            continue
        assert max_rel_err(g, want_grads[name]) <= GRAD_TOL, name


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_fused_kernels_are_called(device, family, monkeypatch):
    """Spy on the names the engine imports at call time: each kernel runs, the residual add goes into the norm."""
    calls = {"layer_norm": [], "bias_gelu": [], "linear_cross_entropy": []}
    for name in calls:
        original = getattr(kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name].append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kernels, name, spy)
    eager, fused = make_pair(family, device)
    batch = make_batch(family, device, seed=5)
    fused(**batch).loss.backward()
    layers = FAMILIES[family][1].num_layers
    # BERT: embeddings, 2 per block (both fused with their residual), MLM head. GPT-2: 2 per block (ln_mlp
    # fused with the residual), final norm.
    norms, fused_adds = (1 + 2 * layers + 1, 2 * layers) if family == "bert" else (2 * layers + 1, layers)
    assert len(calls["layer_norm"]) == norms
    assert sum(kw.get("residual") is not None for kw in calls["layer_norm"]) == fused_adds
    assert len(calls["bias_gelu"]) == layers + (family == "bert")  # the FFNs, and BERT's MLM transform
    assert len(calls["linear_cross_entropy"]) == 1
    assert (calls["linear_cross_entropy"][0].get("bias") is not None) == (family == "bert")

    # The plain path never touches a kernel.
    for c in calls.values():
        c.clear()
    eager(**batch).loss.backward()
    assert not any(calls.values())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_no_grad_with_labels_returns_logits(device, family):
    """Evaluation needs the logits (accuracy): under no_grad the head computes them and the same loss."""
    eager, fused = make_pair(family, device)
    batch = make_batch(family, device, seed=7)
    with torch.no_grad():
        want, got = eager.eval()(**batch), fused.eval()(**batch)
    vocab = FAMILIES[family][1].vocab_size
    assert got.logits is not None and got.logits.shape == (*batch["input_ids"].shape, vocab)
    real = batch["attention_mask"].bool()
    assert max_rel_err(got.logits, want.logits, real) <= LOSS_TOL
    assert max_rel_err(got.loss, want.loss) <= LOSS_TOL


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bfloat16_model_on_the_triton_path(device, family):
    """A bf16 model: the kernels take half-precision inputs (fp32 maths inside), the loss stays fp32 as on the
    plain path, and both paths are as close to the fp32 model as bf16 allows (loss 5e-3, gradients 0.1 of
    each parameter's largest; a dtype or maths mistake is O(1))."""
    reference, fused = make_pair(family, device)
    plain = type(reference).from_config(reference.config, device=device)
    plain.load_state_dict(reference.state_dict())
    batch = make_batch(family, device, seed=13)
    want, want_grads = loss_and_grads(reference, batch)
    for model in (plain, fused):
        got, grads = loss_and_grads(model.to(torch.bfloat16).train(), batch)
        assert got.loss.dtype == torch.float32
        assert max_rel_err(got.loss, want.loss) <= 5e-3, model.config.backend
        for name, g in grads.items():
            assert g.dtype == torch.bfloat16 and torch.isfinite(g).all(), name
            if not name.endswith("key.bias"):  # its true gradient is 0 (see above)
                assert max_rel_err(g, want_grads[name]) <= 0.1, (model.config.backend, name)


def test_gradient_checkpointing_and_lora_on_the_ffn(device):
    """GPT-2 with LoRA on c_attn and the FFN's up projection (c_fc: the plain-maths fallback) and gradient
    checkpointing: the triton path still matches eager."""
    eager, fused = make_pair("gpt2", device)
    for model in (eager, fused):
        torch.manual_seed(11)  # the same lora_A initialisation on both
        apply_lora(model, r=3, alpha=6, target_modules=["c_attn", "c_fc"], backend="torch")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        model.body.gradient_checkpointing = True
    batch = make_batch("gpt2", device, seed=9)
    want, want_grads = loss_and_grads(eager, batch)
    got, grads = loss_and_grads(fused, batch)
    assert max_rel_err(got.loss, want.loss) <= LOSS_TOL
    assert grads.keys() == want_grads.keys() and all("lora_" in n for n in grads)
    for name, g in grads.items():
        assert max_rel_err(g, want_grads[name]) <= GRAD_TOL, name


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_training_curves_match(device, family):
    """20 AdamW steps from the same weights on the same batches: the same loss curve on both paths.
    One layer, 2 heads (head_dim 13) and 2 short rows: the interpreter runs each kernel program by program."""
    curves = {}
    for model in make_pair(family, device, num_layers=1, hidden_size=26, num_heads=2):
        optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, backend="torch")
        curve = []
        for step in range(20):
            batch = make_batch(family, device, seed=100 + step % 4, lengths=[5, 4])
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[model.config.backend] = torch.tensor(curve, dtype=torch.float64)
    eager, fused = curves["eager"], curves["triton"]
    assert eager[-1] < eager[0]  # it learns: the comparison is not between two flat lines
    assert ((fused - eager).abs() / eager.abs()).max() <= CURVE_TOL
