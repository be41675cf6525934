"""JSON that remembers where each value starts, and Go durations: what cfssl's files are made of.

cfssl's JSON files are read with these so that every error names the file and the line:column of
the value at fault (`cfssl`), and expiries are Go's `time.ParseDuration` strings.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from etcdforge.errors import PKIError

JSONPath = tuple[str | int, ...]
GO_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


@dataclass(frozen=True)
class JSONDoc:
    """Parsed JSON that remembers where each value starts, for errors with line:column."""

    source: str
    text: str
    data: Any
    offsets: Mapping[JSONPath, int]
    key_offsets: Mapping[JSONPath, int]

    def where(self, path: JSONPath = (), key: bool = False) -> str:
        offset = (self.key_offsets if key else self.offsets).get(path, 0)
        line = self.text.count("\n", 0, offset) + 1
        column = offset - (self.text.rfind("\n", 0, offset) + 1) + 1
        return f"{self.source}:{line}:{column}"

    def error(self, path: JSONPath, message: str) -> PKIError:
        field = format_path(path)
        return PKIError(f"{self.where(path)}: {field + ': ' if field else ''}{message}")


def format_path(path: JSONPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def parse_json(text: str, source: str) -> JSONDoc:
    """Decode JSON; a syntax error names the file, line and column."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PKIError(
            f"{source}:{exc.lineno}:{exc.colno}: malformed JSON ({exc.msg}); fix the syntax"
        ) from None
    offsets, key_offsets = _offsets(text)
    return JSONDoc(source, text, data, offsets, key_offsets)


def _offsets(text: str) -> tuple[dict[JSONPath, int], dict[JSONPath, int]]:
    """Start offsets of every value and object key, by path (for text json.loads accepted)."""
    decoder = json.JSONDecoder()
    offsets: dict[JSONPath, int] = {}
    key_offsets: dict[JSONPath, int] = {}
    whitespace = " \t\n\r"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in whitespace:
            i += 1
        return i

    def value(i: int, path: JSONPath) -> int:
        i = skip(i)
        offsets[path] = i
        opener = text[i]
        if opener not in "{[":
            return decoder.raw_decode(text, i)[1]
        closer = "}" if opener == "{" else "]"
        i = skip(i + 1)
        index = 0
        while text[i] != closer:
            if opener == "{":
                start = i
                key, i = decoder.raw_decode(text, i)
                key_offsets[(*path, key)] = start
                i = skip(i) + 1  # the colon
                i = value(i, (*path, key))
            else:
                i = value(i, (*path, index))
                index += 1
            i = skip(i)
            if text[i] == ",":
                i = skip(i + 1)
        return i + 1

    value(0, ())
    return offsets, key_offsets


def get(doc: JSONDoc, path: JSONPath) -> Any:
    current = doc.data
    for part in path:
        current = current[part]
    return current


def expect(doc: JSONDoc, path: JSONPath, kind: type | tuple[type, ...], what: str) -> Any:
    value = get(doc, path)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise doc.error(path, f"expected {what}, found {json.dumps(value)}")
    return value


def check_keys(doc: JSONDoc, path: JSONPath, known: frozenset[str], what: str) -> None:
    for key in get(doc, path):
        if key not in known:
            where = (
                f"{doc.where((*path, key), key=True)}: {format_path(path) + ': ' if path else ''}"
            )
            raise PKIError(
                f"{where}unknown {what} key {key!r}; known keys: {', '.join(sorted(known))}"
            )


def parse_duration(text: str) -> dt.timedelta | None:
    """Go's time.ParseDuration (what cfssl uses for expiry): "8760h", "1h30m", "90s"."""
    if not text:
        return None
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return dt.timedelta(0)
    position = 0
    seconds = 0.0
    for match in GO_DURATION.finditer(body):
        if match.start() != position:
            return None
        seconds += float(match.group(1)) * GO_UNITS[match.group(2)]
        position = match.end()
    if position != len(body) or position == 0:
        return None
    return dt.timedelta(seconds=sign * seconds)


def positive_duration(doc: JSONDoc, path: JSONPath) -> dt.timedelta:
    text = expect(doc, path, str, 'a duration string such as "8760h"')
    duration = parse_duration(text)
    if duration is None or duration <= dt.timedelta(0):
        raise doc.error(
            path,
            f'{text!r} is not a positive Go duration; use hours, e.g. "8760h" for a year '
            "(units: h, m, s; no d or y)",
        )
    return duration
