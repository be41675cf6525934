"""The kubeadm hand-off against real etcd: live endpoints, installed certs, stacked migration.

The "stacked" etcd is a single real member started the way kubeadm's static pod runs it, with
kubeadm-shaped certificates (etcd/ca.crt, server, peer, healthcheck-client, and
apiserver-etcd-client one level up) issued with etcdforge's pki.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from etcdforge import pki
from etcdforge.client import EtcdClient, prefix_end, run
from etcdforge.errors import EtcdClientError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir
from etcdforge.kubeadm import KubeadmPaths
from etcdforge.ops.kubeadm_migrate import migrate as migrate_op
from etcdforge.ops.plan import StepLines
from etcdforge.ops.target import Selection
from etcdforge.services import local
from etcdforge.spec import KeyAlgorithm
from etcdforge.tls import TLSFiles
from tests.conftest import ClusterFactory
from tests.helpers import (
    CLIResult,
    LocalCluster,
    etcd_pids_under,
    loopback_addresses,
    require_binary,
    run_cli,
)

pytestmark = pytest.mark.slow

YEAR = dt.timedelta(days=365)


# --- a stacked, kubeadm-shaped etcd --------------------------------------------------------


@dataclass
class Stacked:
    root: Path
    url: str
    pki_dir: Path  # like /etc/kubernetes/pki/etcd
    data_dir: Path
    pid_file: Path

    @property
    def healthcheck_tls(self) -> TLSFiles:
        return TLSFiles(
            self.pki_dir / "ca.crt",
            self.pki_dir / "healthcheck-client.crt",
            self.pki_dir / "healthcheck-client.key",
        )

    def stop(self) -> None:
        local.stop(self.pid_file, self.data_dir)


def _pair(path: Path, cert: x509.Certificate, key: pki.PrivateKey) -> None:
    atomic_write(path.with_suffix(".key"), pki.key_to_pem(key), PRIVATE_FILE)
    atomic_write(path.with_suffix(".crt"), pki.cert_to_pem(cert), PUBLIC_FILE)


def kubeadm_pki(root: Path, node: str, address: str) -> Path:
    """What `kubeadm init` leaves in /etc/kubernetes/pki for its stacked etcd (RSA-2048)."""
    etcd_dir = ensure_dir(root / "pki" / "etcd", 0o755)
    ca_key = pki.generate_key(KeyAlgorithm.RSA_2048)
    ca = pki.issue_ca("etcd-ca", ca_key, 10 * YEAR)
    _pair(etcd_dir / "ca", ca, ca_key)
    hosts = [node, "localhost", address, "127.0.0.1"]
    for name, role, cn, sans in (
        ("server", pki.Role.SERVER, node, hosts),
        ("peer", pki.Role.PEER, node, hosts),
        ("healthcheck-client", pki.Role.CLIENT, "kube-etcd-healthcheck-client", []),
    ):
        key = pki.generate_key(KeyAlgorithm.RSA_2048)
        _pair(etcd_dir / name, pki.issue_role_cert(role, ca, ca_key, cn, key, YEAR, sans), key)
    key = pki.generate_key(KeyAlgorithm.RSA_2048)
    cert = pki.issue_role_cert(pki.Role.CLIENT, ca, ca_key, "kube-apiserver-etcd-client", key, YEAR)
    _pair(root / "pki" / "apiserver-etcd-client", cert, key)
    return etcd_dir


def start_stacked(root: Path, version: str) -> Stacked:
    binary = require_binary(version)
    (address,) = loopback_addresses(1)
    etcd_dir = kubeadm_pki(root, "cp-1", address)
    data_dir = ensure_dir(root / "var-lib-etcd")
    url = f"https://{address}:2379"
    flags = [
        "--name=cp-1",
        f"--data-dir={data_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls=https://{address}:2380",
        f"--initial-advertise-peer-urls=https://{address}:2380",
        f"--initial-cluster=cp-1=https://{address}:2380",
        f"--initial-cluster-token=stacked-{random.getrandbits(32):x}",
        f"--cert-file={etcd_dir / 'server.crt'}",
        f"--key-file={etcd_dir / 'server.key'}",
        f"--trusted-ca-file={etcd_dir / 'ca.crt'}",
        "--client-cert-auth=true",
        f"--peer-cert-file={etcd_dir / 'peer.crt'}",
        f"--peer-key-file={etcd_dir / 'peer.key'}",
        f"--peer-trusted-ca-file={etcd_dir / 'ca.crt'}",
        "--peer-client-cert-auth=true",
        "--snapshot-count=10000",
        "--logger=zap",
        "--log-outputs=stderr",
    ]
    stacked = Stacked(root, url, etcd_dir, data_dir, root / "etcd.pid")
    local.start(binary, flags, stacked.pid_file, root / "etcd.log")
    try:
        _wait_healthy(stacked)
    except BaseException:
        stacked.stop()
        raise
    return stacked


def _wait_healthy(stacked: Stacked, timeout: float = 30.0) -> None:
    async def poll() -> bool:
        async with EtcdClient([stacked.url], stacked.healthcheck_tls, timeout=2.0) as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if (await client.health(stacked.url))[0]:
                    return True
                await asyncio.sleep(0.1)
        return False

    assert run(poll()), (stacked.root / "etcd.log").read_text()[-2000:]


def fill(stacked: Stacked, count: int) -> dict[bytes, bytes]:
    """Kubernetes-like objects: binary values, overwrites and deletes, plus non-registry keys."""
    rng = random.Random(4)
    expected: dict[bytes, bytes] = {}
    kinds = ["pods", "secrets", "configmaps", "deployments.apps", "events"]

    async def load() -> None:
        async with EtcdClient([stacked.url], stacked.healthcheck_tls, timeout=10.0) as client:
            batch = []
            for i in range(count):
                key = f"/registry/{kinds[i % len(kinds)]}/ns-{i % 17}/obj-{i:05d}".encode()
                value = b"k8s\x00\n" + rng.randbytes(rng.randint(10, 300))
                expected[key] = value
                batch.append(client.put(key, value))
                if len(batch) == 100:
                    await asyncio.gather(*batch)
                    batch = []
            await asyncio.gather(*batch)
            for i in range(0, count, 50):  # overwrite some, delete some
                key = f"/registry/{kinds[i % len(kinds)]}/ns-{i % 17}/obj-{i:05d}".encode()
                if i % 100 == 0:
                    await client.delete(key)
                    del expected[key]
                else:
                    expected[key] = b"k8s\x00updated"
                    await client.put(key, expected[key])
            await client.put("compact_rev_key", "7")  # kube-apiserver's own, outside /registry/

    run(load())
    return expected


def registry(endpoint: str, tls: TLSFiles) -> dict[bytes, bytes]:
    async def read() -> dict[bytes, bytes]:
        async with EtcdClient([endpoint], tls, timeout=10.0) as client:
            page = await client.range(b"/registry/", prefix_end(b"/registry/"), endpoint=endpoint)
            return dict(page.kvs)

    return run(read())


@pytest.fixture(scope="module")
def stacked(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stacked, dict[bytes, bytes]]]:
    source = start_stacked(tmp_path_factory.mktemp("stacked"), "3.5.1")
    try:
        yield source, fill(source, 3000)
    finally:
        source.stop()
    assert etcd_pids_under(source.root) == []


def kube(cluster: LocalCluster, command: str, *args: str, timeout: float = 300) -> CLIResult:
    """`etcdforge kubeadm COMMAND -f SPEC --state-dir STATE ARGS...`"""
    return run_cli("kubeadm", command, *cluster.args, *args, timeout=timeout)


def migrate(cluster: LocalCluster, source: Stacked, *extra: str) -> CLIResult:
    return kube(cluster, "migrate", "--from", source.url, "--from-pki", str(source.pki_dir), *extra)


def apiserver_tls(directory: Path) -> TLSFiles:
    return TLSFiles(
        directory / "etcd" / "ca.crt",
        directory / "apiserver-etcd-client.crt",
        directory / "apiserver-etcd-client.key",
    )


def test_migrate_moves_every_registry_key(
    cluster_factory: ClusterFactory,
    stacked: tuple[Stacked, dict[bytes, bytes]],
    tmp_path: Path,
) -> None:
    source, expected = stacked
    target = cluster_factory("mig")
    assert len(expected) > 2900
    assert registry(source.url, source.healthcheck_tls) == expected

    result = migrate(target, source)
    assert result.code == 0, result.stderr
    assert f"{len(expected)} /registry/ keys from {source.url}" in result.stderr
    assert "identical on every member" in result.stderr
    document = yaml.safe_load(result.stdout)
    endpoints = [f"https://{m['address']}:2379" for m in target.data["members"]]
    assert document["etcd"]["external"]["endpoints"] == endpoints
    assert document["kind"] == "ClusterConfiguration"

    # What the kube-apiserver will see: its own certificate, through every member.
    out = tmp_path / "etc-kubernetes-pki"
    installed = kube(target, "certs", "--out", str(out))
    assert installed.code == 0, installed.stderr
    for endpoint in endpoints:
        assert registry(endpoint, apiserver_tls(out)) == expected
    got = target.etcdctl("get", "compact_rev_key", "--print-value-only")
    assert got.stdout.strip() == "7"
    assert len(etcd_pids_under(target.state_dir)) == 3
    assert not (target.state_dir / "migrate" / "progress.json").exists()
    leftovers = [p for p in (target.state_dir / "members").rglob("*.pre-migrate")]
    assert leftovers == []

    # A second migration would replace that data: refused unless --replace, nothing changed.
    pids = sorted(etcd_pids_under(target.state_dir))
    again = migrate(target, source)
    assert again.code == 1
    assert "already holds" in again.stderr and "--replace" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert sorted(etcd_pids_under(target.state_dir)) == pids

    # With --replace the target is rebuilt from a fresh snapshot of the source.
    target.etcdctl("put", "/registry/only-in-target", "x")
    replaced = migrate(target, source, "--replace")
    assert replaced.code == 0, replaced.stderr
    assert registry(endpoints[1], apiserver_tls(out)) == expected


def test_certs_check_proves_every_endpoint(cluster_factory: ClusterFactory, tmp_path: Path) -> None:
    target = cluster_factory("chk")
    out = tmp_path / "pki"
    first = kube(target, "certs", "--out", str(out))
    assert first.code == 0, first.stderr
    assert (out / "apiserver-etcd-client.key").stat().st_mode & 0o777 == 0o600
    assert (out / "apiserver-etcd-client.crt").stat().st_mode & 0o777 == 0o644
    assert (out / "etcd" / "ca.crt").read_bytes() == (
        target.state_dir / "pki" / "ca.crt"
    ).read_bytes()
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == [
        "apiserver-etcd-client.crt",
        "apiserver-etcd-client.key",
        "ca.crt",
    ]
    assert b"PRIVATE KEY" not in (out / "etcd" / "ca.crt").read_bytes()
    cert_before = (out / "apiserver-etcd-client.crt").read_bytes()
    rerun = kube(target, "certs", "--out", str(out))
    assert "nothing changed" in rerun.stdout
    assert (out / "apiserver-etcd-client.crt").read_bytes() == cert_before

    check = kube(target, "certs", "--out", str(out), "--check")
    assert check.code == 0, check.stderr + check.stdout
    rows = [line for line in check.stdout.splitlines() if "https://" in line]
    assert len(rows) == 3 and all(" ok " in row for row in rows)
    left = target.etcdctl("get", "/registry/etcdforge-check/", "--prefix", "--keys-only")
    assert left.stdout.strip() == ""

    # A certificate from another CA is reissued by `certs`, and fails `--check` until then.
    other = tmp_path / "other"
    kubeadm_pki(other, "x", "127.0.0.1")
    os.replace(other / "pki" / "apiserver-etcd-client.crt", out / "apiserver-etcd-client.crt")
    os.replace(other / "pki" / "apiserver-etcd-client.key", out / "apiserver-etcd-client.key")
    bad = kube(target, "certs", "--out", str(out), "--check")
    assert bad.code == 1
    assert bad.stdout.count("https://") == 3 and " ok " not in bad.stdout
    fixed = kube(target, "certs", "--out", str(out))
    assert "issue the apiserver-etcd-client" in fixed.stderr
    assert kube(target, "certs", "--out", str(out), "--check").code == 0


def test_outputs_follow_the_live_member_list(cluster_factory: ClusterFactory) -> None:
    target = cluster_factory("memb")
    endpoints = [f"https://{m['address']}:2379" for m in target.data["members"]]
    before = yaml.safe_load(kube(target, "config").stdout)
    assert before["etcd"]["external"]["endpoints"] == endpoints

    async def remove_last() -> None:
        tls = TLSFiles(
            *(target.state_dir / "pki" / n for n in ("ca.crt", "admin.crt", "admin.key"))
        )
        async with EtcdClient(endpoints[:1], tls) as client:
            members = await client.member_list()
            victim = next(m for m in members if endpoints[2] in m.client_urls)
            # etcd refuses ("unhealthy cluster") until peers have been connected for 5 s.
            for _ in range(60):
                try:
                    await client.call(endpoints[0], "/v3/cluster/member/remove", {"ID": victim.id})
                    return
                except EtcdClientError as exc:
                    if "unhealthy cluster" not in str(exc):
                        raise
                    await asyncio.sleep(0.5)
            raise AssertionError("member remove kept failing with 'unhealthy cluster'")

    run(remove_last())
    after = kube(target, "config")
    assert after.code == 0, after.stderr
    assert yaml.safe_load(after.stdout)["etcd"]["external"]["endpoints"] == endpoints[:2]
    assert "warning" not in after.stderr
    flags = kube(target, "apiserver-flags")
    assert f"--etcd-servers={endpoints[0]},{endpoints[1]}\n" in flags.stdout

    assert target.cli("down").code == 0
    offline = kube(target, "apiserver-flags")
    assert offline.code == 0
    assert "not reachable" in offline.stderr and "endpoints come from the spec" in offline.stderr
    assert f"--etcd-servers={','.join(endpoints)}" in offline.stdout


# --- bad inputs stop before any change ---------------------------------------------------------


def test_migrate_refusals_change_nothing(
    cluster_factory: ClusterFactory,
    stacked: tuple[Stacked, dict[bytes, bytes]],
    tmp_path: Path,
) -> None:
    source, _ = stacked
    target = cluster_factory("refuse")
    pids = sorted(etcd_pids_under(target.state_dir))

    def refused(*args: str) -> str:
        result = kube(target, "migrate", *target.args, *args)
        assert result.code == 1, result.stdout
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert sorted(etcd_pids_under(target.state_dir)) == pids
        assert not (target.state_dir / "migrate" / "snapshot.db").exists()
        return result.stderr

    (free,) = loopback_addresses(1)
    pki_arg = ["--from-pki", str(source.pki_dir)]
    assert "unreachable" in refused("--from", f"https://{free}:2379", *pki_arg)
    stranger = kubeadm_pki(tmp_path / "stranger", "cp-9", "127.0.0.1")
    message = refused("--from", source.url, "--from-pki", str(stranger))
    assert "rejected the certificates" in message or "refused or unreachable" in message
    assert "ca.crt: not found" in refused("--from", source.url, "--from-pki", str(tmp_path))
    assert "exactly one https://" in refused("--from", f"{source.url},{source.url}", *pki_arg)

    victim = target.state_dir / "members" / "m3"
    local.stop(victim / "etcd.pid", victim / "data")
    pids = sorted(etcd_pids_under(target.state_dir))
    assert "target member m3" in refused("--from", source.url, *pki_arg)


def test_migrate_into_etcd_3_4_with_etcdctl_restore(
    cluster_factory: ClusterFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Debian's 3.4.23 has no etcdutl: restore goes through etcdctl, no revision bump."""
    source = start_stacked(tmp_path_factory.mktemp("stacked34"), "3.4.23")
    try:
        expected = fill(source, 500)
        target = cluster_factory("mig34", version="3.4.23")
        result = migrate(target, source)
        assert result.code == 0, result.stderr
        assert "no --bump-revision" in result.stderr
        for member in target.data["members"]:
            endpoint = f"https://{member['address']}:2379"
            assert registry(endpoint, _admin(target)) == expected
    finally:
        source.stop()


