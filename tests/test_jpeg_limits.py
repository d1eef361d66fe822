"""JPEG-specific decode rules: a progressive "scan-bomb" is refused before decoding (``decode.max_jpeg_scans``),
the scan count walks marker segments (not fooled by 0xFF 0xDA in EXIF/comment payloads), and a camera JPEG with an
MPF preview (Pillow's "MPO") decodes as the JPEG it is, on the exact and the fast (draft) path."""

from __future__ import annotations

import io
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspectd.daemon.app import decode_limits
from inspectd.daemon.config import ConfigError, parse_config
from inspectd.streams.codec import DecodeLimits, count_jpeg_scans, decode_frame_scaled, decode_image_bytes
from inspectd.streams.schema import Frame, FrameError

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HAZELNUT = DATASETS / "hazelnut_toy" / "hazelnut" / "good" / "01.png"
BOTTLE = DATASETS / "mvtec_ad" / "bottle" / "train" / "good" / "000.png"

QUARTER = lambda h, w: (h // 4, w // 4)  # noqa: E731  (a MinSize: keep at least a quarter of each side)


def _frame(payload: bytes) -> Frame:
    return Frame(product="p", line="l", frame_id="f", captured_at=0.0, payload=payload)


def _jpeg(img: Image.Image, fmt: str = "JPEG", **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment, an SOS with its entropy-coded data (a test-side walker, written
    independently of the codec's)."""
    i, out = 2, []
    while i < len(data):
        assert data[i] == 0xFF
        m = data[i + 1]
        if m == 0xD9:
            out.append((m, i, i + 2))
            break
        end = i + 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
        if m == 0xDA:  # entropy data up to the next marker that is neither a stuffed 0xFF00 nor an RSTn
            j = end
            while True:
                j = data.index(b"\xff", j)
                if data[j + 1] == 0 or 0xD0 <= data[j + 1] <= 0xD7:
                    j += 2
                    continue
                break
            end = j
        out.append((m, i, end))
        i = end
    return out


def _repeat_last_ac_scan(jpeg: bytes, times: int) -> bytes:
    """A progressive JPEG (or an MPO's first picture) with its last AC scan repeated ``times`` more times before its
    EOI (each copy a few bytes: one EOB run over every block)."""
    segs = _segments(jpeg)
    start, end = [(s, e) for m, s, e in segs if m == 0xDA and jpeg[s + 7] > 0][-1]  # Ss > 0: an AC scan
    eoi = next(s for m, s, _ in segs if m == 0xD9)
    return jpeg[:eoi] + jpeg[start:end] * times + jpeg[eoi:]


def _scan_bomb(side: int, extra_scans: int) -> bytes:
    """A progressive greyscale JPEG with ``extra_scans`` repeated scans, as /tmp/review_inputs/scan_bomb.py builds
    it at 6000 x 6000."""
    return _repeat_last_ac_scan(_jpeg(Image.new("L", (side, side), 128), progressive=True, quality=75), extra_scans)


def _with_segment(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """``jpeg`` with one more APPn/COM segment right after SOI."""
    return jpeg[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _dataset_image(path: Path) -> Image.Image:
    if not path.exists():
        pytest.skip(f"{path} not present")
    with Image.open(path) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------- scan-bomb


def test_scan_bomb_is_refused_before_decoding() -> None:
    bomb = _scan_bomb(2048, 1000)  # 4 M px, 1000 extra scans: seconds of libjpeg work if it were decoded
    assert len(bomb) < 200_000
    for min_size in (None, QUARTER):  # the exact and the fast (draft) path
        t0 = time.perf_counter()
        with pytest.raises(FrameError) as err:
            decode_frame_scaled(_frame(bomb), DecodeLimits(), min_size)
        elapsed = time.perf_counter() - t0
        assert err.value.stage == "decode" and err.value.reason == "too_many_scans"
        assert "decode.max_jpeg_scans" in err.value.detail
        assert elapsed < 0.5, f"refusal took {elapsed:.2f} s"


def test_the_limit_is_a_count_of_scans() -> None:
    grey = _jpeg(Image.new("L", (64, 48), 90), progressive=True)
    assert count_jpeg_scans(grey) == 6  # libjpeg's default progression for one component
    assert decode_image_bytes(grey, DecodeLimits(max_jpeg_scans=6)).shape == (48, 64, 3)
    with pytest.raises(FrameError, match="too_many_scans"):
        decode_image_bytes(grey, DecodeLimits(max_jpeg_scans=5))
    bomb = _scan_bomb(64, 150)
    assert count_jpeg_scans(bomb) == 156
    assert count_jpeg_scans(bomb, stop_after=100) == 101  # stops counting once over
    assert decode_image_bytes(bomb, DecodeLimits(max_jpeg_scans=200)).shape == (64, 64, 3)  # libjpeg takes it
    with pytest.raises(FrameError, match="too_many_scans"):
        decode_image_bytes(bomb)


@pytest.mark.parametrize("path", [HAZELNUT, BOTTLE], ids=["hazelnut_toy", "mvtec_bottle"])
@pytest.mark.parametrize("save, scans", [
    ({"quality": 90}, 1),
    ({"quality": 90, "progressive": True}, 10),
    ({"quality": 90, "progressive": True, "restart_marker_blocks": 1}, 10),  # an RSTn after every MCU
    ({"quality": 95, "progressive": True, "optimize": True, "subsampling": 0}, 10),
], ids=["baseline", "progressive", "progressive-rst", "progressive-444"])
def test_real_images_still_decode(path: Path, save: dict[str, object], scans: int) -> None:
    img = _dataset_image(path)
    data = _jpeg(img, **save)
    assert count_jpeg_scans(data) == scans
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(decode_image_bytes(data), expected)
    small, size = decode_frame_scaled(_frame(data), DecodeLimits(), QUARTER)
    assert size == (img.height, img.width) and small.shape[0] < img.height


def test_noise_with_stuffed_bytes_and_other_colour_spaces() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)
    data = _jpeg(Image.fromarray(noise), quality=100, progressive=True)
    assert data.count(b"\xff\x00") > 50  # entropy-coded 0xFF data bytes, stuffed
    assert count_jpeg_scans(data) == 10
    cmyk = _jpeg(Image.fromarray(noise).convert("CMYK"), progressive=True)
    assert count_jpeg_scans(cmyk) == 18  # libjpeg's script for 4 components: 2 + 4 x 4
    assert decode_image_bytes(cmyk).shape == (96, 128, 3)


def test_ff_da_inside_segment_payloads_is_not_a_scan() -> None:
    """0xFF 0xDA (and a fake EOI) inside an APP1 (EXIF-like) and a COM payload: more pairs than the limit, yet
    one real scan; the walk skips each payload by its length."""
    rgb = Image.fromarray(np.full((40, 60, 3), (30, 140, 220), np.uint8))
    plain = _jpeg(rgb, quality=95)
    fake = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00" * 150 + b"\xff\xd9"
    data = _with_segment(_with_segment(plain, 0xFE, fake), 0xE1, b"Exif\0\0" + fake)
    assert data.count(b"\xff\xda") > 300
    assert count_jpeg_scans(data) == 1
    np.testing.assert_array_equal(decode_image_bytes(data), decode_image_bytes(plain))
    # ... while the same markers for real (the scan-bomb) are counted after such a segment as well
    bomb = _with_segment(_scan_bomb(64, 150), 0xFE, b"\xff\xd9" + fake)
    assert count_jpeg_scans(bomb) == 156
    with pytest.raises(FrameError, match="too_many_scans"):
        decode_image_bytes(bomb)


def test_fill_bytes_before_a_marker() -> None:
    grey = _jpeg(Image.new("L", (32, 32), 200), progressive=True)
    sos = [s for m, s, _ in _segments(grey) if m == 0xDA]
    filled = bytearray(grey)
    for s in reversed(sos):  # 0xFF fill bytes may precede any marker: still one marker each
        filled[s:s] = b"\xff\xff\xff"
    assert count_jpeg_scans(bytes(filled)) == 6
    assert decode_image_bytes(bytes(filled)).shape == (32, 32, 3)  # libjpeg reads it so too


def test_a_truncated_or_unterminated_jpeg_counts_what_is_there() -> None:
    bomb = _scan_bomb(64, 150)
    assert count_jpeg_scans(bomb[:-2]) == 156  # no EOI: libjpeg reads every scan up to the end
    assert count_jpeg_scans(bomb[:40]) == 0
    assert count_jpeg_scans(b"\xff\xd8") == 0
    assert count_jpeg_scans(b"\xff\xd8\xff\xda") == 1


def test_max_jpeg_scans_is_configurable_and_validated() -> None:
    assert parse_config({}).decode.max_jpeg_scans == 100
    assert decode_limits(parse_config({})).max_jpeg_scans == 100
    config = parse_config({"decode": {"max_jpeg_scans": 12}})
    assert decode_limits(config).max_jpeg_scans == 12
    for bad in (0, -1):
        with pytest.raises(ConfigError, match=r"decode\.max_jpeg_scans"):
            parse_config({"decode": {"max_jpeg_scans": bad}})
    with pytest.raises(ConfigError, match=r"decode\.max_jpeg_scans"):
        parse_config({"decode": {"max_jpeg_scans": "many"}})


# ---------------------------------------------------------------- MPO (JPEG with an MPF second picture)

ORANGE = (200, 50, 10)


def _mpo(preview_progressive: bool = False) -> bytes:
    main = Image.fromarray(np.full((480, 640, 3), ORANGE, np.uint8))
    preview = Image.fromarray(np.full((120, 160, 3), (10, 200, 50), np.uint8))
    data = _jpeg(main, "MPO", save_all=True, append_images=[preview], quality=95)
    if preview_progressive:  # the second picture (after the first's EOI, where its MPF offset points) swapped
        second = _segments(data)[-1][2]
        data = data[:second] + _repeat_last_ac_scan(_jpeg(preview, progressive=True), 20)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO" and img.n_frames == 2
    return data


def test_mpo_decodes_as_its_first_picture() -> None:
    data = _mpo()
    pixels = decode_image_bytes(data)
    assert pixels.shape == (480, 640, 3)
    np.testing.assert_allclose(pixels.reshape(-1, 3).mean(0), ORANGE, atol=2)


def test_mpo_takes_the_fast_path() -> None:
    data = _mpo()
    exact, exact_size = decode_frame_scaled(_frame(data), DecodeLimits(), None)
    small, size = decode_frame_scaled(_frame(data), DecodeLimits(), QUARTER)
    assert exact.shape == (480, 640, 3) and exact_size == size == (480, 640)
    assert small.shape == (120, 160, 3)  # libjpeg's 1/4 scale: decoded smaller, as a plain JPEG is
    np.testing.assert_allclose(small.reshape(-1, 3).mean(0), ORANGE, atol=2)
    plain = _jpeg(Image.fromarray(np.full((480, 640, 3), ORANGE, np.uint8)), quality=95)
    assert decode_frame_scaled(_frame(plain), DecodeLimits(), QUARTER)[0].shape == small.shape


def test_mpo_follows_the_jpeg_rules() -> None:
    with pytest.raises(FrameError) as err:
        decode_image_bytes(_mpo(), DecodeLimits(allowed_formats=frozenset({"PNG"})))
    assert err.value.reason == "unsupported_format"
    assert decode_image_bytes(_mpo(), DecodeLimits(allowed_formats=frozenset({"MPO"}))).shape == (480, 640, 3)
    # only the first picture is decoded, so only its scans count: a progressive preview does not
    data = _mpo(preview_progressive=True)
    assert count_jpeg_scans(data) == 1 and data.count(b"\xff\xda") == 31
    assert decode_image_bytes(data, DecodeLimits(max_jpeg_scans=1)).shape == (480, 640, 3)
    # a scan-bomb as the first picture is refused like any JPEG
    grey = _jpeg(Image.new("L", (64, 64), 128), "MPO", save_all=True, append_images=[Image.new("L", (16, 16))],
                 progressive=True)
    bomb = _repeat_last_ac_scan(grey, 150)  # spliced into the first picture, before its EOI
    with Image.open(io.BytesIO(bomb)) as img:
        assert img.format == "MPO"
    assert count_jpeg_scans(grey) == 6 and count_jpeg_scans(bomb) == 156
    for min_size in (None, QUARTER):
        with pytest.raises(FrameError, match="too_many_scans"):
            decode_frame_scaled(_frame(bomb), DecodeLimits(), min_size)
