"""Which etcd version changes are safe, from etcd's own upgrade guides; pure, no I/O.

Every rule names the guide it comes from. `check_path` applies them all to what each member runs
now and the target, and either returns the path or refuses with one line that names the hop to
take instead. A cluster whose members run different versions (an upgrade cut short) is judged by
its oldest member, so a rerun resumes the same upgrade.

- Patch upgrades, or one minor at a time, latest patch of the old minor first:
  https://etcd.io/docs/v3.6/upgrades/upgrading-etcd/ ("Upgrades that skip a minor version are
  not supported and will likely fail").
- Some minor hops need a patch release of the old minor first (the hop's own guide).
- 3.4 -> 3.5 is not a rolling upgrade when etcd auth is enabled (3.5 changes the WAL format of
  auth entries): https://etcd.io/docs/v3.5/upgrades/upgrade_3_5/
- Downgrades are not among etcd's supported upgrade cases; a minor downgrade works only through
  the downgrade API of 3.6 and later (`etcdctl downgrade`):
  https://etcd.io/docs/v3.6/downgrades/downgrade_3_6/
- The target must not be a known-bad release or below etcd's production minimums: the one policy
  of `binaries.check_version`, held to production rules even for a local cluster, since an
  upgrade target is chosen, never inherited.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from etcdforge.binaries import (
    OLDEST_SUPPORTED,
    RECOMMENDED_MINIMUM,
    Version,
    check_version,
    format_version,
)
from etcdforge.errors import UnsafeOperationError

POLICY_URL = "https://etcd.io/docs/v3.6/upgrades/upgrading-etcd/"
DOWNGRADE_URL = "https://etcd.io/docs/v3.6/downgrades/downgrade_3_6/"
AUTH_URL = "https://etcd.io/docs/v3.5/upgrades/upgrade_3_5/"
#: Minors whose downgrade API (`etcdctl downgrade`) exists: from 3.6 on.
DOWNGRADE_API_FROM = (3, 6)

Line = tuple[int, int]


@dataclass(frozen=True)
class HopRule:
    """Before leaving `line` for the next minor, every member must run `minimum` or later."""

    minimum: Version
    url: str
    why: str


#: The hop guides' "update the old minor first" checklists.
HOP_RULES: dict[Line, HopRule] = {
    # upgrade_3_6, current guide: 3.5.24-3.5.26 fix upgrade blockers (learner promotions
    # #19557, zombie members #20967); 3.5.32 adds --v2-deprecation=write-only-skip-check and
    # extends `etcdutl check v2store` to the WAL.
    (3, 5): HopRule(
        (3, 5, 32),
        "https://etcd.io/docs/v3.7/upgrades/upgrade_3_6/",
        "earlier 3.5 releases can fail the 3.6 upgrade (learner promotions, zombie members)",
    ),
    # upgrade_3_7: "Earlier 3.6 patch releases may not be compatible with a rolling upgrade".
    (3, 6): HopRule(
        (3, 6, 11),
        "https://etcd.io/docs/v3.7/upgrades/upgrade_3_7/",
        "earlier 3.6 releases may not be compatible with a rolling upgrade to 3.7",
    ),
}
#: Minor hops that cannot roll while etcd auth is enabled (from -> to).
AUTH_BLOCKS: dict[Line, str] = {(3, 4): AUTH_URL}


class UpgradeRefused(UnsafeOperationError):
    """The version change is not one etcd supports; refused before anything changes."""


def fmt(version: Version) -> str:
    return format_version(version)


def line_of(version: Version) -> Line:
    return version[0], version[1]


def line_name(line: Line) -> str:
    return f"{line[0]}.{line[1]}"


@dataclass(frozen=True)
class UpgradePath:
    """A checked version change: each member's version now, and the target."""

    running: Mapping[str, Version]
    target: Version
    warning: str | None = None  # the target's known issue, where the spec allows it anyway

    @property
    def oldest(self) -> Version:
        return min(self.running.values())

    @property
    def pending(self) -> list[str]:
        """Members not on the target yet, in the record's order."""
        return [name for name, version in self.running.items() if version != self.target]

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def minor(self) -> bool:
        return line_of(self.oldest) != line_of(self.target)

    @property
    def mixed(self) -> bool:
        return len(set(self.running.values())) > 1

    def describe(self) -> str:
        target = fmt(self.target)
        if self.done:
            return f"every member runs etcd {target}: nothing to upgrade"
        kind = (
            f"minor upgrade {line_name(line_of(self.oldest))} -> {line_name(line_of(self.target))}"
            if self.minor
            else "patch upgrade"
        )
        if not self.mixed:
            return f"etcd {fmt(self.oldest)} -> {target} ({kind})"
        members = ", ".join(f"{n} {fmt(v)}" for n, v in self.running.items())
        return f"etcd {fmt(self.oldest)} -> {target} ({kind}; resuming: {members})"


def needs_auth_check(running: Mapping[str, Version], target: Version) -> bool:
    """Whether the path crosses a hop that auth blocks: only then is it worth asking etcd."""
    lines = {line_of(v) for v in running.values() if line_of(v) < line_of(target)}
    return any(line in AUTH_BLOCKS for line in lines)


