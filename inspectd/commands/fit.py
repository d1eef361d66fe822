"""`inspectd fit DETECTOR --out FILE`: train a detector's offline-learned part with its declared Trainer.

The flags after DETECTOR come from the trainer's Config dataclass (one per field, e.g. `--pairs`,
`--epochs`), plus the model flags and, for trainers that need data, `--dataset/--root/--categories`
(or `--products-dir`). `inspectd fit DETECTOR --help` lists them. Training is seeded, shows a progress
bar, checkpoints every epoch next to the output (`FILE.ckpt/`) and resumes from there when re-run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fit", help="train a detector's offline-learned part (e.g. the randword FFN)", add_help=False,
        description="Train what DETECTOR learns offline and save it as an artifact products point to. "
                    "`inspectd fit DETECTOR --help` lists that trainer's flags.")
    parser.add_argument("detector", nargs="?", metavar="DETECTOR", help="detector whose learned part to train")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.set_defaults(func=main)


def trainable_detectors() -> dict[str, Any]:
    from inspectd.detectors.base import available_detectors, detector_class

    found = {}
    for name in available_detectors():
        trainer = detector_class(name).learning.offline
        if trainer is not None:
            found[name] = trainer
    return found


def trainer_parser(name: str, trainer: Any) -> argparse.ArgumentParser:
    from inspectd.detectors.training.trainer import config_fields, parse_field

    parser = argparse.ArgumentParser(prog=f"inspectd fit {name}", description=trainer.description or None)
    parser.add_argument("--out", required=True, help="artifact file to write (.safetensors)")
    model = parser.add_argument_group("model")
    arch, pretrained = trainer.default_model
    model.add_argument("--arch", default=arch, help="open_clip arch (default: %(default)s)")
    model.add_argument("--pretrained", default=pretrained,
                       help="open_clip tag or checkpoint path; 'random' only with --demo (default: %(default)s)")
    model.add_argument("--demo", action="store_true", help="allow --pretrained random (the result is meaningless)")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    add_model_settings(model, "Train with the setting the daemon will run: the artifact records it and is refused "
                              "under the other")
    if trainer.data in ("dataset", "products"):
        data = parser.add_argument_group("data")
        data.add_argument("--dataset", default="auto", help="layout: mvtec, visa, meta, folder, auto (default)")
        data.add_argument("--root", nargs="+", help="dataset root folder(s); several are read with --dataset each")
        data.add_argument("--categories", nargs="*", help="categories to train on (default: all)")
        if trainer.data == "products":
            data.add_argument("--products-dir", help="a products folder (YAML files) instead of a dataset")
    config = parser.add_argument_group(f"{name} training")
    for field_name, tp, default, help_text in config_fields(trainer.Config):
        flag = "--" + field_name.replace("_", "-")
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        config.add_argument(flag, dest=f"cfg_{field_name}", default=None, metavar=field_name.upper(),
                            type=lambda text, tp=tp, flag=flag: _typed(parse_field, tp, text, flag),
                            help=f"{help_text} (default: {shown})" if help_text else f"(default: {shown})")
    run = parser.add_argument_group("run")
    run.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def add_model_settings(parser: Any, why: str) -> None:
    """``--precision`` and ``--quick-gelu``, taking what the daemon's ``model.precision`` / ``model.quick_gelu``
    take (`fit`, `eval`); ``why`` ends the latter's help."""
    parser.add_argument("--precision", default="auto", type=model_setting("precision"),
                        help="auto | fp32 | fp16 | bf16, as the daemon's model.precision (auto: fp32 on CPU, fp16 on "
                             "CUDA; default: %(default)s)")
    parser.add_argument("--quick-gelu", dest="quick_gelu", default="auto", type=model_setting("quick_gelu"),
                        help="auto | true | false, as the daemon's model.quick_gelu (auto: QuickGELU for OpenAI "
                             f"weights and other releases open_clip marks so; default: %(default)s). {why}")


def model_setting(key: str) -> Any:
    """An argparse type for a model setting, validated exactly as the daemon config's ``model.<key>``."""
    def parse(text: str) -> str:
        from inspectd.daemon.config import ConfigError, ModelConfig

        try:
            ModelConfig(**{key: text})
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"config error at {exc.path}: ")) from exc
        return text

    parse.__name__ = key  # argparse names the type in its "invalid <type> value" message
    return parse


