"""Decoding a JPEG smaller on the way (Pillow's draft: libjpeg's scaled IDCT at 1/2, 1/4 or 1/8): the one rule the
daemon's frame codec (inspectd.streams.codec) and offline evaluation's dataset loader (inspectd.detectors.data)
share, so that `inspectd eval --resize fast` decodes as the daemon does. Top level: neither layer imports the other."""

from __future__ import annotations

from collections.abc import Callable

from PIL import ExifTags, Image

# (frame height, width) -> the (h, w) its pixels must keep at least, or None for every pixel
MinSize = Callable[[int, int], "tuple[int, int] | None"]
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def draft_jpeg(img: Image.Image, min_size: MinSize | None, exif_turns: bool = True) -> tuple[int, int] | None:
    """Let an opened, not yet loaded JPEG (or MPO) decode at 1/2, 1/4 or 1/8 scale (libjpeg's scaled IDCT) where
    that keeps at least ``min_size(H, W)`` of the image as shown; returns its own (H, W) as shown when it will decode
    smaller, else None (another format, or nothing to shrink). ``exif_turns``: the caller turns the image by its EXIF
    orientation after loading (Pillow does that for a JPEG only then, so its shown size swaps for orientations
    5-8; its TIFF plugin turns on load and reports the shown size)."""
    # only libjpeg can decode smaller; Pillow's "MPO" is a JPEG with an MPF second picture (a camera's preview),
    # its first picture (the one loaded) a JPEG like any other
    if min_size is None or img.format not in ("JPEG", "MPO"):
        return None
    width, height = img.size
    transposed = exif_turns and img.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING
    shown = (width, height) if transposed else (height, width)
    keep = min_size(*shown)
    if keep is None:
        return None
    img.draft(None, (keep[0], keep[1]) if transposed else (keep[1], keep[0]))  # (w, h) as stored
    return shown
