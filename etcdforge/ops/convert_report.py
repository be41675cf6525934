"""What `plan` shows for an adopted cluster, and what `apply` shows before converting it.

Read live from every member (`ops.adopt_probe`, the reader `adopt` uses): the findings with their
fixes (`adopt_findings`), the conversion member by member in the order the rolling policy takes
(a member caught mid-conversion first, then followers, the leader last), and the processes
connected to each member's plain-http listener, which the conversion cuts off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from etcdforge.adopt_findings import Finding, findings
from etcdforge.adopt_model import Connection, plain_http_clients
from etcdforge.adoption import Adoption
from etcdforge.errors import EtcdClientError
from etcdforge.hosts import Host, fan_out
from etcdforge.ops.adopt_probe import read_host
from etcdforge.ops.convert import MemberState, Phase
from etcdforge.ops.health import leader_name
from etcdforge.ops.rolling import followers_first
from etcdforge.record import ClusterRecord


@dataclass(frozen=True)
class ConversionStep:
    member: str
    label: str
    what: str
    leader: bool


@dataclass(frozen=True)
class AdoptionReport:
    converted: bool
    findings: tuple[Finding, ...]
    steps: tuple[ConversionStep, ...]  # in the order `apply` takes them
    clients: tuple[tuple[str, tuple[Connection, ...]], ...]  # host label, plain-http clients
    ca_keys: tuple[str, ...]  # "member:path" still on the members

    @property
    def cut_off(self) -> int:
        return sum(len(found) for _, found in self.clients)


async def conversion_report(
    adoption: Adoption,
    record: ClusterRecord,
    hosts: Mapping[str, Host],
    states: Mapping[str, MemberState],
    reasons: Mapping[str, str],
) -> AdoptionReport:
    keys = adoption.found.ca_keys
    names = list(hosts)
    readings = await fan_out(
        names, lambda n: hosts[n].label, lambda n: read_host(hosts[n], keys.get(n, ()))
    )
    by_name = dict(zip(names, readings, strict=True))
    recorded = [p for paths in keys.values() for p in paths]
    leader = await _leader(record)
    phases = {n: s.phase for n, s in states.items()}  # empty once the conversion is done
    half = [n for n in names if phases.get(n) is Phase.HALF]
    taking = [n for n in names if phases.get(n) is Phase.RUNBOOK]
    steps = tuple(
        ConversionStep(n, hosts[n].label, reasons[n], n == leader)
        for n in [*half, *followers_first(taking, leader)]
    )
    clients = tuple((hosts[n].label, tuple(plain_http_clients(by_name[n]))) for n in names)
    left = tuple(
        f"{n}:{p}" for n in names for p in keys.get(n, ()) if by_name[n].files.get(p) is not None
    )
    return AdoptionReport(
        adoption.converted, tuple(findings(list(by_name.items()), recorded)), steps, clients, left
    )


async def _leader(record: ClusterRecord) -> str | None:
    try:
        return await leader_name(record)
    except EtcdClientError:
        return None
