"""etcd security advisories and data-loss fixes, with the first fixed release of each minor line.

Pure data and lookups: `plan`, `status` and `upgrade` name what affects the version a cluster runs
and the version it is about to run, so a user picks a target that is not itself affected.

Each entry was checked against etcd's own advisories, release notes and issue tracker (the URL
of each entry). A line missing from `fixed` is not affected, except those in `unfixed_lines`:
affected, and no release of that line carries the fix (the line is no longer maintained).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from etcdforge.binaries import Version, format_version

Line = tuple[int, int]


@dataclass(frozen=True)
class Advisory:
    ident: str  # the advisory or issue: GHSA-..., or etcd-io/etcd#NNNNN
    summary: str
    url: str
    fixed: Mapping[Line, Version]  # the first release of each line that carries the fix
    aliases: tuple[str, ...] = ()  # CVE ids
    first_affected: Version | None = None  # None: every release before the fix
    unfixed_lines: tuple[Line, ...] = ()
    scope: str = ""  # who is exposed, when not everyone: "etcd auth users only"

    @property
    def name(self) -> str:
        return f"{self.ident} ({', '.join(self.aliases)})" if self.aliases else self.ident


ADVISORIES: tuple[Advisory, ...] = (
    # Release notes of v3.5.3 and the postmortem: a crash can skip applying a committed
    # transaction on one member (etcd-io/etcd#13766, #13514), introduced in 3.5.0.
    Advisory(
        ident="etcd-io/etcd#13766",
        summary="a member that crashes can lose a committed transaction (data inconsistency)",
        url="https://github.com/etcd-io/etcd/blob/main/Documentation/postmortems/v3.5-data-inconsistency.md",
        fixed={(3, 5): (3, 5, 3)},
        first_affected=(3, 5, 0),
    ),
    # Learner promotions were not persisted to the v3 store from 3.5.1 (PR #13348) to 3.5.19;
    # the 3.6 upgrade then fails with "too many learner members".
    Advisory(
        ident="etcd-io/etcd#19557",
        summary="learner promotions are not persisted to the v3 store; the 3.6 upgrade can fail",
        url="https://etcd.io/blog/2025/upgrade_from_3.5_to_3.6_issue/",
        fixed={(3, 5): (3, 5, 20)},
        first_affected=(3, 5, 1),
    ),
    # Removed members kept in the v3 store reappear once 3.6 reads membership from it.
    Advisory(
        ident="etcd-io/etcd#20967",
        summary="removed members can reappear as zombie members after the 3.6 upgrade",
        url="https://etcd.io/blog/2025/zombie_members_upgrade/",
        fixed={(3, 5): (3, 5, 26)},
        first_affected=(3, 5, 0),
    ),
    Advisory(
        ident="GHSA-q8m4-xhhv-38mg",
        aliases=("CVE-2026-33413",),
        summary="MemberList, Alarm, Lease and Compaction callable without authorization",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-q8m4-xhhv-38mg",
        fixed={(3, 4): (3, 4, 42), (3, 5): (3, 5, 28), (3, 6): (3, 6, 9)},
        scope="clusters using etcd auth",
    ),
    Advisory(
        ident="GHSA-rfx7-8w68-q57q",
        aliases=("CVE-2026-33343",),
        summary="nested transactions bypass RBAC key permissions",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-rfx7-8w68-q57q",
        fixed={(3, 4): (3, 4, 42), (3, 5): (3, 5, 28), (3, 6): (3, 6, 9)},
        scope="clusters using etcd auth",
    ),
    # The May 2026 patch releases: https://etcd.io/blog/2026/may-patch-release/
    Advisory(
        ident="GHSA-x35m-3gp4-4fh5",
        aliases=("CVE-2026-44283",),
        summary="PrevKv and lease attachment in transaction puts bypass RBAC",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-x35m-3gp4-4fh5",
        fixed={(3, 4): (3, 4, 44), (3, 5): (3, 5, 30), (3, 6): (3, 6, 11)},
        scope="clusters using etcd auth",
    ),
    # --listen-client-http-urls appeared in 3.5, so 3.4 is not affected (CHANGELOG-3.5, v3.5.32).
    Advisory(
        ident="GHSA-3wh4-j44w-pg92",
        aliases=("CVE-2026-59818",),
        summary="--client-crl-file is not enforced on the gRPC listener when "
        "--listen-client-http-urls splits the client listeners",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-3wh4-j44w-pg92",
        fixed={(3, 5): (3, 5, 32), (3, 6): (3, 6, 13)},
        scope="clusters with --listen-client-http-urls and a CRL",
    ),
    # "Etcd Patch Releases: v3.7.1, v3.6.14, and v3.5.33" (2026-07-23): affects every release
    # before 3.5.33, so 3.4 too, which gets no fix.
    Advisory(
        ident="GHSA-6vch-q96h-7gc3",
        aliases=("CVE-2026-73500",),
        summary="unfinished TLS handshakes pile up until the server runs out of resources "
        "(affects Kubernetes control planes)",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-6vch-q96h-7gc3",
        fixed={(3, 5): (3, 5, 33), (3, 6): (3, 6, 14), (3, 7): (3, 7, 1)},
        unfixed_lines=((3, 4),),
    ),
    Advisory(
        ident="GHSA-xg4h-6gfc-h4m8",
        summary="a read grant on one key lets a watch see every key after it",
        url="https://github.com/etcd-io/etcd/security/advisories/GHSA-xg4h-6gfc-h4m8",
        fixed={(3, 5): (3, 5, 33), (3, 6): (3, 6, 14), (3, 7): (3, 7, 1)},
        scope="clusters using etcd auth",
    ),
)


def affects(advisory: Advisory, version: Version) -> bool:
    if advisory.first_affected is not None and version < advisory.first_affected:
        return False
    line = version[:2]
    fixed = advisory.fixed.get((line[0], line[1]))
    if fixed is not None:
        return version < fixed
    return line in advisory.unfixed_lines


def remedy(advisory: Advisory, version: Version) -> str:
    """Where the fix is for someone on `version`: its own line's release, or a newer line's."""
    line = (version[0], version[1])
    fixed = advisory.fixed.get(line)
    if fixed is not None:
        return f"fixed in {format_version(fixed)}"
    newer = sorted(v for key, v in advisory.fixed.items() if key > line)
    first = f"; fixed from {format_version(newer[0])}" if newer else ""
    return f"no {line[0]}.{line[1]} release has the fix{first}"


@dataclass(frozen=True)
class Finding:
    version: Version
    advisory: Advisory

    def __str__(self) -> str:
        scope = f" [{self.advisory.scope}]" if self.advisory.scope else ""
        return (
            f"etcd {format_version(self.version)} is affected by {self.advisory.name}: "
            f"{self.advisory.summary}{scope}; {remedy(self.advisory, self.version)}"
        )


def findings(version: Version, table: tuple[Advisory, ...] = ADVISORIES) -> list[Finding]:
    return [Finding(version, a) for a in table if affects(a, version)]


def clean_from(version: Version, table: tuple[Advisory, ...] = ADVISORIES) -> Version | None:
    """The first release of `version`'s line that none of the table's advisories affects."""
    line = (version[0], version[1])
    needed = [a.fixed[line] for a in table if affects(a, version) and line in a.fixed]
    if any(affects(a, version) and line not in a.fixed for a in table):
        return None  # some fix never reached this line
    return max(needed, default=version)


def notes(versions: Iterable[Version]) -> list[str]:
    """One line per advisory affecting each of `versions` (each version once, in order), then
    the first release of its line that all of them spare (the details: the README's table)."""
    lines: list[str] = []
    for version in dict.fromkeys(versions):
        found = findings(version)
        lines += [str(f) for f in found]
        clean = clean_from(version)
        if found and clean is not None:
            lines.append(
                f"etcd {format_version(version)}: {format_version(clean)} is the first "
                f"{version[0]}.{version[1]} release none of these affects"
            )
    return lines
