"""Loaders: causal-LM blocks from a token file and example batches, deterministic and resumable."""

import numpy as np
import pytest
import torch

from scratchformer.tokenize import ExampleLoader, TokenBlockLoader, TokenFile, prepare_corpus, train_tokenizer

DOCS = [f"document {i}: the quick brown fox number {i * 7} jumps over the lazy dog" for i in range(60)]


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "c.txt").write_text("\n".join(DOCS) + "\n")
    tok = train_tokenizer(DOCS, kind="bpe", vocab_size=300, min_frequency=1)
    prepare_corpus(folder / "c.txt", tok, folder / "out", show_progress=False)
    return folder / "out"


def test_blocks_are_slices_of_the_file(token_dir):
    tf = TokenFile(token_dir)
    tokens = np.asarray(tf.tokens).astype(np.int64)
    loader = TokenBlockLoader(tf, batch_size=5, block_size=17, seed=3)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (5, 17) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].eq(1).all()
    for row, off in zip(batch["input_ids"], loader.offsets(0)):
        assert row.tolist() == tokens[off: off + 17].tolist()
    # documents are packed with EOS between them: a long enough block crosses a boundary
    wide = TokenBlockLoader(tf, batch_size=4, block_size=60, seed=0).batch(0)["input_ids"]
    assert (wide == tf.separator_id).any()
    # offsets cover the file, last possible start included
    starts = np.concatenate([loader.offsets(s) for s in range(2000)])
    assert starts.min() == 0 and starts.max() == len(tokens) - 17


def test_block_loader_deterministic_and_resumable(token_dir):
    a = TokenBlockLoader(token_dir, batch_size=3, block_size=9, seed=11)
    it = iter(a)
    run = [next(it)["input_ids"] for _ in range(6)]
    state = {"seed": 11, "step": 4}
    b = TokenBlockLoader(token_dir, batch_size=3, block_size=9, seed=0)
    b.load_state_dict(state)
    it_b = iter(b)
    assert torch.equal(next(it_b)["input_ids"], run[4]) and torch.equal(next(it_b)["input_ids"], run[5])
    assert a.state_dict() == {"seed": 11, "step": 6}
    assert not torch.equal(run[0], run[1])
    c = TokenBlockLoader(token_dir, batch_size=3, block_size=9, seed=12)
    assert not torch.equal(c.batch(0)["input_ids"], run[0])


def test_sequential_pass(token_dir):
    tf = TokenFile(token_dir)
    loader = TokenBlockLoader(tf, batch_size=4, block_size=10, random=False)
    batches = list(loader)
    assert len(batches) == loader.num_sequential_batches == len(tf) // 10 // 4
    flat = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    assert flat.tolist() == np.asarray(tf.tokens[: len(flat)]).astype(np.int64).tolist()


def test_example_loader_resume_mid_epoch():
    examples = list(range(23))

    def collate(xs):
        return {"x": torch.tensor(xs)}

    full = ExampleLoader(examples, collate, batch_size=4, seed=5)
    epoch0 = [b["x"].tolist() for b in full]
    epoch1 = [b["x"].tolist() for b in full]
    assert sorted(sum(epoch0, [])) == examples and epoch0 != epoch1 and len(epoch0) == len(full) == 6
    part = ExampleLoader(examples, collate, batch_size=4, seed=5)
    it = iter(part)
    first = [next(it)["x"].tolist() for _ in range(3)]
    state = part.state_dict()
    resumed = ExampleLoader(examples, collate, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert first + [b["x"].tolist() for b in resumed] == epoch0
    assert [b["x"].tolist() for b in resumed] == epoch1
    ordered = ExampleLoader(examples, collate, batch_size=10, shuffle=False, drop_last=True)
    assert [b["x"].tolist() for b in ordered] == [list(range(10)), list(range(10, 20))]


def test_loader_errors(token_dir):
    with pytest.raises(ValueError, match="fewer than block_size"):
        TokenBlockLoader(np.arange(5), batch_size=1, block_size=6)
    with pytest.raises(ValueError, match="must be positive"):
        TokenBlockLoader(np.arange(50), batch_size=0, block_size=6)
    with pytest.raises(ValueError, match="1-D"):
        TokenBlockLoader(np.zeros((4, 4)), batch_size=1, block_size=2)
    with pytest.raises(IndexError, match="past the end"):
        TokenBlockLoader(np.arange(50), batch_size=2, block_size=5, random=False).batch(5)
    with pytest.raises(ValueError, match="examples is empty"):
        ExampleLoader([], lambda x: x, batch_size=2)
