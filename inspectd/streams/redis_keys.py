"""Redis stream key naming, Cluster-ready: ``<prefix>:{<line>}:<kind>``; the ``{line}`` hash tag puts a
line's frames, results and dead letters on one shard (one slot), so a pipeline per line stays local.
Also the default server URL the CLI tools use."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

DEFAULT_PREFIX = "inspect"
KIND_FRAMES = "frames"
KIND_RESULTS = "results"
KIND_DEAD = "dead"
KINDS = (KIND_FRAMES, KIND_RESULTS, KIND_DEAD)

REDIS_URL_ENV = "INSPECTD_REDIS_URL"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

_KEY_RE = re.compile(r"^(?P<prefix>.*):\{(?P<line>[^{}]+)\}:(?P<kind>[^:{}]+)$")


def default_redis_url() -> str:
    """``$INSPECTD_REDIS_URL`` or the local default."""
    return os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL


def validate_line(line: str) -> str:
    """A line id usable inside a hash tag: non-empty, no braces, no whitespace."""
    if not line or any(c in line for c in "{}") or any(c.isspace() for c in line):
        raise ValueError(f"invalid line id {line!r}: must be non-empty without braces or whitespace")
    return line


def stream_key(line: str, kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``<prefix>:{<line>}:<kind>``, e.g. ``inspect:{line-1}:frames``."""
    if kind not in KINDS:
        raise ValueError(f"unknown stream kind {kind!r}, expected one of {KINDS}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"prefix {prefix!r} must not contain braces (the line is the hash tag)")
    return f"{prefix}:{{{validate_line(line)}}}:{kind}"


def frames_key(line: str, prefix: str = DEFAULT_PREFIX) -> str:
    return stream_key(line, KIND_FRAMES, prefix)


def results_key(line: str, prefix: str = DEFAULT_PREFIX) -> str:
    return stream_key(line, KIND_RESULTS, prefix)


def dead_key(line: str, prefix: str = DEFAULT_PREFIX) -> str:
    return stream_key(line, KIND_DEAD, prefix)


def parse_key(key: str | bytes) -> tuple[str, str, str] | None:
    """``(prefix, line, kind)`` of a key built here, or None for any other key."""
    text = key.decode() if isinstance(key, bytes) else key
    match = _KEY_RE.match(text)
    if match is None:
        return None
    return match["prefix"], match["line"], match["kind"]


def line_of_key(key: str | bytes) -> str:
    """The line id from a key's hash tag; "" when the key does not follow the naming."""
    parsed = parse_key(key)
    return parsed[1] if parsed else ""


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """Key naming with one configured prefix."""

    prefix: str = DEFAULT_PREFIX

    def frames(self, line: str) -> str:
        return frames_key(line, self.prefix)

    def results(self, line: str) -> str:
        return results_key(line, self.prefix)

    def dead(self, line: str) -> str:
        return dead_key(line, self.prefix)
