"""What `etcdforge adopt` reads on a hand-built cluster, and what it makes of it: pure functions.

A host is read once (`ops.adopt_probe` runs one read-only script and a file read): the etcd
process it runs (command line, environment, binary, version), the unit that runs it, the files its
flags name, its data dir, its TCP connections. Everything here is a pure function of those
readings and of each member's own answer to `member list`, so every refusal is one line tested
without a host, and nothing is ever written for a cluster `adopt` does not fully understand.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from etcdforge.client import Member
from etcdforge.errors import EtcdforgeError

#: The files an etcd member's TLS flags name, by flag.
TLS_FLAGS = (
    "trusted-ca-file",
    "cert-file",
    "key-file",
    "peer-trusted-ca-file",
    "peer-cert-file",
    "peer-key-file",
)
#: etcd's own default when --data-dir is not given: "<name>.etcd" in its working directory.
RELATIVE_DATA_DIR = "data dir {value!r} is relative to etcd's working directory"


class AdoptError(EtcdforgeError):
    """The cluster is not one `adopt` understands; nothing was written."""


@dataclass(frozen=True)
class Connection:
    """One established TCP connection from `ss -Htnp`, seen from the process that owns it."""

    local: str  # address:port
    peer: str
    process: str
    pid: int | None


@dataclass(frozen=True)
class HostReading:
    """One host as the probe found it. `pid` is None when no etcd runs there."""

    label: str
    pid: int | None = None
    unit: str = ""  # the systemd unit the process runs in ("" when none)
    unit_path: str = ""  # the unit file systemd loaded it from
    unit_text: str = ""
    unknown_units: tuple[str, ...] = ()  # names in the unit's After=/Wants=/Requires= systemd lacks
    argv: tuple[str, ...] = ()
    environ: Mapping[str, str] = field(default_factory=dict)
    exe: str = ""
    version: str = ""
    connections: tuple[Connection, ...] = ()
    files: Mapping[str, bytes | None] = field(default_factory=dict)  # None: missing
    has_member_data: bool = False

    @property
    def settings(self) -> dict[str, str]:
        """etcd's settings by flag name: ETCD_* variables, then flags (a flag wins, as in etcd)."""
        return {**environ_settings(self.environ), **cmdline_settings(self.argv)}


# --- parsing the probe ---------------------------------------------------------------------


def cmdline_settings(argv: Sequence[str]) -> dict[str, str]:
    """`--name=x`, `-name=x`, `--name x` and bare boolean `--flag` after argv[0]."""
    found: dict[str, str] = {}
    args = list(argv[1:])
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            continue
        name, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            following = args[index] if index < len(args) else None
            if following is not None and not following.startswith("-"):
                value, index = following, index + 1
            else:
                value = "true"
        found[name] = value
    return found


def environ_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """`ETCD_LISTEN_CLIENT_URLS=...` as `listen-client-urls`."""
    return {
        key.removeprefix("ETCD_").lower().replace("_", "-"): value
        for key, value in environ.items()
        if key.startswith("ETCD_")
    }


def nul_list(encoded: str) -> list[str]:
    """A base64 `/proc/PID/cmdline` or `environ` as its NUL-separated strings."""
    raw = base64.b64decode(encoded or "")
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


_USERS = re.compile(r'users:\(\("(?P<name>[^"]+)",pid=(?P<pid>\d+)')


