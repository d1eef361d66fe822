"""Time `inspectd fit randword` (prompt generation, text encoding, FFN training) with the ViT-B-16-plus-240 text tower.

Random weights (demo) stand in for the real ones: the cost is the same. `--sample-pairs M` encodes only M
pairs and trains on N synthetic embeddings, then reports the full-N time as measured parts, labelled.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from inspectd.detectors.backbone import ClipBackbone, ModelSpec
from inspectd.detectors.training.randword_ffn import (
    PromptConfig,
    TrainConfig,
    encode_prompts,
    fit_randword_ffn,
    generate_pairs,
    train_ffn,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="ViT-B-16-plus-240")
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--sample-pairs", type=int, default=0,
                        help="encode only this many pairs; train on --pairs synthetic embeddings (0 = full fit)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    backbone = ClipBackbone(ModelSpec(arch=args.arch, pretrained="random", demo=True, device=args.device))
    print(f"{args.arch} random weights, {backbone.device}, {torch.get_num_threads()} threads, "
          f"embed dim {backbone.embed_dim}")
    if not args.sample_pairs:
        start = time.perf_counter()
        bundle = fit_randword_ffn(backbone, PromptConfig(), TrainConfig(pairs=args.pairs), progress=True)
        total = time.perf_counter() - start
        print(f"fit N={args.pairs}: {total:.1f} s (final loss {bundle.history[-1]['loss']:.4f})")
        return

    start = time.perf_counter()
    pairs = generate_pairs(args.pairs, PromptConfig(), seed=0)
    generate_s = time.perf_counter() - start
    sample = [p for pair in pairs[:args.sample_pairs] for p in pair]
    start = time.perf_counter()
    encode_prompts(backbone, sample, progress=True)
    encode_s = time.perf_counter() - start
    per_prompt = encode_s / len(sample)
    g = torch.Generator().manual_seed(0)
    normal = F.normalize(torch.randn(args.pairs, backbone.embed_dim, generator=g), dim=-1)
    anomalous = F.normalize(torch.randn(args.pairs, backbone.embed_dim, generator=g), dim=-1)
    start = time.perf_counter()
    train_ffn(normal, anomalous, TrainConfig(pairs=args.pairs), progress=False)
    train_s = time.perf_counter() - start
    encode_full = per_prompt * 2 * args.pairs
    print(f"generate {args.pairs} pairs: {generate_s:.2f} s (measured)")
    print(f"encode {len(sample)} prompts: {encode_s:.1f} s = {1e3 * per_prompt:.1f} ms/prompt (measured)")
    print(f"train FFN on {args.pairs} pairs, 2 epochs: {train_s:.1f} s (measured)")
    print(f"fit N={args.pairs}: {generate_s + encode_full + train_s:.0f} s "
          f"(encode of {2 * args.pairs} prompts extrapolated linearly: {encode_full:.0f} s)")


if __name__ == "__main__":
    main()
