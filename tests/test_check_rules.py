"""The pure side of `etcdforge check`: parsers on recorded output and checks on recorded facts.

`tests/fixtures/check/local-diverged.json` holds the facts gathered from a real 3-member etcd
3.5.30 cluster whose m3 was restored from an older snapshot under its own member ID (see
tests/test_check.py); `probe-*.json` hold the host probe's real output. Every other case is that
recording with one fact changed, so each check is seen to pass and to fail without a cluster.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from etcdforge.client import Alarm, EndpointStatus, HashKV, Member
from etcdforge.ops import checks_cluster
from etcdforge.ops.check import CHECKS, CheckReport, textfile
from etcdforge.ops.check_model import (
    Facts,
    FileStat,
    Result,
    Row,
    facts_from_json,
    facts_to_json,
    run_checks,
)
from etcdforge.ops.check_probe import parse_host_probe, pem_fingerprints, process_settings
from etcdforge.services.systemd import parse_process
from tests.prom import parse_prom

FIXTURES = Path(__file__).parent / "fixtures" / "check"
NOW = dt.datetime(2026, 12, 3, 10, 22, tzinfo=dt.UTC)


def recorded(name: str = "local-diverged.json") -> Facts:
    return facts_from_json(json.loads((FIXTURES / name).read_text()))


def healthy() -> Facts:
    """The recording with m3's data as the others': a cluster etcdforge deployed, untouched."""
    facts = recorded()
    same = facts.hashes["m1"]
    return dataclasses.replace(facts, hashes={n: same for n in facts.hashes})


def results(facts: Facts) -> dict[tuple[str, str], Row]:
    return {(r.check, r.member): r for r in run_checks(CHECKS, facts)}


def not_passing(facts: Facts) -> dict[tuple[str, str], Result]:
    return {k: r.result for k, r in results(facts).items() if r.result is not Result.PASS}


def with_member(facts: Facts, name: str, **changes: Any) -> Facts:
    members = tuple(
        dataclasses.replace(m, **changes) if m.name == name else m for m in facts.members
    )
    return dataclasses.replace(facts, members=members)


def with_settings(facts: Facts, name: str, **changes: str | None) -> Facts:
    member = next(m for m in facts.members if m.name == name)
    settings = {k.replace("_", "-"): v for k, v in changes.items()}
    merged = {k: v for k, v in {**member.settings, **settings}.items() if v is not None}
    return with_member(facts, name, settings=merged)


def with_status(facts: Facts, name: str, **changes: Any) -> Facts:
    status = {**facts.status_start, name: dataclasses.replace(facts.status_start[name], **changes)}
    return dataclasses.replace(facts, status_start=status, status_end=status)


BACKUP = ("backup-age", "cluster")


def routine(facts: Facts) -> dict[tuple[str, str], Result]:
    """What the recordings warn about untouched: no backup taken, and etcd 3.5.30's advisories
    (fixed in 3.5.32/3.5.33, releases not packaged for these tests)."""
    return {
        BACKUP: Result.WARN,
        **{("version-advisories", m.name): Result.WARN for m in facts.members},
    }


# --- parsers on recorded output ------------------------------------------------------------


def test_process_settings_read_flags_and_env_like_etcd() -> None:
    argv = [
        "/usr/local/bin/etcd", "--name=m1", "-data-dir=/d", "--listen-client-urls",
        "https://a:2379", "--auto-tls", "--client-cert-auth=false", "--peer-auto-tls",
    ]  # fmt: skip
    env = {"ETCD_CLIENT_CERT_AUTH": "true", "ETCD_PEER_KEY_FILE": "/k", "ETCDCTL_API": "3"}
    assert process_settings(argv, env) == {
        "client-cert-auth": "false",  # the flag wins over the environment, as in etcd
        "peer-key-file": "/k",
        "name": "m1",
        "data-dir": "/d",
        "listen-client-urls": "https://a:2379",
        "auto-tls": "true",
        "peer-auto-tls": "true",
    }


def test_systemd_process_probe_output_is_split_into_env_argv_and_binary() -> None:
    argv = base64.b64encode(b"/usr/local/bin/etcd\0--auto-tls\0").decode()
    output = f"ETCD_NAME=etcd-1\0LANG=C\0ETCDFORGE_ARGV={argv}\0EXE=/opt/etcd/v3.5.30/etcd\n"
    running = parse_process(42, output.encode())
    assert running.environ == {"ETCD_NAME": "etcd-1", "LANG": "C"}
    assert running.argv == ("/usr/local/bin/etcd", "--auto-tls")
    assert running.exe == "/opt/etcd/v3.5.30/etcd"


@pytest.mark.parametrize("name", ["probe-local.json", "probe-fleet.json"])
def test_host_probe_output_parsed(name: str) -> None:
    recording = json.loads((FIXTURES / name).read_text())
    probe = parse_host_probe(recording["output"], recording["before"], recording["after"])
    assert probe.data_dir_stat is not None and probe.data_dir_stat.mode == 0o700
    assert probe.free_bytes is not None and probe.free_bytes > 1 << 30
    assert probe.clock_skew is not None and abs(probe.clock_skew) < 5
    assert probe.files["key-file"] == FileStat(0o600, probe.files["key-file"].owner)  # type: ignore[union-attr]
    assert set(probe.pems) >= {"trusted-ca-file", "peer-trusted-ca-file"}
    client, peer = (
        pem_fingerprints(probe.pems[n]) for n in ("trusted-ca-file", "peer-trusted-ca-file")
    )
    assert len(client) == len(peer) == 1 and client != peer


def test_probe_of_a_missing_file_and_no_clock() -> None:
    probe = parse_host_probe("data=missing\nfile.key-file=missing\nfree=x\n", 0, 0)
    assert probe.data_dir_stat is None and probe.files == {"key-file": None}
    assert probe.free_bytes is None and probe.clock_skew is None


def test_facts_round_trip_through_json() -> None:
    facts = recorded()
    assert facts_from_json(json.loads(json.dumps(facts_to_json(facts)))) == facts


# --- the recorded clusters ------------------------------------------------------------------


def test_recorded_diverged_member_fails_hashkv_naming_the_others() -> None:
    rows = results(recorded())
    assert not_passing(recorded()) == {
        ("consistency-hashkv", "m3"): Result.FAIL, **routine(recorded()),
    }  # fmt: skip
    seen = rows[("consistency-hashkv", "m3")].seen
    assert "differs from m1, m2" in seen and "revision 21" in seen
    assert "same as m2" in rows[("consistency-hashkv", "m1")].seen


def test_etcdforge_cluster_passes_everything_but_the_backup_hook() -> None:
    facts = healthy()
    assert not_passing(facts) == routine(facts)
    assert CheckReport("c", NOW, tuple(run_checks(CHECKS, facts))).exit_code == 3


def test_recorded_host_cluster_from_etcd_variables_passes() -> None:
    """Three fleet hosts deployed by `apply`: settings only in ETCD_* variables, data etcd:etcd."""
    facts = recorded("hosts-healthy.json")
    assert facts.on_hosts and not_passing(facts) == routine(facts)
    assert all(m.settings["client-cert-auth"] == "true" for m in facts.members)
    assert {m.expected_owner for m in facts.members} == {"etcd:etcd"}
    opened = with_member(facts, "etcd-2", data_dir_stat=FileStat(0o755, "etcd:etcd"))
    assert not_passing(opened) == {("cis-1.1.11", "etcd-2"): Result.FAIL, **routine(facts)}


def test_every_check_cites_a_source_and_ids_are_unique() -> None:
    assert len({c.id for c in CHECKS}) == len(CHECKS)
    assert all(c.source and c.title for c in CHECKS)
    keys = [(r.check, r.member) for r in run_checks(CHECKS, healthy())]
    assert len(keys) == len(set(keys))


# --- security -------------------------------------------------------------------------------

Case = tuple[Callable[[Facts], Facts], dict[tuple[str, str], Result]]
SECURITY_CASES: dict[str, Case] = {
    "client-cert-auth off": (
        lambda f: with_settings(f, "m1", client_cert_auth="false"),
        {("cis-2.2", "m1"): Result.FAIL},
    ),
    "auto-tls and peer-auto-tls": (
        lambda f: with_settings(f, "m2", auto_tls="true", peer_auto_tls="1"),
        {("cis-2.3", "m2"): Result.FAIL, ("cis-2.6", "m2"): Result.FAIL},
    ),
    "peer-client-cert-auth unset": (
        lambda f: with_settings(f, "m3", peer_client_cert_auth=None),
        {("cis-2.5", "m3"): Result.FAIL},
    ),
    "no server cert": (
        lambda f: with_settings(f, "m1", cert_file=None),
        {("cis-2.1", "m1"): Result.FAIL},
    ),
    "peer key missing on disk": (
        lambda f: with_member(f, "m1", files={**f.members[0].files, "peer-key-file": None}),
        {("cis-2.4", "m1"): Result.FAIL},
    ),
    "plain http listener": (
        lambda f: with_settings(
            f, "m1", listen_client_urls="https://127.0.0.1:2379,http://127.0.0.1:2379"
        ),
        {("listen-plain-http", "m1"): Result.FAIL},
    ),
    "peer URL left to etcd's http default": (
        lambda f: with_settings(f, "m2", listen_peer_urls=None),
        {("listen-plain-http", "m2"): Result.FAIL},
    ),
    "data dir 0755": (
        lambda f: with_member(f, "m2", data_dir_stat=FileStat(0o755, "root:root")),
        {("cis-1.1.11", "m2"): Result.FAIL},
    ),
    "data dir of another owner": (
        lambda f: with_member(f, "m3", expected_owner="etcd:etcd"),
        {("cis-1.1.12", "m3"): Result.FAIL},
    ),
    "key file 0640": (
        lambda f: with_member(
            f, "m1", files={**f.members[0].files, "key-file": FileStat(0o640, "etcd:etcd")}
        ),
        {("key-file-mode", "m1"): Result.FAIL},
    ),
    "tls floor below 1.2": (
        lambda f: with_settings(f, "m1", tls_min_version="TLS1.1"),
        {("tls-min-version", "m1"): Result.FAIL},
    ),
    "settings in a config file": (
        lambda f: with_settings(f, "m1", config_file="/etc/etcd/etcd.yaml"),
        {
            (c, "m1"): Result.WARN
            for c in (
                "cis-2.1",
                "cis-2.2",
                "cis-2.3",
                "cis-2.4",
                "cis-2.5",
                "cis-2.6",
                "cis-2.7",
                "peer-ca-separate",
                "key-file-mode",
                "listen-plain-http",
                "tls-min-version",
            )
        },
    ),
}


@pytest.mark.parametrize("case", SECURITY_CASES, ids=list(SECURITY_CASES))
def test_security_check_fails_on_its_defect_only(case: str) -> None:
    change, expected = SECURITY_CASES[case]
    assert not_passing(change(healthy())) == {**expected, **routine(healthy())}


def test_ca_shared_with_kubernetes_fails_2_7_and_one_ca_for_both_ports_warns() -> None:
    facts = healthy()
    m1 = facts.members[0]
    client = m1.cas["trusted-ca-file"]
    shared = with_member(facts, "m1", cas={**m1.cas, "kubernetes-ca": client})
    rows = results(shared)
    assert rows[("cis-2.7", "m1")].result is Result.FAIL
    assert "/etc/kubernetes/pki/ca.crt" in rows[("cis-2.7", "m1")].seen
    one_ca = with_member(facts, "m1", cas={**m1.cas, "peer-trusted-ca-file": client})
    assert results(one_ca)[("peer-ca-separate", "m1")].result is Result.WARN
    pinned = with_settings(one_ca, "m1", peer_cert_allowed_cn="etcd-peer")
    assert results(pinned)[("peer-ca-separate", "m1")].result is Result.PASS


def test_unreachable_host_is_reported_not_raised() -> None:
    facts = with_member(
        healthy(), "m2", running=False, settings={}, error="etcd-2: unreachable",
        data_dir_stat=None, free_bytes=None, clock_skew=None,
    )  # fmt: skip
    rows = results(facts)
    assert rows[("cis-2.2", "m2")].result is Result.WARN
    assert "unreachable" in rows[("cis-1.1.11", "m2")].seen
    assert rows[("storage-disk", "m2")].result is Result.WARN


# --- versions, health, storage ---------------------------------------------------------------


def test_known_bad_release_follows_the_release_policy() -> None:
    bad = with_status(healthy(), "m1", version="3.5.1")
    local = results(bad)[("version-known-bad", "m1")]
    assert local.result is Result.WARN and "dev cluster" in local.seen
    hosts = dataclasses.replace(bad, on_hosts=True)
    assert results(hosts)[("version-known-bad", "m1")].result is Result.FAIL
    allowed = dataclasses.replace(hosts, allow_unsafe_version=True)
    assert results(allowed)[("version-known-bad", "m1")].result is Result.WARN
    assert results(bad)[("version-mixed", "cluster")].result is Result.WARN


def test_minor_lines_behind_and_advisories_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    old = with_status(healthy(), "m2", version="3.4.23")
    assert results(old)[("version-behind", "m2")].result is Result.WARN
    assert results(healthy())[("version-behind", "m2")].result is Result.PASS
    on_3_5_30 = with_status(healthy(), "m1", version="3.5.30")
    row = results(on_3_5_30)[("version-advisories", "m1")]
    assert row.result is Result.WARN
    assert "GHSA-" in row.seen and "fixed in 3.5.33" in row.seen
    assert "etcd 3.5.33 or later" in row.fix
    on_3_4 = with_status(healthy(), "m2", version="3.4.23")
    row = results(on_3_4)[("version-advisories", "m2")]
    assert row.result is Result.WARN and "a newer minor line than 3.4" in row.fix
    monkeypatch.setattr(checks_cluster, "advisories_for", lambda v: [])
    assert results(on_3_5_30)[("version-advisories", "m1")].result is Result.PASS


def test_leader_voters_learner_term_and_clock() -> None:
    facts = healthy()
    leaderless = facts
    for name in ("m1", "m2", "m3"):
        leaderless = with_status(leaderless, name, leader=None)
    assert results(leaderless)[("health-leader", "cluster")].result is Result.FAIL
    four = dataclasses.replace(
        facts, member_list=(*(facts.member_list or ()), Member("9", "m4", (), ()))
    )
    assert results(four)[("voters-odd", "cluster")].result is Result.WARN
    learner = with_status(facts, "m3", is_learner=True, raft_index=10)
    assert results(learner)[("learner-progress", "m3")].result is Result.FAIL
    moving = dataclasses.replace(
        learner,
        status_end={
            **learner.status_end,
            "m3": dataclasses.replace(learner.status_end["m3"], raft_index=20),
        },
    )
    assert results(moving)[("learner-progress", "m3")].result is Result.WARN
    churn = dataclasses.replace(
        facts,
        status_end={n: dataclasses.replace(s, raft_term=9) for n, s in facts.status_end.items()},
    )
    assert results(churn)[("raft-term", "cluster")].result is Result.WARN
    hosts = dataclasses.replace(facts, on_hosts=True)
    for skew, expected in ((0.5, Result.PASS), (5.0, Result.WARN), (-120.0, Result.FAIL)):
        row = results(with_member(hosts, "m1", clock_skew=skew))[("clock-skew", "m1")]
        assert row.result is expected, row


def test_unhealthy_member_fails_health() -> None:
    down = with_status(healthy(), "m2", healthy=False, error="https://m2: connection refused")
    row = results(down)[("health", "m2")]
    assert row.result is Result.FAIL and "refused" in row.seen


def test_cluster_down_fails_health_and_warns_what_it_cannot_read() -> None:
    facts = healthy()
    gone = {
        n: EndpointStatus(s.endpoint, error=f"{s.endpoint}: refused")
        for n, s in facts.status_start.items()
    }
    down = dataclasses.replace(
        facts, status_start=gone, status_end=gone, member_list=None, alarms=None,
        hash_revision=None, hashes={}, errors={"member_list": "no endpoint answered"},
    )  # fmt: skip
    found = not_passing(down)
    assert {k for k, v in found.items() if v is Result.FAIL} == {
        ("health", "m1"), ("health", "m2"), ("health", "m3"), ("health-leader", "cluster"),
    }  # fmt: skip
    for key in (("raft-term", "cluster"), ("voters-odd", "cluster"), ("learner-progress", "m1"),
                ("storage-fragmentation", "m2"), ("consistency-hashkv", "m3")):  # fmt: skip
        assert found[key] is Result.WARN, key


def test_alarms_quota_fragmentation_and_disk() -> None:
    facts = healthy()
    m1_id = facts.status_start["m1"].member_id or ""
    nospace = dataclasses.replace(facts, alarms=(Alarm(m1_id, "NOSPACE"),))
    assert {k: v for k, v in not_passing(nospace).items() if k[0] == "storage-alarm"} == {
        ("storage-alarm", "m1"): Result.FAIL
    }
    corrupt = dataclasses.replace(facts, alarms=(Alarm("0", "CORRUPT"),))
    assert all(
        results(corrupt)[("storage-alarm", n)].result is Result.FAIL for n in ("m1", "m2", "m3")
    )
    small = with_settings(facts, "m1", quota_backend_bytes=str(16 << 20))
    full = with_status(small, "m1", db_size=17 << 20)
    assert results(full)[("storage-quota", "m1")].result is Result.FAIL
    assert (
        results(with_status(facts, "m1", db_size=int(1.7 * (1 << 30))))[
            ("storage-quota", "m1")
        ].result
        is Result.WARN
    )
    fragmented = with_status(facts, "m2", db_size=200 << 20, db_size_in_use=50 << 20)
    assert results(fragmented)[("storage-fragmentation", "m2")].result is Result.WARN
    small_db = with_status(facts, "m2", db_size=20 << 20, db_size_in_use=1 << 20)
    assert results(small_db)[("storage-fragmentation", "m2")].result is Result.PASS
    assert (
        results(with_member(facts, "m3", free_bytes=10 << 20))[("storage-disk", "m3")].result
        is Result.FAIL
    )
    assert (
        results(with_member(facts, "m3", free_bytes=1 << 30))[("storage-disk", "m3")].result
        is Result.WARN
    )


def test_hashes_without_majority_or_after_different_compactions() -> None:
    facts = healthy()
    split = dataclasses.replace(
        facts, hashes={n: HashKV(i, -1, 21) for i, n in enumerate(("m1", "m2", "m3"))}
    )
    assert all(
        results(split)[("consistency-hashkv", n)].result is Result.FAIL for n in ("m1", "m2", "m3")
    )
    compacted = dataclasses.replace(facts, hashes={**facts.hashes, "m3": HashKV(5, 12, 21)})
    assert results(compacted)[("consistency-hashkv", "m3")].result is Result.WARN
    missing = dataclasses.replace(
        facts,
        hashes={k: v for k, v in facts.hashes.items() if k != "m2"},
        hash_errors={"m2": "timed out"},
    )
    assert results(missing)[("consistency-hashkv", "m2")].result is Result.WARN


def test_certificate_rows_and_backup_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    facts = healthy()
    rows = list(facts.certificates)
    rows[3] = dataclasses.replace(
        rows[3], status="expires within 30d", problems=("expires within 30d",)
    )
    expiring = dataclasses.replace(facts, certificates=tuple(rows), on_hosts=True)
    row = results(expiring)[("certificates", rows[3].name)]
    assert row.result is Result.FAIL and "certs renew" in row.fix and "apply" in row.fix
    rows[0] = dataclasses.replace(rows[0], status="expired", problems=("expired",))
    assert (
        "rotate-ca"
        in results(dataclasses.replace(facts, certificates=tuple(rows)))[("certificates", "ca")].fix
    )
    recent = dataclasses.replace(facts, newest_backup=facts.now - dt.timedelta(hours=2))
    assert results(recent)[BACKUP].result is Result.PASS
    stale = dataclasses.replace(facts, newest_backup=facts.now - dt.timedelta(days=3))
    assert results(stale)[BACKUP].result is Result.WARN


# --- the report ------------------------------------------------------------------------------


def test_exit_codes_and_textfile() -> None:
    rows = tuple(run_checks(CHECKS, recorded()))
    report = CheckReport('we"ird', NOW, rows)
    assert report.exit_code == 1
    passing = CheckReport("c", NOW, tuple(r for r in rows if r.result is Result.PASS))
    assert passing.exit_code == 0
    series = parse_prom(textfile(report))
    check = series["etcdforge_check"]
    key = (("cluster", 'we\\"ird'), ("check", "consistency-hashkv"), ("member", "m3"))
    assert check[key] == 0 and len(check) == len(rows)
    assert (
        series["etcdforge_check_warning"][(key[0], ("check", "backup-age"), ("member", "cluster"))]
        == 1
    )
    assert series["etcdforge_check_last_run_timestamp_seconds"] == {(key[0],): NOW.timestamp()}
    assert "# TYPE etcdforge_check gauge" in textfile(report)
