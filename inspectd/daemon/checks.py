"""`run --check`: every problem a config has that can be found without loading a model, each with its key path.

The schema (types, unknown keys) is checked when the YAML is parsed (`config.load_config`); this module checks
what lies beyond it: product files through the same parser a build uses, detector names and options, paths,
devices, URLs and the security rules. One list of problems, in the order of the config.
"""

from __future__ import annotations

import re
from pathlib import Path

from inspectd.daemon.config import DaemonConfig, ProductConfig
from inspectd.daemon.products import load_product_dir, product_files
from inspectd.detectors.compiled import CUDA_GRAPH_MODES

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def check_config(config: DaemonConfig, products: bool = True, models: bool = True) -> list[str]:
    """Problems as "<key path>: <what is wrong>" lines; empty when the config is sound (``products=False``: the
    daemon's own settings only; ``models=False``: without the models', whose load says more when it fails)."""
    problems: list[str] = []
    pool = config.model_pool()
    for index, model in enumerate(pool if models else ()):
        where = f"models[{index}]" if config.models else "model"
        problems += _check_model(model.device, model.arch, model.pretrained, config.demo, where)
        problems += _check_compile(str(model.compile), model.device, where)
    names = [m.name for m in pool]
    if (config.sources.redis or config.sinks.redis or config.redis.control_stream) and not config.redis.url.startswith(
            REDIS_SCHEMES):
        problems.append(f"redis.url: {config.redis.url!r} has no scheme; use redis://host:port/db, rediss:// or "
                        "unix://")
    if config.registry.products_dir and not Path(config.registry.products_dir).is_dir():
        problems.append(f"registry.products_dir: {config.registry.products_dir} is not a folder")
    if config.registry.references_root and not Path(config.registry.references_root).is_dir():
        problems.append(f"registry.references_root: {config.registry.references_root} is not a folder")
    feedback_dir = Path(config.console.feedback_dir) if config.console.feedback_dir else None
    if config.console.enabled and feedback_dir and feedback_dir.exists() and not feedback_dir.is_dir():
        problems.append(f"console.feedback_dir: {feedback_dir} is a file, not a folder (created on first feedback)")
    for index, folder in enumerate(config.sources.folders):
        if not Path(folder.path).is_dir():
            problems.append(f"sources.folders[{index}].path: {folder.path} is not a folder")
    if not (config.sources.redis or config.sources.folders or config.sources.cameras):
        problems.append("sources: no source is enabled (redis, folders, cameras): the daemon would score nothing")
    if not (config.sinks.redis or config.sinks.jsonl):
        problems.append("sinks: no sink is enabled (redis, jsonl): results would go nowhere")
    if not products:
        return problems
    for index, product in enumerate(config.products):
        problems += check_product(product, names, f"products[{index}]")
    defined, rejected, _ = load_product_dir(config.registry.products_dir)
    by_file = dict(defined.values())
    for path in product_files(config.registry.products_dir):
        if path in rejected:
            problems.append(f"{path.name}: {rejected[path]}")
        else:
            problems += check_product(by_file[path], names, path.name)
    return problems


def _check_model(device: str, arch: str, pretrained: str, demo: bool, where: str) -> list[str]:
    from inspectd.detectors import weights

    problems = []
    if not DEVICE_RE.match(device):
        problems.append(f"{where}.device: {device!r} is not auto, cpu, cuda, cuda:N or mps")
    if pretrained == weights.RANDOM_WEIGHTS and not demo:
        problems.append(f"{where}.pretrained: 'random' weights need --demo (scores would be meaningless)")
    try:
        weights.resolve(arch, pretrained)
    except weights.WeightsNotFoundError as exc:
        problems.append(f"{where}.pretrained: {str(exc).splitlines()[0]}")
    return problems


def _check_compile(mode: str, device: str, where: str) -> list[str]:
    """What model.compile needs of this machine: a C++ compiler for Inductor's CPU kernels, Triton for its GPU ones;
    CUDA graphs need a GPU. Checked without importing torch (a missing compiler fails the load with the same reason)."""
    import importlib.util
    import os
    import shutil

    if mode == "off":
        return []
    problems = []
    cuda = device.startswith("cuda")
    if device == "cpu" and mode in CUDA_GRAPH_MODES:
        problems.append(f"{where}.compile: {mode} adds CUDA graphs, which need a GPU; on device cpu use default or "
                        "max-autotune-no-cudagraphs")
    on_cpu = device == "cpu" or (device == "auto" and shutil.which("nvidia-smi") is None)
    compilers = [c for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c]
    if on_cpu and not any(shutil.which(c) for c in compilers):
        problems.append(f"{where}.compile: {mode} builds C++ kernels on the CPU and no C++ compiler (g++, c++, "
                        "clang++ or $CXX) is on PATH; install one or set compile: off")
    if cuda and importlib.util.find_spec("triton") is None:
        problems.append(f"{where}.compile: {mode} builds Triton kernels on the GPU and triton is not installed; "
                        "install it or set compile: off")
    return problems


def check_product(product: ProductConfig, model_names: list[str] | None, where: str) -> list[str]:
    """What a build of ``product`` would reject, short of loading the model and the images (``model_names``
    None: the daemon's models are not known here, e.g. `inspectd product put`)."""
    from inspectd.daemon.registry import PRODUCT_ID_RE
    from inspectd.detectors.base import build_options, detector_class
    from inspectd.streams.records import MaskPolicy

    problems = []
    if not PRODUCT_ID_RE.match(product.id):
        problems.append(f"{where}.id: {product.id!r} is not a product id (letters, digits, '.', '_', '-'; up to 128, "
                        "starting with a letter or digit): the admin API and the console could not manage it")
    try:
        cls = detector_class(product.detector)
    except ValueError as exc:
        problems.append(f"{where}.detector: {exc}")
    else:
        try:
            build_options(cls.Options, product.options, where=f"{where}.options")
        except ValueError as exc:
            problems.append(str(exc))
        for option in cls.artifact_options:
            value = product.options.get(option)
            if value and not Path(value).expanduser().is_file():
                problems.append(f"{where}.options.{option}: no such file {value}")
    if product.model is not None and model_names is not None and product.model not in model_names:
        problems.append(f"{where}.model: {product.model!r} is not one of the models {model_names}")
    if product.shots > 0 and product.references and not Path(product.references).is_dir():
        problems.append(f"{where}.references: {product.references} is not a folder")
    if product.threshold.holdout_dir and not Path(product.threshold.holdout_dir).is_dir():
        problems.append(f"{where}.threshold.holdout_dir: {product.threshold.holdout_dir} is not a folder")
    if not 0.0 <= product.threshold.quantile <= 1.0:
        problems.append(f"{where}.threshold.quantile: must be within [0, 1], got {product.threshold.quantile}")
    try:
        MaskPolicy.parse(product.mask)
    except ValueError as exc:
        problems.append(f"{where}.mask: {exc}")
    return problems
