"""Where `check` reads knowledge owned by other features: security advisories and backups.

- `advisories_for(version)`: the advisories of the upgrade feature's table (`advisories`) that
  affect a running version; the table also names the first release of the line they all spare.
- `newest_backup(record, settings)`: when the newest backup at the cluster's backup destination
  was taken. `etcdforge backup` writes a backup's metadata only after `snapshot status` accepted
  the whole file, so a backup with metadata whose file has the recorded size counts as verified;
  reading every byte again would make a cron audit as slow as the backup itself.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from etcdforge import advisories
from etcdforge.backups import BackupMeta
from etcdforge.binaries import Version
from etcdforge.ops.backup import open_dest
from etcdforge.ops.backup_dest import LocalDestination
from etcdforge.record import ClusterRecord
from etcdforge.spec import BackupSpec

#: The newest etcd minor line. etcd maintains the current minor and the previous one: "when v3.6
#: is released, v3.4 goes out of support" (https://etcd.io/docs/v3.6/op-guide/versioning/).
CURRENT_MINOR = (3, 6)


def advisories_for(version: Version) -> list[advisories.Finding]:
    """The table's advisories that affect `version`."""
    return advisories.findings(version)


def newest_backup(record: ClusterRecord, settings: BackupSpec) -> dt.datetime | None:
    """When the newest verified backup of the cluster was taken (aware UTC), or None when there
    is none. Raises EtcdforgeError when the destination cannot be read."""
    destination = open_dest(record, settings, None)
    try:
        found = destination.entries(record.name)
        if isinstance(destination, LocalDestination):
            found = [m for m in found if _intact(destination.directory, m)]
    finally:
        destination.close()
    return found[-1].time if found else None


def _intact(directory: Path, meta: BackupMeta) -> bool:
    try:
        return (directory / meta.file).stat().st_size == meta.size
    except OSError:
        return False