def check_path(
    running: Mapping[str, Version],
    target: Version,
    *,
    allow_unsafe: bool,
    auth_enabled: bool | None = None,
) -> UpgradePath:
    """The path from what each member runs to `target`, or `UpgradeRefused` (one line)."""
    if not running:
        raise UpgradeRefused("internal: no member version to upgrade from")
    _supported(running, target)
    _no_downgrade(running, target)
    _one_minor(min(running.values()), target)
    _hop_minimums(running, target)
    _auth(running, target, auth_enabled)
    path = UpgradePath(running, target)
    if path.done:
        return path
    warning = check_version(target, dev_cluster=False, allow_unsafe=allow_unsafe)
    return UpgradePath(running, target, warning)


def _supported(running: Mapping[str, Version], target: Version) -> None:
    """etcdforge runs etcd 3.4 and later (binaries.OLDEST_SUPPORTED); 4.x does not exist yet."""
    for name, version in [*running.items(), ("the target", target)]:
        if version < OLDEST_SUPPORTED or version[0] != 3:
            raise UpgradeRefused(
                f"etcd {fmt(version)} ({name}) is outside what etcdforge runs (3.4 and later "
                "3.x); upgrade older clusters to 3.4 with etcd's own guides first"
            )


def _no_downgrade(running: Mapping[str, Version], target: Version) -> None:
    newer = {n: v for n, v in running.items() if v > target}
    if not newer:
        return
    name, version = max(newer.items(), key=lambda item: item[1])
    change = f"etcd {fmt(version)} -> {fmt(target)} ({name} runs {fmt(version)})"
    if line_of(version) != line_of(target):
        api = (
            "etcd offers it only through its downgrade API "
            f"(`etcdctl downgrade validate/enable {line_name(line_of(target))}`)"
            if line_of(version) >= DOWNGRADE_API_FROM
            else f"etcd {line_name(line_of(version))} has no supported downgrade (etcd's "
            f"downgrade API arrives with {line_name(DOWNGRADE_API_FROM)})"
        )
        raise UpgradeRefused(
            f"{change} is a minor downgrade: refused; {api}, see {DOWNGRADE_URL} and the README"
        )
    raise UpgradeRefused(
        f"{change} is a downgrade: refused, etcd supports patch and one-minor upgrades only "
        f"({POLICY_URL}); if the spec still names the release the cluster was upgraded from, "
        f"set it to {fmt(version)}"
    )


def first_safe(line: Line) -> Version:
    """The lowest release of `line` that is a good stop on the way up: etcd's production
    minimum, and what the hop out of that line requires."""
    floors = [(line[0], line[1], 0)]
    if line in RECOMMENDED_MINIMUM:
        floors.append(RECOMMENDED_MINIMUM[line])
    if line in HOP_RULES:
        floors.append(HOP_RULES[line].minimum)
    return max(floors)


def _one_minor(oldest: Version, target: Version) -> None:
    """upgrading-etcd: one minor at a time; skipping one "will likely fail"."""
    if target[1] - oldest[1] <= 1:
        return
    hop = (oldest[0], oldest[1] + 1)
    stop = fmt(first_safe(hop))
    raise UpgradeRefused(
        f"etcd {fmt(oldest)} -> {fmt(target)} skips {line_name(hop)}: etcd upgrades one minor "
        f"at a time ({POLICY_URL}); upgrade to {line_name(hop)} first "
        f"(`etcdforge upgrade --to {stop}` or a later {line_name(hop)}), then to {fmt(target)}"
    )


def _hop_minimums(running: Mapping[str, Version], target: Version) -> None:
    for name, version in running.items():
        rule = HOP_RULES.get(line_of(version))
        if rule is None or line_of(version) == line_of(target) or version >= rule.minimum:
            continue
        old, new = line_name(line_of(version)), line_name(line_of(target))
        raise UpgradeRefused(
            f"etcd {fmt(version)} -> {fmt(target)}: etcd's {old} -> {new} guide requires every "
            f"member on {fmt(rule.minimum)} or later first, {rule.why} ({rule.url}); {name} runs "
            f"{fmt(version)}: `etcdforge upgrade --to {fmt(rule.minimum)}` (or a later {old}) first"
        )


def _auth(running: Mapping[str, Version], target: Version, auth_enabled: bool | None) -> None:
    if not needs_auth_check(running, target):
        return
    if auth_enabled is None:
        raise UpgradeRefused("internal: this hop needs to know whether etcd auth is enabled")
    if auth_enabled:
        url = next(AUTH_BLOCKS[line_of(v)] for v in running.values() if line_of(v) in AUTH_BLOCKS)
        raise UpgradeRefused(
            f"etcd {fmt(min(running.values()))} -> {fmt(target)} with etcd auth enabled: 3.5 "
            f"changes the WAL format of auth entries, so this hop cannot roll ({url}); disable "
            "auth for the upgrade (`etcdctl auth disable`), or restore a snapshot into a new "
            "3.5 cluster"
        )
