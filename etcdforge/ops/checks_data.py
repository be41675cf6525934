"""The data checks: storage (alarms, quota, fragmentation, disk), consistency between members,
certificates and backups.

Sources, as cited on each check:

- Alarms: Maintenance.Alarm (GET); NOSPACE and CORRUPT and their recovery (etcd docs
  op-guide/maintenance "Space quota", op-guide/data_corruption).
- Quota: `--quota-backend-bytes`, 0 or unset meaning 2 GiB (`etcd --help`); warn at 80%.
- Fragmentation: worth a defragmentation above 45% of a db over 100 MiB, the thresholds of
  OpenShift's cluster-etcd-operator defrag controller (minDefragBytes, maxFragmentedPercentage).
- Free disk: a defragmentation or a snapshot writes a copy of the db beside it, and a new WAL
  segment takes 64 MiB (fail below that); the db should be able to reach its quota before the
  disk fills (warn below that).
- Consistency: HashKV of every member at one revision, compared as etcd's own corruption
  checker does: hashes taken at the same compact revision must be equal.
- Certificates: `etcdforge certs check` (`ops.cert_check`), one row per certificate.
- Backups: the newest verified backup at the spec's destination (`ops.check_sources.newest_backup`).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Sequence

from etcdforge.ops.cert_check import CertRow
from etcdforge.ops.check_model import (
    CLUSTER,
    Check,
    Facts,
    Finding,
    MemberFacts,
    Verdict,
    failed,
    for_cluster,
    passed,
    per_member,
    warned,
)

DEFAULT_QUOTA = 2 << 30
QUOTA_WARN = 0.8
DEFRAG_MIN_DB = 100 << 20
DEFRAG_FRAGMENTED = 0.45
WAL_SEGMENT = 64 << 20
BACKUP_MAX_AGE = dt.timedelta(hours=25)  # a daily backup, with an hour of slack
ALARM_FIXES = {
    "NOSPACE": "compact, defragment each member, then disarm (etcd docs: maintenance, quota)",
    "CORRUPT": "find the diverged member (consistency-hashkv) and rebuild it from the others",
}
REBUILD = "rebuild the member from the others: member remove, member add, start it empty"


def size(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift:
            return f"{value / (1 << shift):.1f} {unit}"
    return f"{value} B"


def quota_of(member: MemberFacts) -> int:
    raw = member.settings.get("quota-backend-bytes", "0")
    try:
        quota = int(raw)
    except ValueError:
        quota = 0
    return quota if quota > 0 else DEFAULT_QUOTA


# --- storage ------------------------------------------------------------------------------


def alarms(member: MemberFacts, facts: Facts) -> Verdict:
    if facts.alarms is None:
        return warned(f"alarms not read: {facts.errors.get('alarms', '?')}", "check health")
    # An alarm naming no member we know (3.5 < 3.5.7 raise CORRUPT with member 0) is everyone's.
    mine = sorted(
        {a.alarm for a in facts.alarms if facts.name_of_id(a.member_id) in (None, member.name)}
    )
    if not mine:
        return passed("no alarm")
    fix = "; ".join(ALARM_FIXES.get(a, f"investigate the {a} alarm") for a in mine)
    return failed(f"{', '.join(mine)} alarm raised", fix)


def db_quota(member: MemberFacts, facts: Facts) -> Verdict:
    status = facts.status_start.get(member.name)
    if status is None or status.member_id is None or status.db_size is None:
        return warned("db size not read: the member did not answer", "check health")
    quota = quota_of(member)
    used = status.db_size / quota
    seen = f"db {size(status.db_size)} of quota {size(quota)} ({used:.0%})"
    if not member.inspected:
        seen += " (quota assumed: settings not read)"
    nospace = any(
        a.alarm == "NOSPACE" and facts.name_of_id(a.member_id) in (None, member.name)
        for a in facts.alarms or ()
    )  # etcd raised it at its own count of the quota, which a db size read later may trail
    if used >= 1 or nospace:
        seen += "; NOSPACE raised" if nospace else ""
        return failed(seen, "compact and defragment, or raise --quota-backend-bytes (max 8 GiB)")
    if used >= QUOTA_WARN:
        return warned(seen, "compact and defragment, or raise --quota-backend-bytes")
    return passed(seen)


def fragmentation(member: MemberFacts, facts: Facts) -> Verdict:
    status = facts.status_start.get(member.name)
    if status is None or status.member_id is None or not status.db_size:
        return warned("not read: the member did not answer", "check health")
    if status.db_size_in_use is None:
        return passed(f"db {size(status.db_size)}; in-use size not reported by this release")
    free = 1 - status.db_size_in_use / status.db_size
    seen = f"{free:.0%} of {size(status.db_size)} free pages (in use {size(status.db_size_in_use)})"
    if status.db_size > DEFRAG_MIN_DB and free > DEFRAG_FRAGMENTED:
        return warned(seen, "defragment one member at a time, the leader last")
    return passed(seen)


def disk_free(member: MemberFacts, facts: Facts) -> Verdict:
    if member.free_bytes is None:
        return warned(f"not measured: {member.error or 'no probe'}", "make the host reachable")
    status = facts.status_start.get(member.name)
    db = (status.db_size or 0) if status is not None else 0
    quota = quota_of(member)
    seen = f"{size(member.free_bytes)} free for {member.data_dir} (db {size(db)})"
    if member.free_bytes < max(db, WAL_SEGMENT):
        return failed(seen, f"free space on {member.label}: a defrag or new WAL segment fails")
    if member.free_bytes < quota - db:
        return warned(f"{seen}: the disk fills before the {size(quota)} quota", "free space")
    return passed(seen)


# --- consistency --------------------------------------------------------------------------


def consistency(facts: Facts) -> list[Finding]:
    revision = facts.hash_revision
    if revision is None:
        reason = facts.errors.get("hashkv", "no member answered")
        return [
            Finding(m.name, warned(f"not hashed: {reason}", "check health")) for m in facts.members
        ]
    keys = {n: (h.compact_revision, h.hash) for n, h in facts.hashes.items()}
    common, count = Counter(keys.values()).most_common(1)[0] if keys else ((0, 0), 0)
    majority = common if count * 2 > len(keys) else None
    return [
        Finding(m.name, _hash_verdict(m.name, keys, majority, revision, facts))
        for m in facts.members
    ]


def _hash_verdict(
    name: str,
    keys: dict[str, tuple[int, int]],
    majority: tuple[int, int] | None,
    revision: int,
    facts: Facts,
) -> Verdict:
    if name not in keys:
        reason = facts.hash_errors.get(name, "the member did not answer")
        return warned(f"not hashed at revision {revision}: {reason}", "check health")
    compact, digest = keys[name]
    seen = f"hash {digest:08x} at revision {revision}"
    if len(keys) == 1:
        return passed(f"{seen} (only member hashed)")
    others = sorted(n for n in keys if n != name)
    if majority is None:
        listing = ", ".join(f"{n} {keys[n][1]:08x}" for n in others)
        return failed(f"{seen}; no majority agrees ({listing})", REBUILD + " (find which first)")
    if (compact, digest) == majority:
        agree = [n for n in others if keys[n] == majority]
        return passed(f"{seen}, same as {', '.join(agree)}")
    if compact != majority[0]:
        return warned(
            f"{seen} compacted at {compact}, the others at {majority[0]}: not comparable",
            "rerun after the compaction has reached every member",
        )
    differs = [n for n in others if keys[n] == majority]
    return failed(
        f"{seen} differs from {', '.join(differs)} ({majority[1]:08x}): data diverged", REBUILD
    )


# --- certificates and backups ---------------------------------------------------------------


def certificates(facts: Facts) -> list[Finding]:
    if not facts.certificates:
        reason = facts.errors.get("certificates", "no certificate found")
        return [Finding(CLUSTER, warned(f"not checked: {reason}", "run `etcdforge certs check`"))]
    return [Finding(row.name, _cert_verdict(row, facts)) for row in facts.certificates]


def _cert_verdict(row: CertRow, facts: Facts) -> Verdict:
    if row.ok:
        return passed(f"expires {(row.not_after or '?')[:10]} ({row.remaining} left)")
    if "cert sign" in row.usages:
        return failed(row.status, "`etcdforge certs rotate-ca`")
    install = "; then `etcdforge apply -f FILE` installs it" if facts.on_hosts else ""
    return failed(row.status, f"`etcdforge certs renew`{install}")


def backup_age(facts: Facts) -> Verdict:
    taken = facts.newest_backup
    if "backups" in facts.errors:
        return warned(
            f"backups not listed: {facts.errors['backups']}", "check the backup destination"
        )
    if taken is None:
        return warned("no verified backup found", "take one with `etcdforge backup`; run it daily")
    age = facts.now - taken
    hours = age.total_seconds() / 3600
    seen = f"newest verified backup {taken:%Y-%m-%d %H:%M} UTC, {hours:.1f} h old"
    if age > BACKUP_MAX_AGE:
        return warned(seen, "take one with `etcdforge backup`; run it daily")
    return passed(seen)


DATA_CHECKS: Sequence[Check] = (
    Check(
        "storage-alarm",
        "no NOSPACE or CORRUPT alarm",
        "etcd Maintenance.Alarm; op-guide/maintenance",
        per_member(alarms),
    ),
    Check(
        "storage-quota",
        "db below 80% of its quota",
        "etcd --quota-backend-bytes (default 2 GiB)",
        per_member(db_quota),
    ),
    Check(
        "storage-fragmentation",
        "fragmentation below 45% (db > 100 MiB)",
        "OpenShift cluster-etcd-operator defrag controller thresholds",
        per_member(fragmentation),
    ),
    Check(
        "storage-disk",
        "free disk for the data dir",
        "etcd op-guide/hardware (disks); defrag copies",
        per_member(disk_free),
    ),
    Check(
        "consistency-hashkv",
        "same HashKV at one revision",
        "etcd Maintenance.HashKV; etcd corruption checker",
        consistency,
    ),
    Check(
        "certificates",
        "certificate valid, SANs, usages, chain",
        "etcdforge certs check",
        certificates,
    ),
    Check(
        "backup-age",
        "a verified backup within 25 h",
        "etcdforge backup: the newest verified backup at the destination",
        for_cluster(backup_age),
    ),
)
