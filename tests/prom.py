"""A strict reader of the Prometheus text format, as `etcdforge check --textfile` writes it."""

from __future__ import annotations

import re

PROM_LINE = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def parse_prom(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """A strict reader of the lines we write: HELP/TYPE comments and `name{labels} value`."""
    series: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        match = PROM_LINE.match(line)
        assert match, line
        labels = tuple(re.findall(r'([a-z_]+)="((?:[^"\\]|\\.)*)"', match["labels"]))
        assert labels not in series.setdefault(match["name"], {}), line
        series[match["name"]][labels] = float(match["value"])
    return series
