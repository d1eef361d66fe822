"""Where product definitions come from: inline in the main config and one YAML file per product."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from inspectd.daemon.config import ConfigError, DaemonConfig, ProductConfig, load_product_file

log = logging.getLogger(__name__)

PRODUCT_SUFFIXES = (".yaml", ".yml")


def product_files(products_dir: str | None) -> list[Path]:
    """The product files of ``products_dir``: regular ``*.yaml``/``*.yml`` files, hidden ones left out, in name
    order (a folder named ``x.yaml`` is not one)."""
    if not products_dir or not Path(products_dir).is_dir():
        return []
    files = Path(products_dir).iterdir()
    return sorted(p for p in files if p.suffix in PRODUCT_SUFFIXES and not p.name.startswith(".") and p.is_file())


class ProductDir(NamedTuple):
    """A products folder read: the files defining products, the files refused and why."""

    defined: dict[str, tuple[Path, ProductConfig]]  # product id -> (its file, its config)
    rejected: dict[Path, str]  # file -> why it was refused (broken, or a duplicate)
    duplicates: set[Path]  # of those, the files that only repeat a product another file defines (which serves)


def duplicate_error(product_id: str, definer: Path) -> str:
    """Why a file repeating a product another file defines is refused (at start and by the watcher alike)."""
    return f"product {product_id!r} is already defined by {definer.name}; one file per product (rename the id or " \
           "delete one of them)"


def load_product_dir(products_dir: str | None) -> ProductDir:
    """The product files of a products folder, read.

    One file per product: when two files define one id, the one named ``<id>.yaml`` (the name the admin API
    writes and finds first), else the first in name order, defines it; the other is rejected, not silently
    overridden (a DELETE through the API would otherwise remove the file that was not serving)."""
    defined: dict[str, tuple[Path, ProductConfig]] = {}
    rejected: dict[Path, str] = {}
    duplicates: set[Path] = set()
    loaded: list[tuple[Path, ProductConfig]] = []
    for path in product_files(products_dir):
        try:
            loaded.append((path, load_product_file(path)))
        except (ConfigError, OSError) as exc:
            rejected[path] = str(exc).removeprefix("config error at ").removeprefix(f"{path.name}: ")
    for path, product in sorted(loaded, key=lambda item: (item[0].stem != item[1].id, item[0].name)):
        if product.id in defined:
            rejected[path] = duplicate_error(product.id, defined[product.id][0])
            duplicates.add(path)
        else:
            defined[product.id] = (path, product)
    return ProductDir(defined, rejected, duplicates)


def product_configs(config: DaemonConfig, invalid: dict[str, str] | None = None) -> list[ProductConfig]:
    """Inline products, then products_dir files (a file overrides an inline product of the same id).

    A broken product file is logged and skipped: it must not keep the other products from loading. With
    ``invalid`` given, it receives {product id (the file's stem): error} for each such file (the product it meant
    to define does not serve); a duplicate is logged only (the product it repeats serves from its own file).
    """
    products = {p.id: p for p in config.products}
    defined, rejected, duplicates = load_product_dir(config.registry.products_dir)
    for path, error in rejected.items():
        log.error("product file %s rejected: %s", path, error)
        if invalid is not None and path not in duplicates:
            invalid[path.stem] = f"{path.name}: {error}"
    for _path, product in sorted(defined.values(), key=lambda item: item[0].name):
        products[product.id] = product
    return list(products.values())
