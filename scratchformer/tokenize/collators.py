"""Collators: turn a list of examples into one batch of tensors, ready for the models.

Each collator is a callable `collate(examples) -> dict[str, torch.Tensor]` with `input_ids`,
`attention_mask` (1 = real token, 0 = padding), `token_type_ids` where the tokenizer uses them, and
`labels` (-100 where no loss is taken, the convention of every model's loss). All tensors are int64
`[batch, seq]` except sequence-classification labels (`[batch]`).

Causal-LM labels are the input ids themselves (not shifted): the model shifts them, as in transformers.

- `MLMCollator`: BERT masking: 15% of the real, non-special tokens are chosen; of those 80% become
  `[MASK]`, 10% a random token, 10% stay; labels are the original ids there and -100 elsewhere.
- `SequenceClassificationCollator`: texts (and optional text pairs) padded to the longest, integer labels.
- `TokenClassificationCollator`: word lists with one label per word (NER); each word's label goes on its
  first sub-token, -100 on its other sub-tokens and on special and padding tokens.
- `SFTCollator`: prompt + response for a causal LM; loss only on the response (and the closing EOS).

Randomness (MLM only) comes from a generator seeded by (seed, step), where step counts calls; the state
is that one integer (`state_dict()` / `load_state_dict()`), so a resumed run masks exactly like an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from scratchformer.tokenize.tokenizer import Tokenizer

IGNORE_INDEX = -100


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """A torch CPU generator whose stream depends only on (seed, step), well mixed by SeedSequence."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Stack lists of ids of different lengths into `[batch, max_len]`, filling with `pad_value`."""
    longest = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), longest), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            t = torch.as_tensor(s, dtype=torch.long)
            if side == "right":
                out[i, : len(s)] = t
            else:
                out[i, longest - len(s):] = t
    return out


def _check_examples(examples: Sequence[Any], what: str) -> None:
    if not isinstance(examples, (list, tuple)) or len(examples) == 0:
        raise ValueError(f"{what} needs a non-empty list of examples, got {type(examples).__name__} "
                         f"of length {len(examples) if hasattr(examples, '__len__') else '?'}")


