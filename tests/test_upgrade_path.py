"""The upgrade rules and the advisory table: pure, one test per rule."""

from __future__ import annotations

import pytest

from etcdforge import advisories
from etcdforge.binaries import Version
from etcdforge.errors import BinaryError
from etcdforge.upgrade_path import (
    HOP_RULES,
    UpgradeRefused,
    check_path,
    first_safe,
    needs_auth_check,
)


def members(*versions: Version) -> dict[str, Version]:
    return {f"m{i + 1}": v for i, v in enumerate(versions)}


def refusal(running: dict[str, Version], target: Version, **extra: object) -> str:
    with pytest.raises(UpgradeRefused) as info:
        check_path(running, target, allow_unsafe=False, **extra)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_patch_upgrade_is_a_path_with_every_member_pending() -> None:
    path = check_path(members((3, 5, 16), (3, 5, 16)), (3, 5, 30), allow_unsafe=False)
    assert path.pending == ["m1", "m2"] and not path.minor and not path.done
    assert path.describe() == "etcd 3.5.16 -> 3.5.30 (patch upgrade)"
    assert path.warning is None


def test_one_minor_is_a_path() -> None:
    path = check_path(
        members((3, 4, 23), (3, 4, 23)), (3, 5, 16), allow_unsafe=False, auth_enabled=False
    )
    assert path.minor
    assert path.describe() == "etcd 3.4.23 -> 3.5.16 (minor upgrade 3.4 -> 3.5)"


def test_skipping_a_minor_is_refused_naming_the_hop_to_take() -> None:
    message = refusal(members((3, 4, 23)), (3, 6, 0))
    assert message.startswith("etcd 3.4.23 -> 3.6.0 skips 3.5: etcd upgrades one minor at a time")
    # The stop on the way satisfies both the 3.5 production minimum and the 3.5 -> 3.6 rule.
    assert "`etcdforge upgrade --to 3.5.32`" in message
    assert first_safe((3, 5)) == HOP_RULES[(3, 5)].minimum
    assert first_safe((3, 4)) == (3, 4, 22)


def test_minor_hop_needs_the_hop_guides_patch_first() -> None:
    message = refusal(members((3, 5, 32), (3, 5, 30)), (3, 6, 0))
    assert (
        "etcd 3.5.30 -> 3.6.0: etcd's 3.5 -> 3.6 guide requires every member on 3.5.32" in message
    )
    assert "m2 runs 3.5.30" in message and "upgrade_3_6" in message
    assert check_path(members((3, 5, 32)), (3, 6, 0), allow_unsafe=False).minor
    assert "3.6.11" in refusal(members((3, 6, 5)), (3, 7, 0))


def test_minor_downgrade_is_refused_pointing_at_the_downgrade_api() -> None:
    message = refusal(members((3, 5, 30)), (3, 4, 23))
    assert message.startswith("etcd 3.5.30 -> 3.4.23 (m1 runs 3.5.30) is a minor downgrade")
    assert "3.5 has no supported downgrade" in message
    api = refusal(members((3, 6, 14)), (3, 5, 33))
    assert "`etcdctl downgrade validate/enable 3.5`" in api


def test_patch_downgrade_is_refused_and_says_how_to_fix_a_stale_spec() -> None:
    message = refusal(members((3, 5, 16), (3, 5, 30)), (3, 5, 16))
    assert "(m2 runs 3.5.30) is a downgrade" in message
    assert "set it to 3.5.30" in message


def test_3_4_to_3_5_with_auth_enabled_is_refused() -> None:
    running = members((3, 4, 23), (3, 4, 23))
    assert needs_auth_check(running, (3, 5, 16))
    assert not needs_auth_check(members((3, 5, 16)), (3, 5, 30))
    assert not needs_auth_check(running, (3, 4, 30))
    message = refusal(running, (3, 5, 16), auth_enabled=True)
    assert "with etcd auth enabled" in message and "upgrade_3_5" in message
    assert check_path(running, (3, 5, 16), allow_unsafe=False, auth_enabled=False).minor


