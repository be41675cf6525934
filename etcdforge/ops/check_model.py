"""`etcdforge check`, the model: facts gathered from a live cluster, and checks as data.

A check is an id, a title, the source it follows (cited in its module) and a pure function from
the gathered facts to findings: one per member, per certificate, or one for the whole cluster,
each a result (pass / warn / fail), what was seen and how to fix it in one line. Gathering
(`ops.check_gather`) is the only part with side effects, so every check is tested on recorded
facts (`tests/fixtures/check/`), the way pyinfra tests its facts on recorded command output.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

from etcdforge.client import Alarm, EndpointStatus, HashKV, Member
from etcdforge.ops.cert_check import CertRow

CLUSTER = "cluster"  # the member column of a row about the whole cluster


class Result(StrEnum):
    PASS = "pass"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Verdict:
    result: Result
    seen: str
    fix: str = ""


def passed(seen: str) -> Verdict:
    return Verdict(Result.PASS, seen)


def warned(seen: str, fix: str) -> Verdict:
    return Verdict(Result.WARN, seen, fix)


def failed(seen: str, fix: str) -> Verdict:
    return Verdict(Result.FAIL, seen, fix)


@dataclass(frozen=True)
class Finding:
    member: str
    verdict: Verdict


@dataclass(frozen=True)
class Row:
    """One line of the report: a check on one member (or certificate, or the cluster)."""

    check: str
    title: str
    member: str
    result: Result
    seen: str
    fix: str
    source: str = ""

    def as_json(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FileStat:
    mode: int  # permission bits, e.g. 0o600
    owner: str  # user:group


@dataclass(frozen=True)
class MemberFacts:
    """What one member's process and machine showed; `error` when they could not be read."""

    name: str
    label: str
    running: bool
    settings: Mapping[str, str] = field(default_factory=dict)  # flag name -> value, env merged
    error: str | None = None
    data_dir: str = ""
    data_dir_stat: FileStat | None = None  # None: missing
    files: Mapping[str, FileStat | None] = field(default_factory=dict)  # by setting name
    free_bytes: int | None = None  # on the data dir's filesystem
    clock_skew: float | None = None  # seconds ahead of the admin machine
    cas: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # sha256 hex per CA file
    expected_owner: str = ""  # user:group the data dir should belong to

    @property
    def inspected(self) -> bool:
        return self.running and self.error is None


@dataclass(frozen=True)
class Facts:
    """Everything the checks judge, gathered once per run (`ops.check_gather`)."""

    cluster: str
    on_hosts: bool
    allow_unsafe_version: bool
    version: str  # as deployed (the record), for members that do not answer
    now: dt.datetime
    members: tuple[MemberFacts, ...]
    status_start: Mapping[str, EndpointStatus]  # by member name
    status_end: Mapping[str, EndpointStatus]
    member_list: tuple[Member, ...] | None = None
    alarms: tuple[Alarm, ...] | None = None
    hash_revision: int | None = None
    hashes: Mapping[str, HashKV] = field(default_factory=dict)
    hash_errors: Mapping[str, str] = field(default_factory=dict)
    certificates: tuple[CertRow, ...] = ()
    newest_backup: dt.datetime | None = None
    errors: Mapping[str, str] = field(default_factory=dict)  # what could not be read, by fact

    def member_version(self, name: str) -> str:
        status = self.status_start.get(name)
        return status.version if status is not None and status.version else self.version

    def name_of_id(self, member_id: str) -> str | None:
        for name, status in self.status_start.items():
            if status.member_id == member_id:
                return name
        return None


Judge = Callable[[Facts], list[Finding]]


@dataclass(frozen=True)
class Check:
    """A check as data: what it is called, whose rule it follows, and the pure judgement."""

    id: str
    title: str
    source: str
    evaluate: Judge

    def rows(self, facts: Facts) -> list[Row]:
        return [
            Row(self.id, self.title, f.member, *_parts(f.verdict), self.source)
            for f in self.evaluate(facts)
        ]


def _parts(verdict: Verdict) -> tuple[Result, str, str]:
    return verdict.result, verdict.seen, verdict.fix


def per_member(judge: Callable[[MemberFacts, Facts], Verdict]) -> Judge:
    """A check judged on each member alone."""
    return lambda facts: [Finding(m.name, judge(m, facts)) for m in facts.members]


def for_cluster(judge: Callable[[Facts], Verdict]) -> Judge:
    """A check judged once, on the whole cluster."""
    return lambda facts: [Finding(CLUSTER, judge(facts))]


def run_checks(checks: Sequence[Check], facts: Facts) -> list[Row]:
    return [row for check in checks for row in check.rows(facts)]


def worst(rows: Sequence[Row]) -> Result:
    results = {r.result for r in rows}
    for result in (Result.FAIL, Result.WARN):
        if result in results:
            return result
    return Result.PASS


# --- recorded facts (fixtures) -----------------------------------------------------------


def facts_to_json(facts: Facts) -> dict[str, Any]:
    """Facts as JSON, to record a live cluster's facts for the checks' unit tests."""
    data = asdict(facts)
    data["now"] = facts.now.isoformat()
    data["newest_backup"] = facts.newest_backup.isoformat() if facts.newest_backup else None
    return data


def facts_from_json(data: Mapping[str, Any]) -> Facts:
    """The inverse of `facts_to_json` (tuples and nested records rebuilt)."""
    backup = data.get("newest_backup")
    facts = Facts(
        cluster=data["cluster"],
        on_hosts=data["on_hosts"],
        allow_unsafe_version=data["allow_unsafe_version"],
        version=data["version"],
        now=dt.datetime.fromisoformat(data["now"]),
        members=tuple(_member_from_json(m) for m in data["members"]),
        status_start={k: _status(v) for k, v in data["status_start"].items()},
        status_end={k: _status(v) for k, v in data["status_end"].items()},
    )
    members = data.get("member_list")
    alarms = data.get("alarms")
    return replace(
        facts,
        member_list=None if members is None else tuple(_member(m) for m in members),
        alarms=None if alarms is None else tuple(Alarm(**a) for a in alarms),
        hash_revision=data.get("hash_revision"),
        hashes={k: HashKV(**v) for k, v in data.get("hashes", {}).items()},
        hash_errors=dict(data.get("hash_errors", {})),
        certificates=tuple(_cert_row(c) for c in data.get("certificates", [])),
        newest_backup=dt.datetime.fromisoformat(backup) if backup else None,
        errors=dict(data.get("errors", {})),
    )


def _member_from_json(data: Mapping[str, Any]) -> MemberFacts:
    def stat(value: Mapping[str, Any] | None) -> FileStat | None:
        return FileStat(**value) if value is not None else None

    return MemberFacts(
        **{k: v for k, v in data.items() if k not in ("data_dir_stat", "files", "cas")},
        data_dir_stat=stat(data.get("data_dir_stat")),
        files={k: stat(v) for k, v in data.get("files", {}).items()},
        cas={k: tuple(v) for k, v in data.get("cas", {}).items()},
    )


def _status(data: Mapping[str, Any]) -> EndpointStatus:
    return EndpointStatus(**{**data, "errors": tuple(data.get("errors", ()))})


def _member(data: Mapping[str, Any]) -> Member:
    return Member(
        **{**data, "peer_urls": tuple(data["peer_urls"]), "client_urls": tuple(data["client_urls"])}
    )


def _cert_row(data: Mapping[str, Any]) -> CertRow:
    tuples = ("sans", "usages", "problems")
    fields: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data.items()}
    return CertRow(**fields)