def parse_connections(text: str) -> tuple[Connection, ...]:
    """`ss -Htnp` lines: State Recv-Q Send-Q Local:Port Peer:Port users:(("name",pid=N,fd=M))."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[0] != "ESTAB":
            continue
        match = _USERS.search(line)
        process, pid = (match["name"], int(match["pid"])) if match else ("unknown process", None)
        found.append(Connection(parts[3], parts[4], process, pid))
    return tuple(found)


def unit_dependencies(unit_text: str) -> list[str]:
    """The unit names a unit file orders itself after or pulls in (After=, Wants=, Requires=)."""
    names: list[str] = []
    for line in unit_text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key.strip() in ("After", "Wants", "Requires"):
            names += [n for n in value.split() if n not in names]
    return names


def key_beside(cert_path: str) -> str:
    """Where cfssljson (`ca.pem` -> `ca-key.pem`) or kubeadm (`ca.crt` -> `ca.key`) put a key."""
    path = PurePosixPath(cert_path)
    if path.suffix == ".pem":
        return str(path.with_name(path.stem + "-key.pem"))
    return str(path.with_suffix(".key"))


def client_pair_beside(ca_path: str) -> tuple[str, str]:
    """The runbook's client certificate, copied beside the CA: `client.pem`, `client-key.pem`."""
    directory = PurePosixPath(ca_path).parent
    return str(directory / "client.pem"), str(directory / "client-key.pem")


# --- one member's settings -----------------------------------------------------------------


def urls(settings: Mapping[str, str], flag: str) -> list[str]:
    return [u.strip() for u in settings.get(flag, "").split(",") if u.strip()]


def plain_http_urls(settings: Mapping[str, str]) -> list[str]:
    """Client listeners without TLS: anyone who can connect reads and writes every key."""
    return [u for u in urls(settings, "listen-client-urls") if u.startswith("http://")]


def https_client_url(reading: HostReading) -> str:
    for url in urls(reading.settings, "advertise-client-urls"):
        if url.startswith("https://"):
            return url
    raise AdoptError(
        f"{reading.label}: etcd advertises no https client URL "
        f"({reading.settings.get('advertise-client-urls', 'none')}); adopt needs a TLS cluster"
    )


def plain_http_clients(reading: HostReading) -> list[Connection]:
    """Processes connected to the member's plain-http listener (etcd's own gateway excluded)."""
    listeners = set()
    for url in plain_http_urls(reading.settings):
        parts = urlsplit(url)
        listeners.add(f"{parts.hostname}:{parts.port or 80}")
    return [
        c
        for c in reading.connections
        if c.peer in listeners and (c.pid is None or c.pid != reading.pid)
    ]


def required_files(reading: HostReading) -> list[tuple[str, str]]:
    """(flag, path) of every TLS file the member's flags name; refused when one is missing."""
    settings = reading.settings
    named = [(flag, settings[flag]) for flag in TLS_FLAGS if settings.get(flag)]
    for flag, path in named:
        if reading.files.get(path) is None and path in reading.files:
            raise AdoptError(
                f"{reading.label}: {path} (--{flag} of the running etcd) is missing; restore it "
                "(etcd re-reads it on every new connection) and rerun adopt"
            )
    return named


def require_member(reading: HostReading) -> None:
    if reading.pid is None:
        raise AdoptError(
            f"{reading.label}: not an etcd member (no etcd process runs there); "
            "pass only the hosts of the cluster's running members"
        )


# --- the member list -----------------------------------------------------------------------


@dataclass(frozen=True)
class Listing:
    """One member's answer to `member list`: its cluster ID, its own ID, the members."""

    cluster_id: str
    member_id: str
    members: tuple[Member, ...]  # IDs in hex, as etcdctl prints them


def parse_listing(payload: Mapping[str, Any]) -> Listing:
    """The JSON gateway's /v3/cluster/member/list answer (64-bit ints as decimal strings)."""
    header = payload.get("header", {})
    members = tuple(
        Member(
            id=f"{int(m['ID']):x}",
            name=m.get("name", ""),
            peer_urls=tuple(m.get("peerURLs", [])),
            client_urls=tuple(m.get("clientURLs", [])),
            is_learner=bool(m.get("isLearner", False)),
        )
        for m in payload.get("members", [])
    )
    cluster_id, member_id = (int(header.get(k, 0)) for k in ("cluster_id", "member_id"))
    return Listing(f"{cluster_id:x}", f"{member_id:x}", members)


