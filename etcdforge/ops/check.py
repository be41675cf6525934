"""`etcdforge check`: one read-only audit of a live cluster, with an exit code that means something.

The checks (security, versions, health, storage, consistency, certificates, backups) are data in
`ops.checks_security`, `ops.checks_cluster` and `ops.checks_data`; this module gathers the facts
once, runs every check on them, and renders the result for people (rows), scripts (JSON, exit
code) and Prometheus (a textfile-collector file, written atomically). It takes no lock and
changes nothing, so it is safe from cron while another command changes the cluster.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from etcdforge.fsutil import PUBLIC_FILE, atomic_write
from etcdforge.ops.check_gather import gather
from etcdforge.ops.check_model import Check, Result, Row, run_checks, worst
from etcdforge.ops.checks_cluster import CLUSTER_CHECKS
from etcdforge.ops.checks_data import DATA_CHECKS
from etcdforge.ops.checks_security import SECURITY_CHECKS
from etcdforge.ops.target import Selection, deployed_spec, record_for

CHECKS: Sequence[Check] = (*SECURITY_CHECKS, *CLUSTER_CHECKS, *DATA_CHECKS)
#: Exit codes: every check passed / some check failed / some only warned.
EXIT_CODES = {Result.PASS: 0, Result.FAIL: 1, Result.WARN: 3}
TEXTFILE_NAME = "etcdforge.prom"


@dataclass(frozen=True)
class CheckReport:
    cluster: str
    checked_at: dt.datetime
    rows: tuple[Row, ...]

    @property
    def result(self) -> Result:
        return worst(self.rows)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.result]

    def count(self, result: Result) -> int:
        return sum(1 for r in self.rows if r.result is result)

    def as_json(self) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "checked_at": self.checked_at.isoformat(),
            "result": self.result.value,
            "exit_code": self.exit_code,
            "rows": [r.as_json() for r in self.rows],
        }


def check(selection: Selection) -> CheckReport:
    """Gather the facts of the selected cluster and judge them with every check."""
    record = record_for(selection)
    facts = asyncio.run(gather(record, deployed_spec(record)))
    return CheckReport(record.name, facts.now, tuple(run_checks(CHECKS, facts)))


def _label(value: str) -> str:
    """A Prometheus label value, escaped as the exposition format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


#: Per-row series: (name, help, value of a row).
SERIES: tuple[tuple[str, str, Callable[[Row], int]], ...] = (
    (
        "etcdforge_check",
        "1 when an etcdforge check passed or only warned, 0 when it failed.",
        lambda row: 0 if row.result is Result.FAIL else 1,
    ),
    (
        "etcdforge_check_warning",
        "1 when an etcdforge check warned.",
        lambda row: int(row.result is Result.WARN),
    ),
)


def textfile(report: CheckReport) -> str:
    """The report in the Prometheus text format, for node_exporter's textfile collector."""
    cluster = _label(report.cluster)
    lines = []
    for name, help_text, value in SERIES:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [
            f'{name}{{cluster="{cluster}",check="{_label(row.check)}",'
            f'member="{_label(row.member)}"}} {value(row)}'
            for row in report.rows
        ]
    last = "etcdforge_check_last_run_timestamp_seconds"
    lines += [
        f"# HELP {last} When etcdforge check last ran (Unix time).",
        f"# TYPE {last} gauge",
        f'{last}{{cluster="{cluster}"}} {report.checked_at.timestamp():.3f}',
    ]
    return "\n".join(lines) + "\n"


def write_textfile(directory: Path, report: CheckReport) -> Path:
    """`DIR/etcdforge.prom`, replaced atomically (temp file + rename): the collector never reads
    half a file."""
    path = directory / TEXTFILE_NAME
    atomic_write(path, textfile(report).encode(), PUBLIC_FILE)
    return path
