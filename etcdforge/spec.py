"""The cluster description: a YAML file validated with pydantic, or the embedded default.

Every validation error becomes one `SpecError` line that names the file, the YAML line and the
field, so a user fixes the spec before anything is started or written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from etcdforge.errors import SpecError
from etcdforge.names import HOSTNAME_LABEL as HOSTNAME_LABEL
from etcdforge.names import SAFE_NAME as SAFE_NAME
from etcdforge.names import KeyAlgorithm as KeyAlgorithm
from etcdforge.names import initial_cluster, require_member
from etcdforge.names import is_hostname as is_hostname
from etcdforge.names import is_ip as is_ip
from etcdforge.names import is_loopback as is_loopback

MAX_MEMBERS = 7
DEFAULT_MEMBER_COUNTS = (1, 3, 5, 7)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def url_host(address: str) -> str:
    """IPv6 literals need brackets inside URLs."""
    return f"[{address}]" if ":" in address else address


class SSHSpec(_Strict):
    """How etcdforge reaches a host member; its presence makes the member a real host."""

    host: str | None = None  # default: the member's address
    port: int = Field(default=22, ge=1, le=65535)
    user: str = Field(default="root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    identity_file: Path | None = None  # default: the ssh agent and ~/.ssh/id_*
    known_hosts: Path | None = None  # default: ~/.ssh/known_hosts; host keys are always checked
    become: bool | None = None  # sudo -n for every command; default: on unless user is root
    connect_timeout: float = Field(default=10.0, gt=0, le=300)

    @field_validator("host")
    @classmethod
    def _ssh_host_valid(cls, value: str | None) -> str | None:
        if value is not None and not (is_ip(value) or is_hostname(value)):
            raise ValueError(f"{value!r} is not a valid IP address or hostname")
        return value

    @property
    def sudo(self) -> bool:
        return self.become if self.become is not None else self.user != "root"


def safe_name(value: str, what: str, why: str = "") -> str:
    """Names become file and directory names: no separators, no surprises."""
    if not SAFE_NAME.match(value):
        raise ValueError(
            f"{value!r} is not a safe {what} name: use lowercase letters, digits, '.', '-' "
            f"or '_', starting and ending with a letter or digit{why}"
        )
    return value


class MemberSpec(_Strict):
    name: str
    address: str
    client_port: int = Field(default=2379, ge=1, le=65535)
    peer_port: int = Field(default=2380, ge=1, le=65535)
    ssh: SSHSpec | None = None

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, value: str) -> str:
        return safe_name(value, "member", " (it becomes a file name)")

    @field_validator("address")
    @classmethod
    def _address_is_host(cls, value: str) -> str:
        if not (is_ip(value) or is_hostname(value)):
            raise ValueError(f"{value!r} is not a valid IP address or hostname")
        return value

    @model_validator(mode="after")
    def _ports_differ(self) -> Self:
        if self.client_port == self.peer_port:
            raise ValueError(
                f"client_port and peer_port are both {self.client_port}; give them different ports"
            )
        return self

    @property
    def client_url(self) -> str:
        """https only: there is never a plain-http listener, not even on loopback."""
        return f"https://{url_host(self.address)}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"https://{url_host(self.address)}:{self.peer_port}"


class PKISpec(_Strict):
    key_algorithm: KeyAlgorithm = KeyAlgorithm.ECDSA_P256
    ca_validity_days: int = Field(default=3650, ge=1, le=36500)
    cert_validity_days: int = Field(default=365, ge=1, le=36500)

    @model_validator(mode="after")
    def _leaves_within_ca(self) -> Self:
        if self.cert_validity_days > self.ca_validity_days:
            raise ValueError(
                f"cert_validity_days ({self.cert_validity_days}) exceeds ca_validity_days "
                f"({self.ca_validity_days}); a certificate cannot outlive its CA"
            )
        return self


class EtcdSpec(_Strict):
    binary: Path | None = None
    allow_unsafe_version: bool = False
    # Host clusters: the official release tarball, by version (from GitHub), URL, file or dir.
    version: str | None = Field(default=None, pattern=r"^v?\d+\.\d+\.\d+$")
    release: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("binary")
    @classmethod
    def _binary_absolute(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_absolute():
            raise ValueError(f"{str(value)!r} must be an absolute path to the etcd binary")
        return value


def _absolute(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError(f"{str(value)!r} must be an absolute path on the host")
    return value


class HostPathsSpec(_Strict):
    """Where a host member's files live; the conventional places by default."""

    bin_dir: Path = Path("/usr/local/bin")
    releases_dir: Path = Path("/opt/etcd")
    config_dir: Path = Path("/etc/etcd")
    pki_dir: Path = Path("/etc/etcd/pki")
    data_dir: Path = Path("/var/lib/etcd")
    unit: Path = Path("/etc/systemd/system/etcd.service")
    user: str = Field(default="etcd", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")

    _abs = field_validator("bin_dir", "releases_dir", "config_dir", "pki_dir", "data_dir", "unit")(
        _absolute
    )

    @field_validator("unit")
    @classmethod
    def _unit_name(cls, value: Path) -> Path:
        if value.suffix != ".service":
            raise ValueError(f"{str(value)!r} must name a systemd unit file ending in .service")
        return value


class StorageSpec(_Strict):
    """How each member keeps its database: rendered into every member's settings.

    Unset fields keep etcd's own defaults (a 2 GiB quota, no auto-compaction); the corruption
    checks are on wherever the release supports them (see `render.storage_settings`).
    """

    quota_backend_bytes: int | None = Field(default=None, ge=1 << 20, le=64 << 30)
    auto_compaction_mode: Literal["periodic", "revision"] | None = None
    auto_compaction_retention: str | None = Field(
        default=None, pattern=r"^(\d+|\d+(\.\d+)?(h|m|s))$"
    )
    snapshot_count: int | None = Field(default=None, ge=100, le=10_000_000)
    corruption_checks: bool = True

    @model_validator(mode="after")
    def _retention_with_mode(self) -> Self:
        if (self.auto_compaction_mode is None) != (self.auto_compaction_retention is None):
            raise ValueError(
                "auto_compaction_mode and auto_compaction_retention go together: set both "
                "(e.g. periodic and 1h, or revision and 10000) or neither"
            )
        if (
            self.auto_compaction_mode == "revision"
            and not str(self.auto_compaction_retention).isdigit()
        ):
            raise ValueError(
                f"auto_compaction_retention {self.auto_compaction_retention!r}: revision mode "
                "keeps a number of revisions; give a whole number such as 10000"
            )
        return self


class BackupSpec(_Strict):
    """Where `etcdforge backup` writes and what it keeps; `backup schedule` runs it."""

    # A directory (relative to the spec file) or ssh://user@host[:port]/path; default:
    # <state>/backups.
    dest: str | None = None
    keep_last: int = Field(default=24, ge=1, le=100_000)
    keep_daily_days: int = Field(default=7, ge=0, le=3650)  # newest of each day, this far back
    keep_weekly_days: int = Field(default=28, ge=0, le=3650)  # newest of each ISO week
    schedule: str = Field(default="hourly", min_length=1, max_length=200)  # systemd OnCalendar
    identity_file: Path | None = None  # for an ssh:// dest; default: agent and ~/.ssh/id_*
    known_hosts: Path | None = None  # for an ssh:// dest; default: ~/.ssh/known_hosts

    @field_validator("schedule")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value or "\\" in value:
            raise ValueError(f"{value!r}: give one systemd OnCalendar expression, e.g. daily")
        return value


class ClusterSpec(_Strict):
    name: str = "default"
    members: list[MemberSpec] = Field(min_length=1)
    etcd: EtcdSpec = EtcdSpec()
    host_paths: HostPathsSpec = HostPathsSpec()
    pki: PKISpec = PKISpec()
    storage: StorageSpec = StorageSpec()
    backup: BackupSpec = BackupSpec()
    state_dir: Path | None = None
    data_dir: Path | None = None
    cert_dir: Path | None = None

    @field_validator("name")
    @classmethod
    def _cluster_name_is_safe(cls, value: str) -> str:
        return safe_name(value, "cluster")

    @model_validator(mode="after")
    def _members_consistent(self, info: ValidationInfo) -> Self:
        count = len(self.members)
        if count > MAX_MEMBERS:
            raise ValueError(
                f"members: {count} members is more than {MAX_MEMBERS}; larger etcd clusters "
                "are slower and no safer"
            )
        allow_even = bool((info.context or {}).get("allow_even", False))
        if count % 2 == 0 and not allow_even:
            raise ValueError(
                f"members: {count} is an even count: it tolerates no more failures than "
                f"{count - 1}; use an odd count or pass --allow-even"
            )
        names: dict[str, int] = {}
        endpoints: dict[tuple[str, int], str] = {}
        for index, member in enumerate(self.members):
            if member.name in names:
                raise ValueError(
                    f"members[{index}].name: {member.name!r} is already used by "
                    f"members[{names[member.name]}]; member names must be unique"
                )
            names[member.name] = index
            for port in (member.client_port, member.peer_port):
                key = (member.address, port)
                if key in endpoints:
                    raise ValueError(
                        f"members[{index}].address: {member.address}:{port} is already used by "
                        f"member {endpoints[key]}; give each member its own address or ports"
                    )
                endpoints[key] = member.name
            if (member.ssh is None) != (self.members[0].ssh is None):
                raise ValueError(
                    f"members[{index}].ssh: either every member has an ssh section (a cluster "
                    "of real hosts) or none has (a local cluster); add or remove it"
                )
            if member.ssh is None and not is_loopback(member.address):
                raise ValueError(
                    f"members[{index}].address: {member.address} is not a loopback address; "
                    "a local cluster runs on this machine, so use 127.x.y.z"
                )
        return self

    @property
    def on_hosts(self) -> bool:
        """Members are real hosts reached over SSH (`apply`), not local processes (`up`)."""
        return self.members[0].ssh is not None

    def member(self, name: str) -> MemberSpec:
        return require_member(self.members, name, self.name, SpecError)

    @property
    def client_endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        return initial_cluster(self.members)


def default_spec(members: int = 3, name: str = "default") -> ClusterSpec:
    """The embedded local cluster: distinct loopback addresses on the standard ports."""
    data = {
        "name": name,
        "members": [
            {"name": f"etcd-{i}", "address": f"127.0.1.{i}"} for i in range(1, members + 1)
        ],
    }
    return parse_spec(data, source="<default>", allow_even=members % 2 == 0)


def parse_spec(
    data: Any, source: str, allow_even: bool = False, root: yaml.Node | None = None
) -> ClusterSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with 'name' and 'members' at the top level")
    try:
        return ClusterSpec.model_validate(data, context={"allow_even": allow_even})
    except ValidationError as exc:
        raise SpecError(_describe(exc, source, root)) from None


def load_spec(path: Path, allow_even: bool = False) -> ClusterSpec:
    """Read and validate a cluster YAML file, naming the line of the first error."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file; pass the cluster YAML with -f PATH") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise SpecError(
            f"{path}: cannot read the cluster file ({exc.__class__.__name__})"
        ) from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{where}: {problem}; fix the YAML syntax") from None
    spec = parse_spec(data, source=str(path), allow_even=allow_even, root=root)
    for key in ("state_dir", "data_dir", "cert_dir"):
        value = getattr(spec, key)
        if value is not None and not value.is_absolute():
            spec = spec.model_copy(update={key: (path.parent / value).resolve()})
    dest = spec.backup.dest
    if dest is not None and "://" not in dest and not Path(dest).is_absolute():
        backup = spec.backup.model_copy(update={"dest": str((path.parent / dest).resolve())})
        spec = spec.model_copy(update={"backup": backup})
    return spec


def _describe(exc: ValidationError, source: str, root: yaml.Node | None) -> str:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = f"unknown key {loc[-1]!r}; check its spelling (see the README for the fields)"
    field = _format_loc(loc)
    # A model-level error names its own field already ("members[1].name: ...").
    embedded = re.match(r"^members(?:\[(\d+)\])?(?:\.(\w+))?: ", message)
    if embedded:
        index, key = embedded.groups()
        loc = ("members",) + ((int(index),) if index else ()) + ((key,) if key else ())
        field = ""
    line = _yaml_line(root, loc) if root is not None else None
    where = f"{source}:{line}" if line is not None else source
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{where}: {field + ': ' if field else ''}{message}{suffix}"


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _yaml_line(root: yaml.Node, loc: tuple[Any, ...]) -> int | None:
    """Follow a pydantic error location through the YAML node tree to a 1-based line."""
    current: yaml.Node = root
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(current, yaml.MappingNode):
            pair = next(((k, v) for k, v in current.value if k.value == part), None)
            if pair is None:
                break
            line = pair[0].start_mark.line + 1
            current = pair[1]
        elif isinstance(current, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(current.value):
                break
            current = current.value[part]
            line = current.start_mark.line + 1
        else:
            break
    return line