def same_cluster(listings: Mapping[str, Listing]) -> Listing:
    """Every host's member must answer for one cluster: hosts of two clusters are refused."""
    by_cluster: dict[str, list[str]] = {}
    for label, listing in listings.items():
        by_cluster.setdefault(listing.cluster_id, []).append(label)
    if len(by_cluster) > 1:
        groups = "; ".join(f"{', '.join(v)} in cluster {k}" for k, v in by_cluster.items())
        raise AdoptError(
            f"the hosts belong to {len(by_cluster)} clusters ({groups}); adopt one cluster at "
            "a time, passing the hosts of all its members"
        )
    return next(iter(listings.values()))


# --- matching hosts to members -------------------------------------------------------------

#: etcdforge's unit on an adopted member: the runbook's `etcd.service` is masked, so ours needs
#: another name.
ADOPTED_UNIT = "/etc/systemd/system/etcd-member.service"


@dataclass(frozen=True)
class AdoptedMember:
    name: str
    id: str  # hex, as etcdctl prints it
    label: str  # the host as given to --host
    address: str  # from its peer URL: where it listens
    client_port: int
    peer_port: int


@dataclass(frozen=True)
class Adopted:
    """A cluster `adopt` understood: one cluster, every member on a given host, one CA."""

    cluster_id: str
    token: str
    version: str
    data_dir: str
    bin_dir: str
    unit: str  # the runbook's unit name (etcd.service)
    unit_path: str
    members: tuple[AdoptedMember, ...]
    ca_keys: Mapping[str, tuple[str, ...]]  # member name -> CA key files found beside its CAs


def _port(url: str, default: int) -> int:
    return urlsplit(url).port or default


def match_members(readings: Sequence[HostReading], listing: Listing) -> list[AdoptedMember]:
    """Each host runs one listed member and each listed member runs on a given host."""
    listed = {m.name: m for m in listing.members}
    matched: dict[str, AdoptedMember] = {}
    for reading in readings:
        name = reading.settings.get("name", "default")
        member = listed.get(name)
        if member is None:
            known = ", ".join(sorted(listed)) or "none"
            raise AdoptError(
                f"{reading.label}: runs etcd member {name!r}, which is not in the cluster's member "
                f"list ({known}); pass the hosts of this cluster's members only"
            )
        if name in matched:
            raise AdoptError(
                f"{reading.label} and {matched[name].label} both run member {name!r}; "
                "pass each member's host once"
            )
        if member.is_learner or not member.peer_urls:
            raise AdoptError(
                f"{reading.label}: member {name!r} is a learner or not started; promote or "
                "remove it first (adopt takes voting members only)"
            )
        peer = member.peer_urls[0]
        client = https_client_url(reading)
        matched[name] = AdoptedMember(
            name, member.id, reading.label, urlsplit(peer).hostname or "", _port(client, 2379),
            _port(peer, 2380),
        )  # fmt: skip
    missing = [m for m in listing.members if m.name not in matched]
    if missing:
        named = ", ".join(f"{m.name} ({', '.join(m.peer_urls)})" for m in missing)
        raise AdoptError(
            f"the cluster's member list has {len(listing.members)} members but "
            f"{len(readings)} hosts were given; no --host runs {named}: pass every member's host"
        )
    return [matched[r.settings.get("name", "default")] for r in readings]


def common(readings: Sequence[HostReading], what: str, value: Any) -> str:
    """The one value every member agrees on (`value(reading)`), or a refusal naming who differs."""
    seen: dict[str, list[str]] = {}
    for reading in readings:
        seen.setdefault(str(value(reading)), []).append(reading.label)
    if len(seen) > 1:
        detail = "; ".join(f"{v or 'none'} on {', '.join(labels)}" for v, labels in seen.items())
        raise AdoptError(
            f"the members disagree on {what} ({detail}); make them agree, then rerun adopt"
        )
    return next(iter(seen))


def absolute_data_dir(reading: HostReading) -> str:
    value = reading.settings.get("data-dir", f"{reading.settings.get('name', 'default')}.etcd")
    if not value.startswith("/"):
        raise AdoptError(
            f"{reading.label}: {RELATIVE_DATA_DIR.format(value=value)}; set an absolute "
            "--data-dir and restart it first"
        )
    return value


