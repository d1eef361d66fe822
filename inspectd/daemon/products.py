"""Where product definitions come from: inline in the main config and one YAML file per product."""

from __future__ import annotations

import logging
from pathlib import Path

from inspectd.daemon.config import ConfigError, DaemonConfig, ProductConfig, load_product_file

log = logging.getLogger(__name__)

PRODUCT_SUFFIXES = (".yaml", ".yml")


def product_files(products_dir: str | None) -> list[Path]:
    if not products_dir or not Path(products_dir).is_dir():
        return []
    files = Path(products_dir).iterdir()
    return sorted(p for p in files if p.suffix in PRODUCT_SUFFIXES and not p.name.startswith("."))


def product_configs(config: DaemonConfig, invalid: dict[str, str] | None = None) -> list[ProductConfig]:
    """Inline products, then products_dir files (a file overrides an inline product of the same id).

    A broken product file is logged and skipped: it must not keep the other products from loading. With
    ``invalid`` given, it receives {product id (the file's stem): error} for each such file.
    """
    products = {p.id: p for p in config.products}
    for path in product_files(config.registry.products_dir):
        try:
            product = load_product_file(path)
        except (ConfigError, OSError) as exc:
            log.error("product file %s rejected: %s", path, exc)
            if invalid is not None:
                invalid[path.stem] = f"{path.name}: {exc}"
            continue
        products[product.id] = product
    return list(products.values())
