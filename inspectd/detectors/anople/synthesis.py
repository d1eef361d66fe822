"""AnoPLe's pixel-space pseudo-anomalies (DRAEM-style Perlin masks and blending) and its multi-view split.

Perlin noise follows DRAEM's ``rand_perlin_2d_np`` (spec §2.2 [Ext]): gradient noise at a random power-of-two
lattice per axis, a random multiple of 90° rotation (DRAEM rotates by up to ±90° with imgaug). Where DRAEM
thresholds at 0.5, the region here is the top ``coverage`` quantile of the noise with ``coverage`` drawn from
[min_cover, max_cover], so the altered area always lies within configured bounds (a fixed threshold can give
empty or whole-image masks). Blending: ``I⁻ = (1−M)⊙I + (1−β)(M⊙I) + β(M⊙A)``, β ~ U[beta_min, beta_max].
The anomaly source A is the image itself by default (the paper: "Perlin noise to the raw image"), moved
(rotated, rolled) and with DRAEM-style colour changes so it differs from I; or a random texture from a folder.
The returned ``mask`` is exactly the pixels that changed (a region pixel the blend left equal is not anomalous).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class SynthesisConfig:
    min_cover: float = 0.02  # fraction of the image the Perlin region covers, drawn uniformly in these bounds
    max_cover: float = 0.25
    max_scale_log2: int = 5  # lattice of 2^0 .. 2^5 cells per axis (DRAEM: up to 2^6 at 256 px)
    beta_min: float = 0.1  # blending opacity β ~ U[beta_min, beta_max] (DRAEM)
    beta_max: float = 1.0
    texture_dir: str = ""  # "" = the image itself as the anomaly source; else a folder of texture images

    def __post_init__(self) -> None:
        if not 0.0 < self.min_cover <= self.max_cover < 1.0:
            raise ValueError(f"need 0 < min_cover <= max_cover < 1, got {self.min_cover}, {self.max_cover}")
        if not 0.0 < self.beta_min <= self.beta_max <= 1.0:
            raise ValueError(f"need 0 < beta_min <= beta_max <= 1, got {self.beta_min}, {self.beta_max}")


@dataclass
class PseudoAnomaly:
    image: np.ndarray  # HxWx3 uint8, the altered image
    mask: np.ndarray  # HxW bool: exactly the pixels that differ from the original
    region: np.ndarray  # HxW bool: the thresholded Perlin region (mask is within it)


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin noise [H, W] on a ``res`` lattice (DRAEM's ``rand_perlin_2d_np``); H, W multiples of res."""
    delta = (res[0] / shape[0], res[1] / shape[1])
    d = (shape[0] // res[0], shape[1] // res[1])
    grid = np.mgrid[0:res[0]:delta[0], 0:res[1]:delta[1]].transpose(1, 2, 0)[:shape[0], :shape[1]] % 1
    angles = 2 * np.pi * rng.random((res[0] + 1, res[1] + 1))
    gradients = np.stack((np.cos(angles), np.sin(angles)), axis=-1)

    def tile(rows: slice, cols: slice) -> np.ndarray:
        return np.repeat(np.repeat(gradients[rows, cols], d[0], axis=0), d[1], axis=1)[:shape[0], :shape[1]]

    def dot(grad: np.ndarray, shift: tuple[int, int]) -> np.ndarray:
        offset = np.stack((grid[..., 0] + shift[0], grid[..., 1] + shift[1]), axis=-1)
        return (offset * grad).sum(axis=-1)

    n00 = dot(tile(slice(0, -1), slice(0, -1)), (0, 0))
    n10 = dot(tile(slice(1, None), slice(0, -1)), (-1, 0))
    n01 = dot(tile(slice(0, -1), slice(1, None)), (0, -1))
    n11 = dot(tile(slice(1, None), slice(1, None)), (-1, -1))
    t = _fade(grid)
    top = n00 + t[..., 0] * (n10 - n00)
    bottom = n01 + t[..., 0] * (n11 - n01)
    return np.sqrt(2) * (top + t[..., 1] * (bottom - top))


def perlin_region(shape: tuple[int, int], config: SynthesisConfig, rng: np.random.Generator) -> np.ndarray:
    """A boolean region covering a fraction in [min_cover, max_cover] of ``shape`` (ties aside: exactly that)."""
    res = tuple(int(2 ** rng.integers(0, config.max_scale_log2 + 1)) for _ in range(2))
    size = max(shape)
    padded = -(-size // max(res)) * max(res)  # a square multiple of both lattices, cropped below
    noise = np.rot90(perlin_noise((padded, padded), res, rng), k=int(rng.integers(0, 4)))[:shape[0], :shape[1]]
    coverage = rng.uniform(config.min_cover, config.max_cover)
    count = max(1, int(round(coverage * noise.size)))
    threshold = np.partition(noise.ravel(), noise.size - count)[noise.size - count]
    return noise >= threshold


def _self_source(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image moved (rotation by 90°·k, a random roll) with a DRAEM-style colour change (invert, posterize or
    a channel shuffle), so the source differs from the pixels it replaces."""
    source = np.rot90(image, k=int(rng.integers(1, 4)))
    if source.shape != image.shape:
        source = np.asarray(Image.fromarray(np.ascontiguousarray(source)).resize(image.shape[1::-1]))
    source = np.roll(source, (int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))), axis=(0, 1))
    choice = int(rng.integers(3))
    if choice == 0:
        return 255 - source
    if choice == 1:
        return (source & 0xC0) + 0x20
    return source[..., rng.permutation(3)]


def _texture_source(folder: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"texture_dir {folder}: no images")
    texture = Image.open(files[int(rng.integers(len(files)))]).convert("RGB").resize((shape[1], shape[0]))
    return np.asarray(texture)


def synthesize(image: np.ndarray, config: SynthesisConfig, rng: np.random.Generator) -> PseudoAnomaly:
    """One DRAEM-style pseudo-anomaly of an HxWx3 uint8 image (seeded by ``rng``)."""
    shape = image.shape[:2]
    region = perlin_region(shape, config, rng)
    source = _texture_source(config.texture_dir, shape, rng) if config.texture_dir else _self_source(image, rng)
    beta = rng.uniform(config.beta_min, config.beta_max)
    m = region[..., None].astype(np.float32)
    base = image.astype(np.float32)
    blended = (1 - m) * base + (1 - beta) * (m * base) + beta * (m * source.astype(np.float32))
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[~region] = image[~region]  # outside the region the formula is the identity; keep it bit-exact
    return PseudoAnomaly(out, (out != image).any(axis=-1), region)


def multi_views(image: np.ndarray, size: int) -> list[np.ndarray]:
    """The spec's 1 + 4 views (§2.1): the image at size x size, then the 4 size-x-size quadrants (TL, TR, BL, BR)
    of its 2·size resize. Returns RGB uint8 arrays (full view first)."""
    big = np.asarray(Image.fromarray(image).resize((2 * size, 2 * size), Image.Resampling.BICUBIC))
    return [resize_image(big, size)] + quadrants(big, size)


def quadrants(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[r:r + size, c:c + size] for r in (0, size) for c in (0, size)]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Area-average a boolean mask to size x size and binarise at 0.5."""
    if mask.shape == (size, size):
        return mask
    resized = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized) >= 0.5
