"""Every dead-letter reason the daemon can emit, in one enum, with the stage and what it means.

README's poison-frame table is generated from this list (``spec/readme_tables.py``), the stream spec's
``reason`` enum and its reason -> stage rules are checked against it (tests/test_wire_spec.py), and a test
scans the code so no reason string is used that is not listed here (tests/test_hardening.py).
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # parse: the message itself
    MISSING_FIELD = "missing_field"
    BAD_LINE = "bad_line"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    BAD_BYTE_ORDER = "bad_byte_order"
    BAD_TS = "bad_ts"
    BAD_META = "bad_meta"
    META_TOO_LARGE = "meta_too_large"
    TOO_MANY_DELIVERIES = "too_many_deliveries"
    DELETED_BEFORE_SCORING = "deleted_before_scoring"
    NO_PRODUCT = "no_product"
    UNREADABLE = "unreadable"
    # decode: the image
    MISSING_IMAGE = "missing_image"
    TOO_LARGE = "too_large"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_MANY_SCANS = "too_many_scans"
    TOO_MANY_TILES = "too_many_tiles"
    CORRUPT_IMAGE = "corrupt_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    BAD_RAW_SHAPE = "bad_raw_shape"
    BAD_RAW_DTYPE = "bad_raw_dtype"
    DECODE_ERROR = "decode_error"
    # product: the registry
    UNKNOWN_PRODUCT = "unknown_product"
    PRODUCT_BUILDING = "product_building"
    PRODUCT_FAILED = "product_failed"
    # score / publish
    DETECTOR_ERROR = "detector_error"
    UNPUBLISHABLE = "unpublishable"


# reason -> (stage, input that causes it)
REASONS: dict[Reason, tuple[str, str]] = {
    Reason.MISSING_FIELD: ("parse", "no `product` or no `image` field"),
    Reason.BAD_LINE: ("parse", "`line` is not a valid line id, or names another line than the stream's"),
    Reason.BAD_SHAPE: ("parse", "`shape` is not H,W or H,W,C with C in 1/3/4"),
    Reason.BAD_DTYPE: ("parse", "`dtype` is not uint8 or uint16"),
    Reason.BAD_BYTE_ORDER: ("parse", "`byte_order` is not `little` or `big`"),
    Reason.BAD_TS: ("parse", "`ts` is not a finite decimal number"),
    Reason.BAD_META: ("parse", "`meta` is not a JSON object in UTF-8"),
    Reason.META_TOO_LARGE: ("parse", "`meta` is larger than `decode.max_meta_bytes`"),
    Reason.TOO_MANY_DELIVERIES: ("parse", "the entry was delivered more than `redis.max_deliveries` times "
                                          "(it keeps crashing consumers)"),
    Reason.DELETED_BEFORE_SCORING: ("parse", "a pending entry trimmed or deleted from the input stream before it was "
                                             "scored (a producer's MAXLEN, an XDEL): only its id is left"),
    Reason.NO_PRODUCT: ("parse", "a watched-folder file not inside a <product>/ folder"),
    Reason.UNREADABLE: ("parse", "a watched-folder file that cannot be read"),
    Reason.MISSING_IMAGE: ("decode", "an empty image payload"),
    Reason.TOO_LARGE: ("decode", "more bytes than `decode.max_bytes`"),
    Reason.TOO_MANY_PIXELS: ("decode", "more pixels than `decode.max_pixels` (from the header, before decoding)"),
    Reason.TOO_MANY_SCANS: ("decode", "a JPEG with more scans than `decode.max_jpeg_scans` (counted before "
                                      "decoding: a progressive scan-bomb, each scan another pass over every block)"),
    Reason.TOO_MANY_TILES: ("decode", "an aspect ratio that needs more than `decode.max_tiles` model inputs "
                                      "(e.g. a 10000 x 10 strip)"),
    Reason.CORRUPT_IMAGE: ("decode", "bytes the decoder cannot read, or a truncated image"),
    Reason.UNSUPPORTED_FORMAT: ("decode", "a format other than PNG/JPEG/BMP/TIFF"),
    Reason.BAD_RAW_SHAPE: ("decode", "raw pixels whose byte count does not match `shape`"),
    Reason.BAD_RAW_DTYPE: ("decode", "raw pixels of a dtype the decoder does not take"),
    Reason.DECODE_ERROR: ("decode", "any other decoder failure (a bug: the detail names it)"),
    Reason.UNKNOWN_PRODUCT: ("product", "`product` names no product the registry knows"),
    Reason.PRODUCT_BUILDING: ("product", "the product is still building (`registry.on_building: dead_letter`, or "
                                         "the wait timed out)"),
    Reason.PRODUCT_FAILED: ("product", "the product's build failed and no earlier version serves"),
    Reason.DETECTOR_ERROR: ("score", "the detector raised while scoring the frame's batch, or gave it a NaN or "
                                     "infinite score"),
    Reason.UNPUBLISHABLE: ("publish", "the result could not be written for a permanent reason (the detail says "
                                      "why); it never blocks the frames behind it"),
}
