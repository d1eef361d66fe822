"""`inspectd fit`: train what a method learns offline; today `fit randword` writes the random-word FFN file."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("fit", help="train a method's learned part offline (e.g. the randword FFN)")
    sub = parser.add_subparsers(dest="fit_method", required=True, metavar="METHOD")
    rw = sub.add_parser("randword", help="train the random-word prompt FFN on CLIP text embeddings",
                        description="Generate N random-word prompt pairs, encode them with the CLIP text "
                                    "encoder, train the FFN and save it (tied to this CLIP model).")
    rw.add_argument("--out", required=True, help="FFN file to write (.safetensors)")
    rw.add_argument("--arch", default="ViT-B-16-plus-240", help="open_clip arch (default %(default)s)")
    rw.add_argument("--pretrained", default="laion400m_e31",
                    help="open_clip tag or checkpoint path; 'random' only with --demo (default %(default)s)")
    rw.add_argument("--demo", action="store_true", help="allow --pretrained random (the FFN is meaningless)")
    rw.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    rw.add_argument("--pairs", type=int, default=10_000, help="random-word prompt pairs (default %(default)s)")
    rw.add_argument("--epochs", type=int, default=2)
    rw.add_argument("--seed", type=int, default=0)
    rw.add_argument("--object-word", default="object", help="object word of the prompts, or a category name")
    rw.add_argument("--normal-word", default="a")
    rw.add_argument("--anomaly-word", default="a damaged")
    rw.add_argument("--hidden", default="512,256,128", help="hidden widths, comma separated")
    rw.add_argument("--dropout", type=float, default=0.5)
    rw.add_argument("--lr", type=float, default=1e-3)
    rw.add_argument("--weight-decay", type=float, default=1e-4)
    rw.add_argument("--batch-size", type=int, default=128, help="prompts per batch (even: whole pairs)")
    rw.add_argument("--no-progress", action="store_true", help="no progress bars")
    rw.set_defaults(func=randword_main)


def randword_main(args: argparse.Namespace) -> int:
    from inspectd.detectors import weights
    from inspectd.detectors.backbone import DEMO_WARNING, ClipBackbone, ModelSpec
    from inspectd.detectors.training.randword_ffn import PromptConfig, TrainConfig, fit_randword_ffn, save_ffn

    try:
        prompts = PromptConfig(normal_word=args.normal_word, anomaly_word=args.anomaly_word,
                               object_word=args.object_word)
        train = TrainConfig(pairs=args.pairs, epochs=args.epochs, seed=args.seed, dropout=args.dropout,
                            hidden=tuple(int(h) for h in args.hidden.split(",") if h.strip()),
                            lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size)
    except ValueError as exc:
        print(f"inspectd fit randword: {exc}", file=sys.stderr)
        return 2
    if args.pretrained == weights.RANDOM_WEIGHTS and args.demo:
        banner = "!" * 100
        print(f"{banner}\n!! {DEMO_WARNING}\n!! The FFN written to {args.out} is trained on a RANDOM text encoder "
              f"and is useless with real weights.\n{banner}", file=sys.stderr)
    try:
        backbone = ClipBackbone(ModelSpec(arch=args.arch, pretrained=args.pretrained, device=args.device,
                                          demo=args.demo))
    except (weights.WeightsNotFoundError, weights.RandomWeightsNotAllowed) as exc:
        print(f"inspectd fit randword: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    bundle = fit_randword_ffn(backbone, prompts, train, progress=not args.no_progress)
    path = save_ffn(bundle, args.out)
    last = bundle.history[-1] if bundle.history else {}
    print(f"wrote {path}: FFN for CLIP {bundle.model_id} (dim {bundle.embed_dim}), {train.pairs} pairs, "
          f"seed {train.seed}, final loss {last.get('loss', float('nan')):.4f}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0
