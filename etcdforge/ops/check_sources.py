"""Where `check` reads knowledge owned by other features: security advisories and backups.

HOOK POINTS, one function each, so each feature plugs in here and nowhere else:

- `advisories_for(version)`: the etcd security advisories affecting a running version, each with
  its first fixed release. The advisory table is built with rolling upgrades; until it is
  connected this returns [] and the `version-advisories` row says the table is not connected.
- `newest_backup(record)`: when the newest *verified* backup of the cluster was taken (from
  `etcdforge backup`). Until backups exist this returns None and `backup-age` warns "no backup".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from etcdforge.binaries import Version
from etcdforge.record import ClusterRecord

#: The newest etcd minor line. etcd maintains the current minor and the previous one: "when v3.6
#: is released, v3.4 goes out of support" (https://etcd.io/docs/v3.6/op-guide/versioning/).
CURRENT_MINOR = (3, 6)
#: False until the advisory table is connected: the row then says so instead of "none known".
ADVISORIES_CONNECTED = False


@dataclass(frozen=True)
class Advisory:
    """One security advisory that affects a running version."""

    id: str  # CVE-... or GHSA-...
    summary: str
    fixed_in: str  # the first release with the fix on the running minor line, e.g. "3.5.33"


def advisories_for(version: Version) -> list[Advisory]:
    """HOOK (advisory table): advisories affecting `version`; [] until the table is connected."""
    del version
    return []


def newest_backup(record: ClusterRecord) -> dt.datetime | None:
    """HOOK (`etcdforge backup`): when the newest verified backup was taken (aware UTC), or
    None when there is none; None until backups are connected."""
    del record
    return None
