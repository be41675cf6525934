"""Pure rendering: a member's etcd settings from the spec, as flags or as an environment file.

The settings are one ordered mapping of etcd flag names to values. Locally they become the
process's command line; on hosts they become an `ETCD_*` environment file next to a unit that
never changes. Flags rather than `--config-file` because the config file cannot express every
setting on every supported release (`peer-cert-allowed-cn` is missing before 3.5.14), and because a
config file silently disables all flags and environment variables.
"""

from __future__ import annotations

from etcdforge.binaries import Version
from etcdforge.layout import MemberFiles as MemberFiles
from etcdforge.spec import ClusterSpec, MemberSpec, StorageSpec

Settings = dict[str, str]


def etcd_settings(
    spec: ClusterSpec,
    member: MemberSpec,
    files: MemberFiles,
    token: str,
    initial_state: str = "new",
    peer_allowed_cn: str | None = None,
    initial_cluster: str | None = None,
    version: Version | None = None,
) -> Settings:
    """Mutual TLS on both ports and no plain-http listener: the seed's defects, fixed.

    `peer_allowed_cn` pins the peer port to one certificate CN; it is needed only when the peer
    and client certificates share a CA (an imported single-CA PKI). `initial_cluster` (default:
    the spec's members) is the live member list a member joins (state "existing"): etcd checks
    that it names exactly the members the cluster has. `version`, the release the member runs,
    decides which corruption checks it can be asked for.
    """
    settings: Settings = {
        "name": member.name,
        "data-dir": str(files.data_dir),
        "listen-client-urls": member.client_url,
        "advertise-client-urls": member.client_url,
        "listen-peer-urls": member.peer_url,
        "initial-advertise-peer-urls": member.peer_url,
        "initial-cluster": initial_cluster or spec.initial_cluster,
        "initial-cluster-token": token,
        "initial-cluster-state": initial_state,
        "cert-file": str(files.server_cert),
        "key-file": str(files.server_key),
        "trusted-ca-file": str(files.trusted_ca),
        "client-cert-auth": "true",
        "peer-cert-file": str(files.peer_cert),
        "peer-key-file": str(files.peer_key),
        "peer-trusted-ca-file": str(files.peer_trusted_ca),
        "peer-client-cert-auth": "true",
        "enable-v2": "false",
        "strict-reconfig-check": "true",
        "logger": "zap",
        "log-outputs": "stderr",
    }
    if peer_allowed_cn:
        settings["peer-cert-allowed-cn"] = peer_allowed_cn
    settings.update(storage_settings(spec.storage, version))
    return settings


#: `--experimental-compact-hash-check-enabled` first shipped in etcd 3.5.5 (CHANGELOG-3.5);
#: no 3.4 release has it (3.4.23 checked).
COMPACT_HASH_CHECK_SINCE = (3, 5, 5)
#: etcd 3.6 turned the experimental corruption flags into feature gates.
FEATURE_GATES_SINCE = (3, 6, 0)


def storage_settings(storage: StorageSpec, version: Version | None) -> Settings:
    """Quota, compaction, snapshots and the corruption checks, as the release spells them.

    Unset values are left out, so etcd's own defaults apply; the corruption checks need the
    release's version and are left out without one.
    """
    settings: Settings = {}
    if storage.quota_backend_bytes is not None:
        settings["quota-backend-bytes"] = str(storage.quota_backend_bytes)
    if storage.auto_compaction_mode is not None and storage.auto_compaction_retention:
        settings["auto-compaction-mode"] = storage.auto_compaction_mode
        settings["auto-compaction-retention"] = storage.auto_compaction_retention
    if storage.snapshot_count is not None:
        settings["snapshot-count"] = str(storage.snapshot_count)
    if storage.corruption_checks and version is not None:
        settings.update(corruption_settings(version))
    return settings


def corruption_settings(version: Version) -> Settings:
    """Check a member's data against its peers at start-up, and after every compaction."""
    if version >= FEATURE_GATES_SINCE:
        return {"feature-gates": "InitialCorruptCheck=true,CompactHashCheck=true"}
    settings = {"experimental-initial-corrupt-check": "true"}
    if version >= COMPACT_HASH_CHECK_SINCE:
        settings["experimental-compact-hash-check-enabled"] = "true"
    return settings


#: Read only when a member bootstraps or joins; etcd ignores them once its data dir holds data
#: ("--initial prefix flags are used in bootstrapping ... and ignored when restarting an existing
#: member", https://etcd.io/docs/v3.5/op-guide/configuration/). So every member's settings can
#: name the current member list after a membership change, without a restart.
BOOTSTRAP_ONLY = frozenset({"initial-cluster", "initial-cluster-state"})


def as_flags(settings: Settings) -> list[str]:
    return [f"--{name}={value}" for name, value in settings.items()]


def as_env_file(settings: Settings) -> str:
    """`ETCD_NAME=...` lines for a systemd EnvironmentFile; values never need quoting here."""
    lines = ["# Rendered by etcdforge; edit the cluster spec, not this file."]
    lines += [f"{env_name(name)}={value}" for name, value in settings.items()]
    return "\n".join(lines) + "\n"


def env_name(setting: str) -> str:
    """The variable etcd reads a setting from: `initial-cluster` -> ETCD_INITIAL_CLUSTER."""
    return f"ETCD_{setting.upper().replace('-', '_')}"