class MLMCollator:
    """Masked-LM batches (BERT pretraining). See the module docstring for the recipe.

    Examples may be lists / 1-D tensors of ids (already with [CLS] ... [SEP]), dicts with "input_ids"
    (and optionally "token_type_ids"), or strings (tokenised here with truncation to `max_length`).
    Random replacement tokens are drawn uniformly from the non-special ids.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        mlm_probability: float = 0.15,
        mask_fraction: float = 0.8,
        random_fraction: float = 0.1,
        max_length: int | None = None,
        seed: int = 0,
    ):
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("MLMCollator needs a tokenizer with a mask token and a pad token")
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
            raise ValueError(f"mask_fraction ({mask_fraction}) + random_fraction ({random_fraction}) must be "
                             "non-negative and at most 1")
        self.tokenizer = tokenizer
        self.mlm_probability = mlm_probability
        self.mask_fraction = mask_fraction
        self.random_fraction = random_fraction
        self.max_length = max_length
        self.seed = seed
        self.step = 0
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
        vocab = torch.arange(tokenizer.vocab_size)
        self._random_pool = vocab[~torch.isin(vocab, self.special_ids)]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        _check_examples(examples, "MLMCollator")
        tok = self.tokenizer
        if all(isinstance(e, str) for e in examples):
            enc = tok(list(examples), truncation=True, max_length=self.max_length, return_token_type_ids=True)
            ids, types = enc["input_ids"], enc["token_type_ids"]
        else:
            ids, types = [], []
            for i, e in enumerate(examples):
                if isinstance(e, dict):
                    if "input_ids" not in e:
                        raise ValueError(f"MLMCollator: example {i} has no 'input_ids'")
                    row = e["input_ids"]
                    types.append(list(e.get("token_type_ids", [0] * len(row))))
                elif isinstance(e, (list, tuple, torch.Tensor, np.ndarray)):
                    row = e
                    types.append([0] * len(row))
                else:
                    raise TypeError(f"MLMCollator: example {i} must be ids, a dict or a str, got {type(e).__name__}")
                ids.append([int(x) for x in row])
        input_ids = pad_sequences(ids, tok.pad_token_id)
        attention_mask = pad_sequences([[1] * len(r) for r in ids], 0)
        token_type_ids = pad_sequences(types, 0)
        input_ids, labels = self.mask(input_ids, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": token_type_ids, "labels": labels}

    def mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply BERT masking to `[batch, seq]` ids; returns (masked ids, labels). Advances the step."""
        g = seeded_generator(self.seed, self.step)
        self.step += 1
        candidates = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        chosen = (torch.rand(input_ids.shape, generator=g) < self.mlm_probability) & candidates
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        # One uniform draw per position splits the chosen tokens into mask / random / keep.
        u = torch.rand(input_ids.shape, generator=g)
        to_mask = chosen & (u < self.mask_fraction)
        to_random = chosen & (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        picks = torch.randint(len(self._random_pool), input_ids.shape, generator=g)
        out = input_ids.clone()
        out[to_mask] = self.tokenizer.mask_token_id
        out[to_random] = self._random_pool[picks[to_random]]
        return out, labels


class SequenceClassificationCollator:
    """Examples `{"text": str, "label": int | float, "text_pair": str (optional)}` -> padded batch.

    Integer labels give an int64 `[batch]` tensor; float labels (regression) a float32 one.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_examples(examples, "SequenceClassificationCollator")
        for i, e in enumerate(examples):
            if not isinstance(e, dict) or "text" not in e:
                raise ValueError(f"SequenceClassificationCollator: example {i} must be a dict with 'text'")
        texts = [e["text"] for e in examples]
        has_pair = ["text_pair" in e for e in examples]
        if any(has_pair) and not all(has_pair):
            raise ValueError("SequenceClassificationCollator: either every example has 'text_pair' or none does")
        pairs = [e["text_pair"] for e in examples] if all(has_pair) else None
        batch = dict(self.tokenizer(texts, pairs, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt"))
        if any("label" in e for e in examples):
            missing = [i for i, e in enumerate(examples) if "label" not in e]
            if missing:
                raise ValueError(f"SequenceClassificationCollator: examples {missing} have no 'label'")
            labels = [e["label"] for e in examples]
            dtype = torch.float32 if any(isinstance(y, float) for y in labels) else torch.long
            batch["labels"] = torch.tensor(labels, dtype=dtype)
        return batch


class TokenClassificationCollator:
    """Examples `{"words": [str, ...], "labels": [int, ...]}` (one label per word) -> padded batch.

    The label of a word goes on its first sub-token; its other sub-tokens get -100, or the same label
    with `label_all_subtokens=True`. Special and padding tokens always get -100. Words cut off by
    truncation simply lose their labels.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int | None = None, label_all_subtokens: bool = False):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_all_subtokens = label_all_subtokens

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_examples(examples, "TokenClassificationCollator")
        for i, e in enumerate(examples):
            if not isinstance(e, dict) or "words" not in e or "labels" not in e:
                raise ValueError(f"TokenClassificationCollator: example {i} must be a dict with 'words' and 'labels'")
            if len(e["words"]) != len(e["labels"]):
                raise ValueError(f"TokenClassificationCollator: example {i} has {len(e['words'])} words but "
                                 f"{len(e['labels'])} labels")
        enc = self.tokenizer([list(e["words"]) for e in examples], is_split_into_words=True, padding=True,
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        labels = torch.full_like(enc["input_ids"], IGNORE_INDEX)
        for row, e in enumerate(examples):
            previous = None
            for pos, word in enumerate(enc.word_ids(row)):
                if word is not None and (word != previous or self.label_all_subtokens):
                    labels[row, pos] = int(e["labels"][word])
                previous = word
        batch = dict(enc)
        batch["labels"] = labels
        return batch


class SFTCollator:
    """Examples `{"prompt": str, "response": str}` -> a causal-LM batch with loss on the response only.

    input_ids = prompt ids + response ids + [eos]; labels = -100 on the prompt and on padding, the ids
    themselves on the response and its eos (the model shifts labels). Prompt and response are tokenised
    separately, so the boundary is exact. Sequences longer than `max_length` are cut from the right
    (the prompt is kept); an example whose prompt alone fills `max_length` is an error (no response left
    to learn from). Padding is on the right with the pad token (or eos when the tokenizer has none).
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int | None = None, add_eos: bool = True):
        if add_eos and tokenizer.eos_token_id is None:
            raise ValueError("SFTCollator: the tokenizer has no eos token; pass add_eos=False")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.add_eos = add_eos
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("SFTCollator: the tokenizer has neither a pad nor an eos token to pad with")
        self.pad_id = pad

    def __call__(self, examples: Sequence[dict[str, str]]) -> dict[str, torch.Tensor]:
        _check_examples(examples, "SFTCollator")
        for i, e in enumerate(examples):
            if not isinstance(e, dict) or "prompt" not in e or "response" not in e:
                raise ValueError(f"SFTCollator: example {i} must be a dict with 'prompt' and 'response'")
        tok = self.tokenizer
        prompts = tok([e["prompt"] for e in examples], add_special_tokens=False)["input_ids"]
        responses = tok([e["response"] for e in examples], add_special_tokens=False)["input_ids"]
        ids, labels = [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            r = r + [tok.eos_token_id] if self.add_eos else r
            if self.max_length is not None:
                if len(p) >= self.max_length:
                    raise ValueError(f"SFTCollator: example {i}: the prompt has {len(p)} tokens, no room for the "
                                     f"response within max_length={self.max_length}")
                r = r[: self.max_length - len(p)]
            ids.append(p + r)
            labels.append([IGNORE_INDEX] * len(p) + r)
        return {
            "input_ids": pad_sequences(ids, self.pad_id),
            "attention_mask": pad_sequences([[1] * len(x) for x in ids], 0),
            "labels": pad_sequences(labels, IGNORE_INDEX),
        }
