"""OpenCLIP pre-processing: RGB frames -> square model inputs (WinCLIP tiling or one square resize), and maps back.

Pixels are normalised with the loaded model's own mean/std and resized with its interpolation (open_clip's
preprocess_cfg; CLIP's OpenAI values and bicubic when it has none: `ClipBackbone`).
"tile" (WinCLIP): a frame's shorter edge is resized (Pillow bicubic) to the input size S; a
non-square frame is cut into S x S tiles slid along its longer edge with stride <= 0.8 S. Per-tile
maps are averaged back onto the resized frame (overlaps averaged) and resized to the frame's own
size; per-tile image scores are averaged. "square" (APRIL-GAN style): the whole frame is resized to
S x S (aspect not kept) and its map resized back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TILE_STRIDE = 0.8
MAX_CROPS = 5  # test-time crops per tile (`crop_views`): the centre and the four corners


INPUT_MODES = ("tile", "square")
RESIZE_MODES = ("exact", "fast")
# open_clip's preprocess_cfg interpolations; "random" is a training augmentation and resizes bicubic at inference
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                  "random": Image.Resampling.BICUBIC}
# "fast": Pillow shrinks by whole factors first (Image.reduce) while the rest stays >= this many times the target,
# then resamples bicubic: 1080p / 4K to 240 px 1.8x / 3.3x faster (the report's frame-size sweep); on photographs
# pixels stay within 2/255 of the exact resize, on fine textures and noise they differ more (up to ~16/255).
# A JPEG frame is also decoded at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT, `decode_size`) while it keeps this
# many times the target: decode + pre-process of a 1080p frame 2.3x, of a 4K one 5.1x faster than exact (sweep).
FAST_REDUCING_GAP = 2.0


@dataclass(frozen=True)
class InputSpec:
    """How a detector wants its frames: input size S (pixels) and "tile" or "square"."""

    size: int
    mode: str = "tile"

    def __post_init__(self) -> None:
        if self.mode not in INPUT_MODES:
            raise ValueError(f"input mode must be one of {INPUT_MODES}, not {self.mode!r}")
        if self.size < 1:
            raise ValueError(f"input size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class TileLayout:
    """Where a frame's tiles sit on its resized version."""

    original: tuple[int, int]  # (H, W) of the frame
    resized: tuple[int, int]  # (h, w) after the shorter-edge resize; min(h, w) == S
    offsets: tuple[tuple[int, int], ...]  # (top, left) of each S x S tile on the resized frame

    @property
    def n_tiles(self) -> int:
        return len(self.offsets)


def tile_offsets(length: int, size: int, max_stride: float = MAX_TILE_STRIDE) -> list[int]:
    """Start positions of windows of `size` covering [0, length) with stride <= max_stride * size."""
    if length <= size:
        return [0]
    n = math.ceil((length - size) / (max_stride * size)) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