def adopted_cluster(
    readings: Sequence[HostReading], listing: Listing, ca_fingerprints: Any
) -> Adopted:
    """Everything `adopt` needs to agree before it writes anything; `ca_fingerprints(data)` names
    a CA bundle by its certificates (the PKI layer parses them)."""
    for flag in ("trusted-ca-file", "peer-trusted-ca-file"):
        common(readings, f"the CA (--{flag})", lambda r, f=flag: _ca_id(r, f, ca_fingerprints))
    first = readings[0]
    if _ca_id(first, "trusted-ca-file", ca_fingerprints) != _ca_id(
        first, "peer-trusted-ca-file", ca_fingerprints
    ):
        raise AdoptError(
            f"{first.label}: the peers have a CA of their own (--peer-trusted-ca-file differs "
            "from --trusted-ca-file); adopt takes the runbook's one-CA clusters only"
        )
    members = match_members(readings, listing)
    ca_keys = {
        m.name: tuple(p for p in _ca_key_paths(r) if r.files.get(p) is not None)
        for m, r in zip(members, readings, strict=True)
    }
    return Adopted(
        cluster_id=listing.cluster_id,
        token=common(readings, "--initial-cluster-token", lambda r: r.settings.get(
            "initial-cluster-token", "etcd-cluster")),
        version=common(readings, "the etcd version", lambda r: r.version),
        data_dir=common(readings, "the data dir", absolute_data_dir),
        bin_dir=common(readings, "the binary's directory", _bin_dir),
        unit=common(readings, "the systemd unit", lambda r: r.unit),
        unit_path=common(readings, "the unit file", lambda r: r.unit_path),
        members=tuple(members),
        ca_keys=ca_keys,
    )  # fmt: skip


def _bin_dir(reading: HostReading) -> str:
    return str(PurePosixPath(reading.exe).parent)


def _ca_id(reading: HostReading, flag: str, ca_fingerprints: Any) -> str:
    path = reading.settings.get(flag)
    data = reading.files.get(path) if path else None
    if data is None:
        raise AdoptError(
            f"{reading.label}: the running etcd has no --{flag}; adopt takes TLS clusters only"
        )
    return str(ca_fingerprints(data))


def _ca_key_paths(reading: HostReading) -> list[str]:
    """Where a CA key would sit beside the member's CA files (the runbook copies it there)."""
    settings = reading.settings
    cas = [settings[f] for f in ("trusted-ca-file", "peer-trusted-ca-file") if settings.get(f)]
    return list(dict.fromkeys(key_beside(p) for p in cas))


def wanted_files(reading: HostReading) -> list[str]:
    """Every file adopt reads from a member: its TLS files, the CA keys and client pair beside."""
    settings = reading.settings
    named = [settings[f] for f in TLS_FLAGS if settings.get(f)]
    extra = _ca_key_paths(reading)
    if settings.get("trusted-ca-file"):
        extra += client_pair_beside(settings["trusted-ca-file"])
    return list(dict.fromkeys([*named, *extra]))


def spec_data(
    adopted: Adopted,
    name: str,
    logins: Mapping[str, Mapping[str, Any]],
    etcd: Mapping[str, Any],
    state_dir: str | None = None,
) -> dict[str, Any]:
    """The cluster YAML of an adopted cluster: its members as they are, paths as found."""
    members = []
    for member in adopted.members:
        ssh = dict(logins[member.label])
        if ssh.get("host") == member.address:
            ssh.pop("host")
        entry: dict[str, Any] = {"name": member.name, "address": member.address}
        if member.client_port != 2379:
            entry["client_port"] = member.client_port
        if member.peer_port != 2380:
            entry["peer_port"] = member.peer_port
        members.append({**entry, "ssh": ssh})
    data: dict[str, Any] = {
        "name": name,
        "members": members,
        "etcd": dict(etcd),
        "host_paths": {
            "bin_dir": adopted.bin_dir,
            "data_dir": adopted.data_dir,
            "unit": ADOPTED_UNIT,
        },
    }
    if state_dir is not None:
        data["state_dir"] = state_dir
    return data
