"""README's wire-format tables, generated from the stream spec (``spec/streams.asyncapi.yaml``) and the one
list of dead-letter reasons (``inspectd/streams/reasons.py``), so the README cannot drift from either.

    python3 spec/readme_tables.py            # rewrite the tables in README.md
    python3 spec/readme_tables.py --check    # exit 1 (and say which table) when README.md is stale

Each table sits between ``<!-- spec:<name> -->`` and ``<!-- /spec:<name> -->`` in README.md; everything
between the two markers is replaced. tests/test_wire_spec.py runs the check and compares the rows field
by field (name, required, format, description).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "spec" / "streams.asyncapi.yaml"
README = ROOT / "README.md"

# README table name -> the spec's payload schema (components/schemas/<name>)
FIELD_TABLES = {
    "frame": "FrameFields",
    "result": "ResultFields",
    "dead_letter": "DeadLetterFields",
}
REASON_TABLE = "reasons"
HEADER = ("field", "required", "format", "meaning")


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    """The AsyncAPI document as plain data."""
    return yaml.safe_load(path.read_text())


def one_line(text: str) -> str:
    """A description as one table cell: whitespace collapsed; a ``|`` would split the cell, so it is refused."""
    cell = " ".join(str(text).split())
    if "|" in cell:
        raise ValueError(f"a table cell cannot contain '|': {cell!r}")
    return cell


def field_rows(schema: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(name, required, format, description) per property, in the spec's order."""
    required = set(schema.get("required", ()))
    rows = []
    for name, prop in schema["properties"].items():
        need = prop.get("x-required") or ("yes" if name in required else "no")
        rows.append((f"`{name}`", one_line(need), one_line(prop["x-format"]), one_line(prop["description"])))
    return rows


def reason_rows() -> list[tuple[str, str, str]]:
    """(reason, stage, input) per dead-letter reason, in the enum's order."""
    sys.path.insert(0, str(ROOT))
    from inspectd.streams.reasons import REASONS, Reason

    return [(f"`{reason.value}`", REASONS[reason][0], one_line(REASONS[reason][1])) for reason in Reason]


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tables(spec: dict[str, Any]) -> dict[str, str]:
    """Table name -> its markdown."""
    schemas = spec["components"]["schemas"]
    out = {name: markdown(HEADER, field_rows(schemas[schema])) + "\n" for name, schema in FIELD_TABLES.items()}
    out[REASON_TABLE] = markdown(("reason", "stage", "input"), reason_rows()) + "\n"
    return out


def _block(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- spec:{name} -->\n)(.*?)(<!-- /spec:{name} -->)", re.S)


def render(readme: str, spec: dict[str, Any]) -> str:
    """README text with every generated table replaced; ValueError when a table's markers are missing."""
    for name, table in tables(spec).items():
        pattern = _block(name)
        if not pattern.search(readme):
            raise ValueError(f"README has no <!-- spec:{name} --> ... <!-- /spec:{name} --> block")
        readme = pattern.sub(lambda m, t=table: m.group(1) + t + m.group(3), readme, count=1)
    return readme


def stale_tables(readme: str, spec: dict[str, Any]) -> list[str]:
    """Names of the tables whose README text differs from what the spec generates."""
    return [name for name, table in tables(spec).items()
            if (found := _block(name).search(readme)) is None or found.group(2) != table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md's tables are not up to date")
    args = parser.parse_args(argv)
    spec = load_spec()
    text = README.read_text()
    if args.check:
        stale = stale_tables(text, spec)
        if stale:
            print(f"README.md tables out of date: {', '.join(stale)}; run python3 spec/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    new = render(text, spec)
    if new != text:
        README.write_text(new)
        print("README.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
