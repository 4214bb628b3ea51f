"""Test set-up shared by every test file.

Triton kernels run on the CPU through Triton's interpreter when there is no CUDA device. The variable must
be set before any `@triton.jit` function is defined, i.e. before scratchformer.kernels is imported, so it
lives at the very top of the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every kernel defined now, with the variable set: a test that unsets it for itself (to run torch's CPU paths)
# and happens to import the kernels first would otherwise define them for a GPU driver there is none of.
import scratchformer.kernels  # noqa: E402,F401
import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="session")
def device() -> str:
    """The device the kernels run on: the GPU when there is one, else the CPU under the interpreter."""
    return "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so a failure reproduces."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name -> (folder, HF model in eval mode): tiny random BERT and GPT-2 checkpoints written by `transformers`."""
    from tests.tiny_checkpoints import make_hf_checkpoints

    return make_hf_checkpoints(tmp_path_factory)


@pytest.fixture
def hf_tiny(hf_checkpoints):
    """hf_tiny(name, no_dropout=False) -> (folder, a fresh HF model loaded from it, in eval mode): safe to
    train and mutate. no_dropout=True zeroes every dropout probability in the HF config (for training parity)."""
    aliases = {"gpt2": "gpt2_lm", "bert": "bert_mlm"}
    zero = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                attn_pdrop=0.0, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)

    def make(name, no_dropout=False):
        folder, model = hf_checkpoints[aliases.get(name, name)]
        overrides = {k: v for k, v in zero.items() if hasattr(model.config, k)} if no_dropout else {}
        return folder, type(model).from_pretrained(folder, **overrides).eval()

    return make
