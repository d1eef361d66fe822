"""`inspectd eval`: reproduce the papers' benchmark tables offline (MVTec AD / VisA / meta.json / folder)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from inspectd.commands.fit import add_model_settings

DATASET_NAMES = {"mvtec": "mvtec_ad", "visa": "visa", "visa-mvtec": "visa", "meta": "dataset", "folder": "dataset"}
LAYOUTS = {"mvtec": "mvtec", "visa": "visa", "visa-mvtec": "mvtec", "meta": "meta", "folder": "folder",
           "auto": "auto"}


def at_least(low: int, meaning: str = "") -> Any:
    """An argparse int type refusing values below ``low`` (exit 2 naming the flag, before any model loads)."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError: argparse says "invalid int value"
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid <type> value" message
    return parse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="offline evaluation: image/pixel AUROC, AP, F1-max, PRO tables",
                              description="Run the k-shot protocol over a dataset with the daemon's own scoring "
                                          "code and print a Markdown table per shots value (also JSON and CSV).")
    p.add_argument("--dataset", choices=sorted(LAYOUTS), default="auto",
                   help="layout: mvtec, visa (split_csv/1cls.csv), visa-mvtec (converted), meta (meta.json), folder")
    p.add_argument("--root", required=True, help="dataset root folder")
    p.add_argument("--categories", nargs="*", help="categories to evaluate (default: all)")
    p.add_argument("--detector", default="winclip", help="detector to evaluate (default: %(default)s)")
    p.add_argument("--options", default="{}", help="detector options as JSON, e.g. '{\"language_weight\": 0.5}'")
    p.add_argument("--shots", type=at_least(0, " (0 = zero-shot)"), nargs="+", default=[0],
                   help="k values: references per category, e.g. 0 1 2 4 (default: 0)")
    p.add_argument("--seeds", type=at_least(1), default=1,
                   help="few-shot seeds: references are re-drawn per seed, tables show mean ± std (default: 1)")
    p.add_argument("--arch", default="ViT-B-16-plus-240", help="open_clip arch (default: %(default)s)")
    p.add_argument("--weights", "--pretrained", dest="weights", default="laion400m_e31",
                   help="open_clip tag, or a checkpoint file/folder")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--demo", action="store_true", help="allow --weights random (results are meaningless)")
    add_model_settings(p, "Evaluate with the setting the daemon will run: learned parts record it and are refused "
                          "under the other")
    p.add_argument("--resize", choices=("exact", "fast"), default="exact",
                   help="frames to model inputs as the daemon's model.resize (default exact: open_clip's own); "
                        "fast measures that setting's accuracy cost")
    p.add_argument("--eval-size", type=at_least(1), default=256, help="maps and masks compared at this square size")
    p.add_argument("--batch-size", type=at_least(0, " (0 = auto)"), default=0,
                   help="images per forward; 0 = auto: 1 for a full-size model on CPU (the progress bar moves per "
                        "image), else 8")
    p.add_argument("--compare", metavar="PAPER", help="print the published numbers of PAPER beside ours")
    p.add_argument("--out", default="runs/eval", help="folder for the .md/.json/.csv tables")
    p.add_argument("--cache", default="runs/eval/cache", help="score and state cache folder ('' to disable)")
    p.add_argument("--calibrate", action="store_true",
                   help="build each category as the daemon would (fit + calibrated threshold) and report verdict "
                        "precision, recall and F1 at that threshold beside the threshold-free metrics")
    p.add_argument("--quantile", type=float, default=1.0, help="calibration quantile of normal scores (default 1.0)")
    p.add_argument("--margin", type=float, default=0.02, help="calibration margin added to it (default 0.02)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from inspectd.detectors.backbone import ClipBackbone, ModelSpec
    from inspectd.detectors.building import ThresholdPolicy
    from inspectd.detectors.data.datasets import open_dataset
    from inspectd.detectors.evaluation import runner, tables
    from inspectd.detectors.tiny import register_tiny_arch

    register_tiny_arch()
    categories = open_dataset(args.root, LAYOUTS[args.dataset], args.categories)
    if not categories:
        print(f"no categories found under {args.root}", file=sys.stderr)
        return 2
    dataset_name = DATASET_NAMES.get(args.dataset, "dataset")
    if dataset_name == "dataset":  # folder / meta layouts: name the table after the dataset's own folder
        dataset_name = Path(args.root).resolve().name
    backbone = ClipBackbone(ModelSpec(arch=args.arch, pretrained=args.weights, device=args.device, demo=args.demo,
                                      resize=args.resize, precision=args.precision, quick_gelu=args.quick_gelu))
    # auto: a real model on CPU gains nothing from batching, so 1 (the bar moves per image, not per 8 x 8 s);
    # a GPU, or a tiny test model whose per-call overhead dominates, batches 8
    batch_size = args.batch_size or (1 if backbone.device.type == "cpu" and backbone.width >= 512 else 8)
    settings = runner.EvalSettings(detector=args.detector, options=json.loads(args.options), shots=args.shots,
                                   seeds=args.seeds, eval_size=args.eval_size, batch_size=batch_size,
                                   dataset_name=dataset_name, cache_dir=args.cache or None,
                                   calibrate=args.calibrate, vand=args.compare == "aprilgan",
                                   threshold=ThresholdPolicy(quantile=args.quantile, margin=args.margin))
    def write(shots: int, table: object) -> None:
        """Write one shots value's tables as soon as it is finished (a later failure never loses them)."""
        compare = None
        if args.compare:
            try:
                compare = tables.comparison_for(args.compare, dataset_name, shots)
                if args.compare == "aprilgan":
                    compare = tables.with_vand(compare)
            except ValueError as exc:
                print(f"--compare: {exc}", file=sys.stderr)
            else:
                published = [c for c in compare if c != tables.MEAN_ROW]
                if len(published) > len(categories):
                    table.notes.append(f"the {args.compare} mean row is over its {len(published)} categories, "
                                       f"ours over the {len(categories)} evaluated here")
                elif not published:
                    table.notes.append(f"the {args.compare} {shots}-shot numbers are published as a mean over the "
                                       "dataset's categories only; ours over the "
                                       f"{len(categories)} evaluated here")
        md, js, csv_path = runner.output_paths(args.out, args.detector, shots)
        text = tables.to_markdown(table, compare, compare_label=args.compare or "paper")
        md.write_text(text)
        model = {**backbone.describe(), "quick_gelu": str(backbone.quick_gelu).lower()}  # (dtype: the precision)
        tables.write_json(table, js, compare, extra={"model": model, "shots": shots,
                                                     "seeds": runner.seeds_for(shots, args.seeds),
                                                     "demo_weights": backbone.demo_weights})
        tables.write_csv(table, csv_path, compare, demo_weights=backbone.demo_weights)
        terminal = tables.to_terminal(table, compare, compare_label=args.compare or "paper")
        print(terminal + (f"(full table: {md})\n" if compare is not None else ""), flush=True)

    with tqdm(total=runner.total_images(categories, settings), unit="img", file=sys.stderr) as bar:
        def progress(n: int, label: str) -> None:
            bar.set_description(label, refresh=False)
            bar.update(n)

        results = runner.evaluate(backbone, categories, settings, progress, on_table=write)
    if not results:
        print("no shots value could be evaluated (see the warnings above)", file=sys.stderr)
        return 1
    print(f"tables written to {args.out}", file=sys.stderr)
    return 0
