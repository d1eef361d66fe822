"""Text every sink can encode: one escaping rule for names that are not valid UTF-8, wherever they are met."""

from __future__ import annotations


def safe_text(text: str) -> str:
    """``text`` (a file name, an id, a detail) as valid Unicode: bytes of a name that are not UTF-8 (a Latin-1
    ``Pr\\xfcfteil.png`` from an old PC or a share; Python keeps them as surrogate escapes, which no sink can
    encode) are written ``\\xfc``, so one name has one id whether the folder source or the publisher escaped it.
    File operations keep the real ``Path``."""
    text = str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates (ill-formed UTF-16 names on Windows)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
