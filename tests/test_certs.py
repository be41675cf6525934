"""Certificate lifecycle on real clusters: renewal under load, short validity, CA rotation under a
write load (interrupted and resumed), and a cluster started on a PKI issued by the real cfssl."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from etcdforge import pki
from etcdforge.ops.env import env_vars
from etcdforge.ops.renew import served_serial
from etcdforge.ops.target import Selection
from etcdforge.ops.up import up
from etcdforge.tls import TLSFiles
from tests.conftest import ClusterFactory, stop_cluster
from tests.helpers import (
    CLIResult,
    LocalCluster,
    etcd_pids_under,
    kill_cli_at,
    require_binary,
    run_cli,
    spec_data,
    write_spec,
)
from tests.load import WriteLoad, tls_context
from tests.test_cfssl import FIXTURES, run_cfssl

pytestmark = pytest.mark.slow


def _admin_files(cluster: LocalCluster) -> tuple[Path, Path, Path]:
    pki_dir = cluster.state_dir / "pki"
    return pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key"


def _endpoints(cluster: LocalCluster) -> list[str]:
    return [f"https://{m['address']}:2379" for m in cluster.data["members"]]


def _load(cluster: LocalCluster, prefix: str, **options: bool) -> WriteLoad:
    return WriteLoad(_endpoints(cluster), _admin_files(cluster), prefix, **options)


def certs(cluster: LocalCluster, command: str, *args: str, timeout: float = 300) -> CLIResult:
    """`etcdforge certs COMMAND -f SPEC --state-dir STATE ARGS`."""
    return run_cli("certs", command, *cluster.args, *args, timeout=timeout)


def _serial(path: Path) -> int:
    return pki.load_cert(path).serial_number


def _member_files(cluster: LocalCluster, index: int) -> tuple[str, Path]:
    member = cluster.data["members"][index]
    return member["address"], cluster.state_dir / "members" / member["name"] / "pki"


def _stored_keys(cluster: LocalCluster, prefix: str) -> set[str]:
    got = cluster.etcdctl("get", f"{prefix}/", "--prefix", "--keys-only")
    assert got.returncode == 0, got.stderr
    return {line for line in got.stdout.splitlines() if line.strip()}


# --- renewal ------------------------------------------------------------------------------


def test_renew_under_load_serves_new_serial_with_zero_failed_requests(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("renew")
    admin = TLSFiles(*_admin_files(cluster))
    address, member_pki = _member_files(cluster, 0)
    peer_tls = TLSFiles(
        member_pki / "peer-ca.crt", member_pki / "peer.crt", member_pki / "peer.key"
    )
    with _load(cluster, "renew", fresh_connections=True) as load:
        time.sleep(0.3)
        before = served_serial(address, 2379, admin)
        key_before = (member_pki / "server.key").read_bytes()
        result = certs(cluster, "renew", "--member", "m1")
        assert result.code == 0, result.stderr
        assert "renewed 2 certificate(s)" in result.stdout
        # The next handshake after the command returns presents the new certificate.
        assert served_serial(address, 2379, admin) == _serial(member_pki / "server.crt") != before
        assert served_serial(address, 2380, peer_tls) == _serial(member_pki / "peer.crt")
        assert (member_pki / "server.key").read_bytes() == key_before  # key kept by default
        time.sleep(0.3)
        serials = {i: _serial(_member_files(cluster, i)[1] / "server.crt") for i in range(3)}
        result = certs(cluster, "renew", "--all", "--new-key")
        assert result.code == 0, result.stderr
        assert "renewed 7 certificate(s)" in result.stdout
        assert (member_pki / "server.key").read_bytes() != key_before
        for i in range(3):
            member_address, files = _member_files(cluster, i)
            assert _serial(files / "server.crt") != serials[i]
            assert served_serial(member_address, 2379, admin) == _serial(files / "server.crt")
        time.sleep(0.3)
    assert load.failures == []
    assert len(load.acked) > 20
    assert _stored_keys(cluster, "renew") >= set(load.acked)
    pids_before = sorted(etcd_pids_under(cluster.state_dir))
    assert len(pids_before) == 3  # nothing was restarted
    check = certs(cluster, "check")
    assert check.code == 0, check.stdout


def test_short_validity_is_flagged_then_renewed(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("short", pki={"cert_validity_days": 1})
    result = certs(cluster, "check", "-o", "json")
    assert result.code == 1
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    leaves = ["admin", "m1/server", "m1/peer", "m2/server", "m2/peer", "m3/server", "m3/peer"]
    assert [n for n, r in rows.items() if not r["ok"]] == leaves
    assert all(rows[n]["status"] == "expires within 30d" for n in leaves)
    assert rows["ca"]["ok"] and rows["peer-ca"]["ok"]
    assert certs(cluster, "check", "--warn-within", "12h").code == 0
    dry = certs(cluster, "renew", "--dry-run")
    assert dry.code == 0 and "7 certificate(s) would be renewed" in dry.stdout
    renewed = certs(cluster, "renew", "--days", "400")
    assert renewed.code == 0, renewed.stderr
    after = certs(cluster, "check", "-o", "json")
    assert after.code == 0, after.stdout
    assert all(
        r["remaining"].startswith(("399d", "400d"))
        for r in json.loads(after.stdout)
        if r["name"] in leaves
    )
    assert "nothing to renew" in certs(cluster, "renew").stdout


# --- CA rotation --------------------------------------------------------------------------


def _rotate_until(cluster: LocalCluster, marker: str) -> str:
    """Run rotate-ca and SIGKILL it as soon as it reports `marker` (a real interruption)."""
    return kill_cli_at(["certs", "rotate-ca", *cluster.args], lambda line: marker in line)


def test_rotate_ca_under_write_load_interrupted_and_resumed(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cluster = cluster_factory("rotate")
    state_pki = cluster.state_dir / "pki"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ca.crt", "admin.crt", "admin.key", "peer-ca.crt"):
        shutil.copy(state_pki / name, old / name)
    pids = sorted(etcd_pids_under(cluster.state_dir))
    with _load(cluster, "rot", reload=True) as load:
        time.sleep(0.3)
        output = _rotate_until(cluster, "reissue the server certificate m2/server")
        assert "trust the old and new CAs on m3 (restart)" in output
        assert (state_pki / "rotation" / "phase").read_text().strip() == "2"
        # Midway: both CAs trusted, some leaves already from the new CA.
        assert len(pki.load_certs(state_pki / "ca.crt")) == 2
        resumed = certs(cluster, "rotate-ca", timeout=300)
        assert resumed.code == 0, resumed.stderr
        assert "CA rotation complete" in resumed.stdout
        assert "remember the cluster CA in use" not in resumed.stderr  # resumed, not restarted
        assert "trust the old and new CAs on m1" not in resumed.stderr
        assert "stop trusting the old CAs on m3 (restart)" in resumed.stderr
        acked_during = len(load.acked)
        # A request may be mid-timeout when the rotation ends: wait (bounded) for the next ack.
        deadline = time.monotonic() + 30
        while len(load.acked) <= acked_during and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(load.acked) > acked_during, "writes continue after the rotation"
    assert _stored_keys(cluster, "rot") >= set(load.acked), "0 lost writes"
    assert not (state_pki / "rotation").exists()
    # Every member was restarted (twice), one at a time, and all are healthy on the new CA.
    assert not set(pids) & set(etcd_pids_under(cluster.state_dir))
    check = certs(cluster, "check", "-o", "json")
    assert check.code == 0, check.stdout
    rows = {r["name"]: r for r in json.loads(check.stdout)}
    old_ca = pki.load_cert(old / "ca.crt")
    new_ca = pki.load_certs(state_pki / "ca.crt")
    assert len(new_ca) == 1 and new_ca[0].subject != old_ca.subject
    assert rows["m1/server"]["issuer"] == new_ca[0].subject.rfc4514_string()
    for index in range(3):
        files = _member_files(cluster, index)[1]
        assert pki.load_certs(files / "ca.crt") == new_ca
        assert len(pki.load_certs(files / "peer-ca.crt")) == 1
    endpoint = _endpoints(cluster)[0]
    new_admin = tls_context(*_admin_files(cluster))
    assert (
        httpx.post(f"{endpoint}/v3/kv/range", json={"key": "YQ=="}, verify=new_admin).status_code
        == 200
    )
    # The old CA's client certificate is refused now.
    old_admin = tls_context(state_pki / "ca.crt", old / "admin.crt", old / "admin.key")
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"{endpoint}/v3/kv/range", json={"key": "YQ=="}, verify=old_admin, timeout=5)
    # And a client trusting only the old CA no longer trusts the servers.
    only_old = tls_context(old / "ca.crt", state_pki / "admin.crt", state_pki / "admin.key")
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{endpoint}/v3/kv/range", json={"key": "YQ=="}, verify=only_old, timeout=5)
    # The peer port still takes peer certificates only.
    address, files = _member_files(cluster, 1)
    peer_ok = tls_context(files / "peer-ca.crt", files / "peer.crt", files / "peer.key")
    assert (
        httpx.get(f"https://{address}:2380/version", verify=peer_ok, timeout=5).status_code == 200
    )
    admin_on_peer = tls_context(
        files / "peer-ca.crt", state_pki / "admin.crt", state_pki / "admin.key"
    )
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://{address}:2380/version", verify=admin_on_peer, timeout=5)


def test_rotate_ca_pauses_after_a_phase(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("pause")
    state_pki = cluster.state_dir / "pki"
    dry = certs(cluster, "rotate-ca", "--dry-run")
    assert dry.code == 0 and "26 step(s) would run" in dry.stdout
    first = certs(cluster, "rotate-ca", "--stop-after", "trust", timeout=300)
    assert first.code == 0, first.stderr
    assert "paused after phase 'trust'" in first.stdout
    assert len(pki.load_certs(state_pki / "ca.crt")) == 2  # the bundle for other clients
    assert cluster.cli("status").code == 0
    again = certs(cluster, "rotate-ca", "--stop-after", "trust")
    assert again.code == 0 and "restarted none" in again.stdout  # nothing left in that phase
    done = certs(cluster, "rotate-ca", timeout=300)
    assert done.code == 0, done.stderr
    assert "CA rotation complete" in done.stdout
    assert len(pki.load_certs(state_pki / "ca.crt")) == 1
    assert certs(cluster, "check").code == 0


# --- a cluster on a PKI issued by the real cfssl -------------------------------------------


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Path]]:
    """The seed's cfssl steps (etcd.json with this test's loopback hosts), then up --pki-dir."""
    directory = tmp_path_factory.mktemp("imported")
    data = spec_data("seedpki", 3, require_binary("3.5.1"))
    seed = directory / "seed"
    seed.mkdir()
    csr = json.loads((FIXTURES / "etcd.json").read_text())
    csr["hosts"] = [m["address"] for m in data["members"]] + ["127.0.0.1"]
    (seed / "etcd.json").write_text(json.dumps(csr, indent=2))
    config = f"-config={FIXTURES / 'ca-config.json'}"
    run_cfssl(seed, "-initca", str(FIXTURES / "ca-csr.json"), bare="ca")
    ca = ["-ca=ca.pem", "-ca-key=ca-key.pem", config]
    run_cfssl(seed, *ca, "-profile=client", str(FIXTURES / "client.json"), bare="client")
    run_cfssl(seed, *ca, "-profile=server", "etcd.json", bare="server")
    run_cfssl(seed, *ca, "-profile=peer", "etcd.json", bare="peer")
    spec = write_spec(directory, data)
    selection = Selection(file=spec, state_dir=directory / "state")
    cluster = LocalCluster(spec, directory / "state", data)
    try:
        up(selection, pki_dir=seed)
        cluster.env = env_vars(selection)
        yield cluster, seed
    finally:
        stop_cluster(cluster)


def test_cluster_runs_on_a_cfssl_issued_seed_pki(imported: tuple[LocalCluster, Path]) -> None:
    cluster, seed = imported
    status = cluster.cli("status", "-o", "json")
    assert status.code == 0, status.stderr
    assert all(r["healthy"] for r in json.loads(status.stdout))
    assert cluster.etcdctl("put", "seeded", "yes").returncode == 0
    # etcdctl with the seed's own files, exactly as the seed's README would run it.
    env_files = {
        "ETCDCTL_CACERT": seed / "ca.pem",
        "ETCDCTL_CERT": seed / "client.pem",
        "ETCDCTL_KEY": seed / "client-key.pem",
    }
    cluster.env.update({k: str(v) for k, v in env_files.items()})
    got = cluster.etcdctl("get", "seeded", "--print-value-only")
    assert got.returncode == 0 and got.stdout.strip() == "yes", got.stderr
    flags = (cluster.state_dir / "members" / "m1" / "etcd.flags").read_text()
    assert "--peer-cert-allowed-cn=etcd\n" in flags
    check = certs(cluster, "check")
    assert check.code == 0, check.stdout
    rerun = cluster.cli("up")
    assert rerun.code == 0 and "nothing changed" in rerun.stdout, rerun.stderr


def test_imported_single_ca_cluster_refuses_the_client_cert_on_the_peer_port(
    imported: tuple[LocalCluster, Path],
) -> None:
    cluster, seed = imported
    address = cluster.data["members"][0]["address"]
    peer = tls_context(seed / "ca.pem", seed / "peer.pem", seed / "peer-key.pem")
    assert httpx.get(f"https://{address}:2380/version", verify=peer, timeout=5).status_code == 200
    # Same CA, so only the CN pin keeps the client certificate off the peer port.
    client = tls_context(seed / "ca.pem", seed / "client.pem", seed / "client-key.pem")
    assert httpx.get(f"https://{address}:2379/version", verify=client, timeout=5).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"https://{address}:2380/version", verify=client, timeout=5)


def test_imported_pki_renews_from_its_own_ca(imported: tuple[LocalCluster, Path]) -> None:
    cluster, seed = imported
    member_pki = cluster.state_dir / "members" / "m2" / "pki"
    before = pki.load_cert(member_pki / "server.crt")
    result = certs(cluster, "renew", "--member", "m2")
    assert result.code == 0, result.stderr
    after = pki.load_cert(member_pki / "server.crt")
    assert after.serial_number != before.serial_number
    assert after.subject == before.subject  # the seed's C/ST/L/O/OU/CN are kept
    assert pki.inspect_cert(after).sans == pki.inspect_cert(before).sans
    assert pki.signed_by(after, pki.load_cert(seed / "ca.pem"))
    assert certs(cluster, "check").code == 0
    again = cluster.cli("up", "--pki-dir", str(seed))
    assert again.code == 1
    assert "already has other certificates than" in again.stderr