class Preprocessor:
    """Turns RGB uint8 frames into normalised S x S tiles and tile outputs back into frame maps."""

    def __init__(self, size: int, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD,
                 mode: str = "tile", resize: str = "exact", interpolation: str = "bicubic"):
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {resize!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, not {interpolation!r}")
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
            raise ValueError(f"normalisation needs 3 means and 3 positive stds, got mean={mean} std={std}")
        self.spec = InputSpec(size, mode)
        self.size = size
        self.mode = mode
        self.resize = resize  # "exact": Pillow's bicubic over the whole frame, as open_clip's own pre-processing
        self.reducing_gap = FAST_REDUCING_GAP if resize == "fast" else None
        self.interpolation = interpolation
        self._resample = INTERPOLATIONS[interpolation]
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self._key = (size, mode, resize, mean, std, self._resample)

    # Equal pre-processors make the same tiles of a frame: tiles made before a hot swap are kept only when the new
    # detector's pre-processor equals the one that made them (an input spec alone misses e.g. `model.resize`).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, Preprocessor) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def layout(self, height: int, width: int) -> TileLayout:
        s = self.size
        if self.mode == "square":
            return TileLayout((height, width), (s, s), ((0, 0),))
        if height <= width:
            resized = (s, max(s, round(width * s / height)))
        else:
            resized = (max(s, round(height * s / width)), s)
        tops = tile_offsets(resized[0], s)
        lefts = tile_offsets(resized[1], s)
        return TileLayout((height, width), resized, tuple((t, left) for t in tops for left in lefts))

    def decode_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The (h, w) a frame of ``height`` x ``width`` must keep at least when its decoder can shrink it on the way
        (JPEG: `draft`); None: decode every pixel ("exact", open_clip's own pre-processing)."""
        if self.reducing_gap is None:
            return None
        h, w = self.layout(height, width).resized
        return math.ceil(h * self.reducing_gap), math.ceil(w * self.reducing_gap)

    def __call__(self, image: np.ndarray, original: tuple[int, int] | None = None) -> tuple[torch.Tensor, TileLayout]:
        """[T, 3, S, S] float32 tiles of an HxWx3 uint8 RGB frame, and their layout. ``original``: the frame's own
        (H, W) when ``image`` was decoded smaller (`decode_size`); the layout and the maps are the frame's."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
        layout = self.layout(*(original or image.shape[:2]))
        h, w = layout.resized
        pil = Image.fromarray(image)
        if (h, w) != (image.shape[0], image.shape[1]):
            pil = pil.resize((w, h), self._resample, reducing_gap=self.reducing_gap)
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1) / 255.0
        pixels = (pixels - self.mean) / self.std
        s = self.size
        tiles = torch.stack([pixels[:, t:t + s, left:left + s] for t, left in layout.offsets])
        return tiles.contiguous(), layout

    def merge_maps(self, tile_maps: torch.Tensor, layout: TileLayout, out_size: tuple[int, int] | None = None,
                   ) -> torch.Tensor:
        """Average [T, S, S] tile maps onto the resized frame, then resize to ``out_size`` (default: the
        frame's original size). Returns [H, W] float32 on the maps' device."""
        s = self.size
        h, w = layout.resized
        if layout.n_tiles == 1 and (h, w) == (s, s):
            canvas = tile_maps[0].float()
        else:
            canvas = torch.zeros(h, w, device=tile_maps.device)
            count = torch.zeros(h, w, device=tile_maps.device)
            for tile, (t, left) in zip(tile_maps, layout.offsets, strict=True):
                canvas[t:t + s, left:left + s] += tile.float()
                count[t:t + s, left:left + s] += 1
            canvas = canvas / count
        target = out_size or layout.original
        if tuple(canvas.shape) != tuple(target):
            canvas = F.interpolate(canvas[None, None], size=target, mode="bilinear", align_corners=False)[0, 0]
        return canvas


def crop_views(tiles: torch.Tensor, n: int, scale: float = 0.8) -> torch.Tensor:
    """Test-time multi-crop: ``n`` (1..5) views per tile -- the centre, then the four corners -- each a
    ``scale`` x ``scale`` square of the tile resized back to the tile's size (bicubic). [T * n, 3, S, S]."""
    if not 1 <= n <= MAX_CROPS:
        raise ValueError(f"multi-crop takes 1 to {MAX_CROPS} crops, got {n}")
    size = tiles.shape[-1]
    side = max(1, round(size * scale))
    far = size - side
    corners = [(far // 2, far // 2), (0, 0), (0, far), (far, 0), (far, far)][:n]
    views = [tiles[:, :, top:top + side, left:left + side] for top, left in corners]
    crops = torch.stack(views, dim=1).reshape(-1, tiles.shape[1], side, side)
    return F.interpolate(crops, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


def shifted_views(image: np.ndarray, keep: float = 0.92) -> list[np.ndarray]:
    """Four corner crops keeping ``keep`` of each side, resized back: small placement/scale changes."""
    h, w = image.shape[:2]
    ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
    pil = Image.fromarray(image)
    views = []
    for top, left in ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)):
        crop = pil.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC)
        views.append(np.asarray(crop))
    return views