def _admin(cluster: LocalCluster) -> TLSFiles:
    pki_dir = cluster.state_dir / "pki"
    return TLSFiles(pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")


class _Interrupted(Exception):
    pass


def test_interrupted_migration_resumes(
    cluster_factory: ClusterFactory,
    stacked: tuple[Stacked, dict[bytes, bytes]],
) -> None:
    """Stop a migration after the first member is restored; a rerun finishes the rest."""
    source, expected = stacked
    target = cluster_factory("resume")
    seen: list[str] = []

    def progress(title: str) -> None:
        seen.append(title)
        if title == "restore m2 from the snapshot":
            raise _Interrupted

    selection = Selection(file=target.spec_path, state_dir=target.state_dir)
    with pytest.raises(_Interrupted):
        migrate_op(
            selection, source.url, source.pki_dir, KubeadmPaths(), progress=StepLines(progress)
        )
    assert "restore m1 from the snapshot" in seen
    assert etcd_pids_under(target.state_dir) == []
    assert (target.state_dir / "migrate" / "progress.json").exists()

    # The members are down now, yet the rerun does not refuse: it resumes with the same snapshot.
    dry = migrate(target, source, "--dry-run")
    assert dry.code == 0, dry.stderr
    assert "restore m2" in dry.stdout and "restore m1" not in dry.stdout
    assert "snapshot the stacked" not in dry.stdout
    other = kube(target, "migrate", "--from", "https://127.0.0.9:2379", "--from-pki", "/x")
    assert other.code == 1 and "is in progress" in other.stderr

    result = migrate(target, source)
    assert result.code == 0, result.stderr
    assert "restore m1" not in result.stderr and "restore m3" in result.stderr
    for member in target.data["members"]:
        assert registry(f"https://{member['address']}:2379", _admin(target)) == expected
    assert not list((target.state_dir / "members").rglob("*.pre-migrate"))