def _typed(parse: Any, tp: Any, text: str, flag: str) -> Any:
    try:
        return parse(tp, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{flag}: {exc}") from exc


def main(args: argparse.Namespace) -> int:
    trainers = trainable_detectors()
    if args.detector in (None, "-h", "--help"):
        print("usage: inspectd fit DETECTOR --out FILE [flags]   (inspectd fit DETECTOR --help lists the flags)\n"
              f"detectors with an offline-trained part: {', '.join(sorted(trainers)) or 'none'}")
        return 0 if args.detector else 2
    if args.detector not in trainers:
        from inspectd.detectors.base import available_detectors

        known = available_detectors()
        why = "is not a detector" if args.detector not in known else "learns nothing offline"
        print(f"inspectd fit: {args.detector!r} {why}; trainable: {', '.join(sorted(trainers)) or 'none'}",
              file=sys.stderr)
        return 2
    trainer_cls = trainers[args.detector]
    options = trainer_parser(args.detector, trainer_cls).parse_args(args.rest)
    return run_training(args.detector, trainer_cls, options)


def run_training(name: str, trainer_cls: Any, options: argparse.Namespace) -> int:
    import dataclasses

    from inspectd.detectors import weights
    from inspectd.detectors.artifacts import save_artifact
    from inspectd.detectors.backbone import DEMO_WARNING, ClipBackbone, ModelSpec
    from inspectd.detectors.context import FitContext
    from inspectd.detectors.tiny import register_tiny_arch

    values = {k[4:]: v for k, v in vars(options).items() if k.startswith("cfg_") and v is not None}
    try:
        config = trainer_cls.Config(**values)
        data = training_data(trainer_cls, options, config)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"inspectd fit {name}: {exc}", file=sys.stderr)
        return 2
    if options.pretrained == weights.RANDOM_WEIGHTS and options.demo:
        banner = "!" * 100
        print(f"{banner}\n!! {DEMO_WARNING}\n!! What is written to {options.out} is trained on a RANDOM CLIP "
              f"and is useless with real weights.\n{banner}", file=sys.stderr)
    register_tiny_arch()
    try:
        backbone = ClipBackbone(ModelSpec(arch=options.arch, pretrained=options.pretrained, device=options.device,
                                          precision=options.precision, quick_gelu=options.quick_gelu,
                                          demo=options.demo))
    except (weights.WeightsNotFoundError, weights.RandomWeightsNotAllowed) as exc:
        print(f"inspectd fit {name}: {exc}", file=sys.stderr)
        return 2
    out = Path(options.out)
    checkpoint = out.with_name(out.name + ".ckpt")
    if options.fresh and checkpoint.exists():
        shutil.rmtree(checkpoint, ignore_errors=True)
    start = time.perf_counter()
    trainer = trainer_cls(backbone, config)
    try:
        artifact = trainer.train(data, FitContext(seed=getattr(config, "seed", 0)), checkpoint,
                                 show_progress=not options.no_progress)
    except ValueError as exc:
        fresh = " (`inspectd fit`: re-run with --fresh.)" if "different training run" in str(exc) else ""
        print(f"inspectd fit {name}: {exc}{fresh}", file=sys.stderr)
        return 2
    digest = save_artifact(artifact, out)
    shutil.rmtree(checkpoint, ignore_errors=True)
    curve = artifact.training.get("history") or []
    last = curve[-1].get("loss", float("nan")) if curve else float("nan")
    print(f"wrote {out}: {name} {artifact.kind} for CLIP {backbone.model_id}, config "
          f"{dataclasses.asdict(config)}, final loss {last:.4f}, sha256 {digest[:12]}, "
          f"{time.perf_counter() - start:.1f} s")
    return 0


def training_data(trainer_cls: Any, options: argparse.Namespace, config: Any = None) -> Any:
    """What the trainer trains on. Dataset categories as products (``--root`` for a "products" trainer): with a
    config ``shots`` k > 0, each category's k-shot references for the config's ``seed``, the very set
    `inspectd eval --shots k` scores that seed with (a few-shot fit must learn from the images the product
    is then built from); all its normal training images otherwise."""
    from inspectd.detectors.training.trainer import TrainingData

    if trainer_cls.data == "none":
        return TrainingData(summary={"data": "none"})
    from inspectd.detectors.data.datasets import open_dataset

    if getattr(options, "products_dir", None):
        return _products_data(options.products_dir)
    if not options.root:
        raise ValueError("--root (a dataset folder) is required"
                         + (" (or --products-dir)" if trainer_cls.data == "products" else ""))
    categories = [c for root in options.root for c in open_dataset(root, options.dataset, options.categories)]
    if not categories:
        raise FileNotFoundError(f"no categories found under {' '.join(options.root)}")
    summary = {"dataset": options.dataset, "roots": [str(r) for r in options.root],
               "categories": [c.name for c in categories],
               "images": sum(len(c.test) + len(c.train) for c in categories)}
    if trainer_cls.data == "dataset":
        return TrainingData(categories=categories, summary=summary)
    from inspectd.detectors.base import ProductSpec
    from inspectd.detectors.data.datasets import load_image, sample_references

    shots, seed = int(getattr(config, "shots", 0) or 0), int(getattr(config, "seed", 0) or 0)
    products = []
    for c in categories:
        chosen = sample_references(c.train, shots, seed) if shots else c.train
        products.append((ProductSpec(c.name, c.name.replace("_", " ")), [load_image(s.image_path) for s in chosen]))
    if shots:
        summary["references"] = {"shots": shots, "seed": seed, "sampled_as": "inspectd eval"}
    return TrainingData(products=products, summary=summary)


def _products_data(products_dir: str) -> Any:
    from inspectd.daemon.config import load_product_file
    from inspectd.daemon.products import product_files
    from inspectd.daemon.registry import load_images, reference_files
    from inspectd.detectors.base import ProductSpec
    from inspectd.detectors.training.trainer import TrainingData

    products = []
    for path in product_files(products_dir):
        config = load_product_file(path)
        files = reference_files(config.references, config.shots)
        products.append((ProductSpec(config.id, config.object_name, tuple(config.defect_words)), load_images(files)))
    if not products:
        raise FileNotFoundError(f"no product files in {products_dir}")
    return TrainingData(products=products, summary={"products_dir": products_dir,
                                                    "products": [p[0].product for p in products],
                                                    "images": sum(len(p[1]) for p in products)})