def test_known_bad_and_below_minimum_targets_use_the_binaries_policy() -> None:
    with pytest.raises(BinaryError, match="known data inconsistency bug"):
        check_path(members((3, 4, 23)), (3, 5, 1), allow_unsafe=False, auth_enabled=False)
    with pytest.raises(BinaryError, match=r"below etcd's recommended production minimum 3\.5\.6"):
        check_path(members((3, 5, 3)), (3, 5, 5), allow_unsafe=False)
    allowed = check_path(members((3, 5, 0)), (3, 5, 1), allow_unsafe=True)
    assert allowed.warning is not None and "allow_unsafe_version is set" in allowed.warning


def test_leaving_a_known_bad_release_is_the_point_not_a_refusal() -> None:
    path = check_path(members((3, 5, 2), (3, 5, 2)), (3, 5, 30), allow_unsafe=False)
    assert path.pending == ["m1", "m2"]


def test_mixed_cluster_resumes_from_its_oldest_member() -> None:
    running = members((3, 5, 16), (3, 4, 23), (3, 4, 23))
    path = check_path(running, (3, 5, 16), allow_unsafe=False, auth_enabled=False)
    assert path.mixed and path.minor and path.pending == ["m2", "m3"]
    assert "resuming: m1 3.5.16, m2 3.4.23, m3 3.4.23" in path.describe()


def test_every_member_on_the_target_is_done() -> None:
    path = check_path(members((3, 5, 30), (3, 5, 30)), (3, 5, 30), allow_unsafe=False)
    assert path.done and path.pending == []
    assert path.describe() == "every member runs etcd 3.5.30: nothing to upgrade"


def test_versions_outside_3_4_and_later_are_refused() -> None:
    assert "outside what etcdforge runs" in refusal(members((3, 3, 27)), (3, 4, 23))
    assert "(the target)" in refusal(members((3, 5, 30)), (4, 0, 0))


# --- advisories ------------------------------------------------------------------------------


def idents(version: Version) -> set[str]:
    return {f.advisory.ident for f in advisories.findings(version)}


def test_3_5_30_is_affected_by_the_tls_handshake_advisory_fixed_in_3_5_33() -> None:
    found = idents((3, 5, 30))
    assert "GHSA-6vch-q96h-7gc3" in found and "GHSA-x35m-3gp4-4fh5" not in found
    assert "GHSA-6vch-q96h-7gc3" not in idents((3, 5, 33))
    assert "GHSA-6vch-q96h-7gc3" in idents((3, 6, 13)) and not idents((3, 6, 14))


def test_first_fixed_versions_per_line() -> None:
    assert "GHSA-x35m-3gp4-4fh5" in idents((3, 5, 29))  # CVE-2026-44283: fixed in 3.5.30
    assert "GHSA-3wh4-j44w-pg92" in idents((3, 5, 31))  # fixed in 3.5.32
    assert "GHSA-3wh4-j44w-pg92" not in idents((3, 5, 32))
    assert "GHSA-3wh4-j44w-pg92" not in idents((3, 4, 23))  # the flag came with 3.5
    assert "GHSA-x35m-3gp4-4fh5" not in idents((3, 4, 44))


def test_data_loss_fixes_have_their_first_affected_release() -> None:
    assert "etcd-io/etcd#13766" in idents((3, 5, 2))
    assert "etcd-io/etcd#13766" not in idents((3, 5, 3))
    assert "etcd-io/etcd#13766" not in idents((3, 4, 23))
    assert "etcd-io/etcd#19557" not in idents((3, 5, 0))  # introduced in 3.5.1
    assert {"etcd-io/etcd#19557", "etcd-io/etcd#20967"} <= idents((3, 5, 19))
    assert "etcd-io/etcd#19557" not in idents((3, 5, 20))


def test_a_line_without_a_fix_says_where_the_fix_is() -> None:
    line = next(str(f) for f in advisories.findings((3, 4, 23)) if "6vch" in f.advisory.ident)
    assert "no 3.4 release has the fix; fixed from 3.5.33" in line
    assert advisories.clean_from((3, 4, 23)) is None


def test_notes_name_each_advisory_and_the_first_clean_release() -> None:
    notes = advisories.notes([(3, 5, 30), (3, 5, 30)])
    assert notes[0].startswith("etcd 3.5.30 is affected by GHSA-3wh4-j44w-pg92 (CVE-2026-59818)")
    assert notes[-1] == "etcd 3.5.30: 3.5.33 is the first 3.5 release none of these affects"
    assert len(notes) == 4  # one version, listed once
    assert advisories.notes([(3, 5, 33)]) == []
