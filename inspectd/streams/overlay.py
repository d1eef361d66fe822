"""Anomaly-map heat-map overlays (numpy + Pillow only): colormap, alpha blend, thresholded-mask contour.

Used by sinks and the CLI to write human-readable overlay PNGs next to a Result's mask.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

# Polynomial fit of Google's Turbo colormap (Apache-2.0, Anton Mikhailov's shader approximation):
# channel(x) = c0 + c1 x + c2 x^2 + c3 x^3 + c4 x^4 + c5 x^5, x in [0, 1].
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],  # red
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],  # green
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],  # blue
], dtype=np.float32)

COLORMAPS = ("turbo", "jet")


def colormap(values: np.ndarray, name: str = "turbo") -> np.ndarray:
    """Map floats in [0,1] (clipped; NaN -> 0) to uint8 RGB, shape (*values.shape, 3): blue (low) to red (high)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0), 0.0, 1.0)
    if name == "turbo":
        powers = np.stack([np.ones_like(x), x, x * x, x**3, x**4, x**5], axis=-1)
        rgb = powers @ _TURBO.T
    elif name == "jet":
        rgb = np.stack([1.5 - np.abs(4 * x - c) for c in (3.0, 2.0, 1.0)], axis=-1)
    else:
        raise ValueError(f"unknown colormap {name!r} (choose from {', '.join(COLORMAPS)})")
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=-1)
    if img.ndim == 3 and img.shape[2] in (3, 4):
        return img[..., :3]
    raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {img.shape}")


def _fit_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``amap`` as float32 HxW at ``size`` (h, w), resized bilinearly when the detector's map is smaller."""
    m = np.nan_to_num(np.asarray(amap, dtype=np.float32), nan=0.0)
    if m.ndim == 3 and 1 in (m.shape[0], m.shape[-1]):
        m = m.reshape(m.shape[1:] if m.shape[0] == 1 else m.shape[:-1])
    if m.ndim != 2:
        raise ValueError(f"anomaly map must be HxW, got shape {m.shape}")
    if m.shape != size:
        resized = Image.fromarray(np.ascontiguousarray(m)).resize((size[1], size[0]), Image.Resampling.BILINEAR)
        m = np.asarray(resized, dtype=np.float32)
    return m


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Bool HxW ring of ``width`` pixels just outside the True region of ``mask``."""
    if width <= 0 or not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    grown = np.asarray(img.filter(ImageFilter.MaxFilter(2 * width + 1))) > 127
    return grown & ~mask


def overlay(image: np.ndarray, amap: np.ndarray, threshold: float | None = None, *, alpha: float = 0.5,
            cmap: str = "turbo", vmin: float = 0.0, vmax: float = 1.0,
            contour_color: tuple[int, int, int] = (255, 255, 255), contour_width: int = 2) -> np.ndarray:
    """Blend the colour-mapped ``amap`` over ``image`` (uint8 HxW[x3|x4]); returns uint8 HxWx3 RGB.

    ``amap`` may be smaller than the image (it is resized); values are scaled from [vmin, vmax] to [0, 1].
    With ``threshold``, the outline of ``amap >= threshold`` is drawn in ``contour_color``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if vmax <= vmin:
        raise ValueError(f"vmax ({vmax}) must exceed vmin ({vmin})")
    rgb = _as_rgb(image)
    m = _fit_map(amap, rgb.shape[:2])
    heat = colormap((m - vmin) / (vmax - vmin), cmap).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if threshold is not None:
        out[contour(m >= threshold, contour_width)] = contour_color
    return out


def save_overlay(path: str | Path, image: np.ndarray, amap: np.ndarray, threshold: float | None = None,
                 **kwargs: object) -> Path:
    """Write ``overlay(image, amap, threshold, **kwargs)`` to ``path`` (format from the suffix; PNG advised)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, amap, threshold, **kwargs)).save(path)  # type: ignore[arg-type]
    return path


VERDICT_COLOURS = {"NG": (220, 40, 40), "OK": (40, 170, 70)}
LEGEND_HEIGHT = 34


def annotate(rendered: np.ndarray, *, score: float | None = None, threshold: float | None = None,
             verdict: str | None = None, vmin: float = 0.0, vmax: float = 1.0, cmap: str = "turbo",
             label: str = "") -> np.ndarray:
    """Add a legend strip under an overlay so it reads alone: verdict (coloured), score vs threshold, the colour
    bar of the map's value range with the threshold marked, and an optional label (e.g. product/frame)."""
    from PIL import ImageDraw

    h, w = rendered.shape[:2]
    canvas = Image.new("RGB", (w, h + LEGEND_HEIGHT), (24, 24, 24))
    canvas.paste(Image.fromarray(rendered), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 4
    if verdict:
        colour = VERDICT_COLOURS.get(verdict, (200, 200, 200))
        draw.rectangle([x, h + 4, x + 26, h + 18], fill=colour)
        draw.text((x + 4, h + 5), verdict[:2], fill=(255, 255, 255))
        x += 32
    if score is not None:
        relation = "" if threshold is None else (" >= " if score >= threshold else " < ")
        text = f"score {score:.4f}" + (f"{relation}threshold {threshold:.4f}" if threshold is not None else "")
        draw.text((x, h + 5), text, fill=(235, 235, 235))
    if label:
        draw.text((4, h + 20), label[:80], fill=(170, 170, 170))
    bar_w = max(40, min(160, w // 3))
    bar_x = w - bar_w - 4
    if bar_x > x + 150 or not score:
        ramp = colormap(np.linspace(0.0, 1.0, bar_w)[None, :].repeat(8, axis=0), cmap)
        canvas.paste(Image.fromarray(ramp), (bar_x, h + 4))
        draw.text((bar_x, h + 14), f"{vmin:.2f}", fill=(200, 200, 200))
        draw.text((bar_x + bar_w - 28, h + 14), f"{vmax:.2f}", fill=(200, 200, 200))
        if threshold is not None and vmin <= threshold <= vmax and vmax > vmin:
            tx = bar_x + round((threshold - vmin) / (vmax - vmin) * (bar_w - 1))
            draw.line([tx, h + 2, tx, h + 13], fill=(255, 255, 255), width=2)
    return np.asarray(canvas)
