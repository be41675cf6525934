"""`kubeadm certs --control-plane`: the apiserver's etcd files installed and proven over SSH.

Four fresh fleet hosts (tests/fleet.py): a 3-member cluster deployed with `apply` on the first
three, and two control planes — the fourth host, and the first one doubling as a control plane
(an etcd host that also runs an apiserver). Refusals run first, while nothing is installed
anywhere, so "nothing was written" means /etc/kubernetes does not exist on any host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdforge import kubeadm, pki
from etcdforge.client import EtcdClient, prefix_end
from etcdforge.kubeadm import KubeadmError, parse_control_plane
from etcdforge.ops.kubeadm_certs import CHECK_PREFIX
from etcdforge.ops.target import Selection, record_for
from etcdforge.relay import openssl_reason
from etcdforge.spec import KeyAlgorithm
from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, run_cli

PKI = "/etc/kubernetes/pki"
FILES = ("etcd/ca.crt", "apiserver-etcd-client.crt", "apiserver-etcd-client.key")

# --- parsing and messages (no hosts) ------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "label", "user", "port"),
    [
        ("10.0.0.5", "10.0.0.5", "root", 22),
        ("deploy@cp-1.example.org:2222", "cp-1.example.org", "deploy", 2222),
        ("[fd00::5]:2200", "fd00::5", "root", 2200),
        ("admin@fd00::5", "fd00::5", "admin", 22),
    ],
)
def test_control_plane_syntax(value: str, label: str, user: str, port: int) -> None:
    got, ssh = parse_control_plane(value, {"connect_timeout": 3})
    assert (got, ssh.host, ssh.user, ssh.port, ssh.connect_timeout) == (label, label, user, port, 3)
    assert ssh.sudo is (user != "root")


def test_control_plane_syntax_uses_the_ssh_defaults_and_host_overrides_them() -> None:
    defaults = {"user": "deploy", "port": 2200, "become": False}
    _, ssh = parse_control_plane("cp", defaults)
    assert (ssh.user, ssh.port, ssh.sudo) == ("deploy", 2200, False)
    _, ssh = parse_control_plane("ops@cp:22", defaults)
    assert (ssh.user, ssh.port) == ("ops", 22)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("two words", "--control-plane 'two words': expected [USER@]HOST[:PORT]"),
        ("a@b@c", "--control-plane 'a@b@c': expected [USER@]HOST[:PORT]"),
        ("cp:ssh", "--control-plane 'cp:ssh': port 'ssh' is not a number"),
        ("cp:70000", "--control-plane 'cp:70000': port (:PORT or --ssh-port): Input should be"),
        ("Root@cp", "--control-plane 'Root@cp': user (USER@ or --ssh-user): String should match"),
        ("cp_1", "--control-plane 'cp_1': host: Value error, 'cp_1' is not a valid IP address"),
    ],
)
def test_control_plane_syntax_refusals(value: str, message: str) -> None:
    with pytest.raises(KubeadmError) as caught:
        parse_control_plane(value, {})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_openssl_reasons() -> None:
    mismatch = "depth=0 CN = m1\nverify error:num=64:IP address mismatch\n40A7:error:0A000086:..."
    assert openssl_reason(mismatch) == "server certificate not accepted: IP address mismatch"
    alert = (
        "verify return:1\n4087:error:0A000412:SSL routines:ssl3_read_bytes:sslv3 alert bad "
        "certificate:../ssl/record/rec_layer_s3.c:1601:SSL alert number 42\n"
    )
    assert (
        openssl_reason(alert) == "client certificate rejected by etcd (TLS alert: bad certificate)"
    )
    refused = "4017:error:8000006F:system library:BIO_connect:Connection refused:../crypto/bio\n"
    assert openssl_reason(refused) == "connection refused"
    assert openssl_reason("") == "no answer"


# --- on real hosts --------------------------------------------------------------------------------


@dataclass
class Setup:
    hosts: list[Host]  # 0-2: etcd members; 3: a control plane only
    spec: Path
    state: Path
    env: dict[str, str]
    key: Path
    known_hosts: Path

    @property
    def control_planes(self) -> list[Host]:
        return [self.hosts[3], self.hosts[0]]

    def certs(self, *args: str) -> CLIResult:
        return run_cli(
            "kubeadm", "certs", "-f", str(self.spec), "--ssh-key", str(self.key),
            "--known-hosts", str(self.known_hosts), "--ssh-timeout", "5", *args,
            env=self.env, timeout=300,
        )  # fmt: skip

    def cp_args(self) -> list[str]:
        """The two control planes, one with USER@ and one through --ssh-user."""
        a, b = self.control_planes
        return ["--control-plane", f"deploy@{a.address}", "--control-plane", b.address]

    @property
    def ca_cert(self) -> bytes:
        return (self.state / "pki" / "ca.crt").read_bytes()


@pytest.fixture(scope="module")
def setup(
    fleet_factory: Callable[[int], list[Host]],
    release_server: ReleaseServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    hosts = fleet_factory(4)
    work = tmp_path_factory.mktemp("kubeadm-hosts")
    data = host_spec(
        "kubehosts",
        hosts[:3],
        release_server.url("3.5.1"),
        etcd={"allow_unsafe_version": True},
        state_dir=str(work / "state"),
    )
    spec = write_yaml(work / "cluster.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    applied = run_cli("apply", "-f", str(spec), env=env, timeout=600)
    made = Setup(hosts, spec, work / "state", env, hosts[0].key_path, hosts[0].known_hosts)
    try:
        assert applied.code == 0, applied.stderr
        yield made
    finally:
        run_cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env, timeout=300)
        for host in hosts:
            host.run("rm", "-rf", "/etc/kubernetes", check=False)


def one_line(result: CLIResult) -> str:
    assert result.code == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def nothing_installed(setup: Setup) -> None:
    for host in setup.hosts:
        assert host.run("test", "!", "-e", "/etc/kubernetes", check=False).returncode == 0, host


def test_unreachable_control_plane_stops_before_any_change(setup: Setup) -> None:
    line = one_line(
        setup.certs(*setup.cp_args(), "--control-plane", "10.254.0.250", "--ssh-user", "deploy")
    )
    assert line.startswith("error: 10.254.0.250: unreachable at deploy@10.254.0.250:22"), line
    nothing_installed(setup)


def test_user_without_sudo_stops_before_any_change(setup: Setup) -> None:
    a, b = setup.control_planes
    line = one_line(
        setup.certs(
            "--control-plane", f"deploy@{a.address}", "--control-plane", f"nosudo@{b.address}"
        )
    )
    assert line.startswith(f"error: {b.address}: sudo does not work without a password"), line
    nothing_installed(setup)


def test_non_root_without_become_stops_before_any_change(setup: Setup) -> None:
    line = one_line(setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--no-become"))
    assert re.match(r"error: 10\.254\.0\.\d+: commands do not run as root \(uid \d+\)", line), line
    nothing_installed(setup)


def test_check_before_install_names_the_host_and_file(setup: Setup) -> None:
    a = setup.control_planes[0]
    line = one_line(setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--check"))
    assert line.startswith(f"error: {a.address}: {PKI}/etcd/ca.crt not installed"), line
    nothing_installed(setup)


def test_dry_run_changes_nothing(setup: Setup) -> None:
    result = setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--dry-run")
    assert result.code == 0, result.stderr
    assert "4 step(s) would run" in result.stdout
    nothing_installed(setup)


def stat_files(host: Host) -> dict[str, str]:
    listing = host.run("stat", "-c", "%n %a %U:%G", *(f"{PKI}/{f}" for f in FILES)).stdout
    return dict(line.split(" ", 1) for line in listing.splitlines())


def host_file(host: Host, relative: str) -> bytes:
    return host.run("cat", f"{PKI}/{relative}").stdout.encode()


def test_install_on_control_planes(setup: Setup) -> None:
    result = setup.certs(*setup.cp_args(), "--ssh-user", "deploy")
    assert result.code == 0, result.stderr
    for host in setup.control_planes:
        assert f"{host.address}: installed etcd/ca.crt" in result.stdout
        assert stat_files(host) == {
            f"{PKI}/etcd/ca.crt": "644 root:root",
            f"{PKI}/apiserver-etcd-client.crt": "644 root:root",
            f"{PKI}/apiserver-etcd-client.key": "600 root:root",
        }
        assert host_file(host, "etcd/ca.crt") == setup.ca_cert
        assert host.run("ls", f"{PKI}/etcd").stdout.split() == ["ca.crt"]
    # Only the control planes: the other etcd members got no apiserver files.
    for host in setup.hosts[1:3]:
        assert host.run("test", "!", "-e", "/etc/kubernetes", check=False).returncode == 0

    ca = x509.load_pem_x509_certificate(setup.ca_cert)
    keys = []
    for host in setup.control_planes:
        pair = kubeadm.parse_pair(
            host_file(host, "apiserver-etcd-client.crt"),
            host_file(host, "apiserver-etcd-client.key"),
        )
        assert pair is not None
        cert, key = pair
        keys.append(pki.key_to_pem(key))
        # kubeadm's KubeadmCertEtcdAPIClient: CN, no organization, clientAuth only, etcd CA.
        assert cert.subject.rfc4514_string() == "CN=kube-apiserver-etcd-client"
        assert not cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        assert usage.digital_signature and not usage.key_cert_sign
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert basic.ca is False
        assert isinstance(key, ec.EllipticCurvePrivateKey)  # the spec's default algorithm
        assert pki.signed_by(cert, ca) and pki.key_matches(cert, key)
        assert kubeadm.client_cert_problem(cert, key, ca) is None
    assert keys[0] != keys[1]  # each control plane has a key of its own


def test_no_ca_key_on_any_host(setup: Setup) -> None:
    for name in ("ca.key", "peer-ca.key"):
        body = (setup.state / "pki" / name).read_text().splitlines()[1]  # a line of the key
        for host in setup.hosts:
            found = host.run(
                "grep", "-rlF", "--", body, "/etc", "/root", "/home", "/tmp", "/var", "/opt",
                "/usr/local", check=False, timeout=120,
            )  # fmt: skip
            assert found.returncode == 1 and not found.stdout, (host.name, found.stdout)


def test_rerun_changes_nothing(setup: Setup) -> None:
    before = {h.address: host_file(h, "apiserver-etcd-client.key") for h in setup.control_planes}
    again = setup.certs(*setup.cp_args(), "--ssh-user", "deploy")
    assert again.code == 0, again.stderr
    for host in setup.control_planes:
        assert f"{host.address}: already installed and valid; nothing changed" in again.stdout
        assert host_file(host, "apiserver-etcd-client.key") == before[host.address]


def check_rows(result: CLIResult) -> dict[tuple[str, str], str]:
    """The check table as {(from, endpoint): result}."""
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 3 and cells[1].startswith("https://"):
            rows[(cells[0], cells[1])] = cells[2]
    return rows


def endpoints(setup: Setup) -> list[str]:
    return [f"https://{h.address}:2379" for h in setup.hosts[:3]]


def temp_files(host: Host) -> str:
    return host.run("ls", "-A", "/tmp", "/var/tmp").stdout


def test_check_from_every_control_plane_to_every_endpoint(setup: Setup) -> None:
    before = [temp_files(h) for h in setup.control_planes]
    result = setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--check")
    assert result.code == 0, result.stdout + result.stderr
    rows = check_rows(result)
    wanted = {(h.address, e) for h in setup.control_planes for e in endpoints(setup)}
    assert set(rows) == wanted, result.stdout
    assert set(rows.values()) == {"ok"}
    # The test keys were deleted again.
    record = record_for(Selection(file=setup.spec, state_dir=setup.state))

    async def leftovers() -> int:
        async with EtcdClient(record.endpoints, record.admin_tls) as client:
            prefix = CHECK_PREFIX.encode()
            found = await client.range(prefix, prefix_end(prefix), count_only=True)
            return found.count

    assert asyncio.run(leftovers()) == 0
    # Nothing was uploaded or left behind for the check (openssl is the host's own).
    assert [temp_files(h) for h in setup.control_planes] == before


def test_foreign_certificate_fails_only_that_hosts_rows(setup: Setup) -> None:
    good, broken = setup.control_planes
    other_ca_key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    other_ca_cert = pki.issue_ca("someone-else", other_ca_key, dt.timedelta(days=30))
    cert, key = kubeadm.issue_apiserver_etcd_client(
        other_ca_cert, other_ca_key, KeyAlgorithm.ECDSA_P256, dt.timedelta(days=30)
    )
    for relative, data in (
        ("apiserver-etcd-client.key", pki.key_to_pem(key)),
        ("apiserver-etcd-client.crt", pki.cert_to_pem(cert)),
    ):
        broken.run("sh", "-c", 'cat > "$1"', "sh", f"{PKI}/{relative}", input=data.decode())

    bad = setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--check")
    assert bad.code == 1, bad.stdout + bad.stderr
    rows = check_rows(bad)
    assert len(rows) == 6, bad.stdout
    for endpoint in endpoints(setup):
        assert rows[(good.address, endpoint)] == "ok"
        assert rows[(broken.address, endpoint)].startswith("client certificate rejected by etcd")

    # `certs` sees the foreign pair and reissues it there only; then every row passes again.
    fixed = setup.certs(*setup.cp_args(), "--ssh-user", "deploy")
    assert fixed.code == 0, fixed.stderr
    assert f"{broken.address}: installed" in fixed.stdout
    assert f"{good.address}: already installed and valid; nothing changed" in fixed.stdout
    again = setup.certs(*setup.cp_args(), "--ssh-user", "deploy", "--check")
    assert again.code == 0, again.stdout
    assert set(check_rows(again).values()) == {"ok"}


def test_loose_key_mode_is_replaced_with_a_new_key(setup: Setup) -> None:
    host = setup.control_planes[0]
    old = host_file(host, "apiserver-etcd-client.key")
    host.run("chmod", "644", f"{PKI}/apiserver-etcd-client.key")
    result = setup.certs(*setup.cp_args(), "--ssh-user", "deploy")
    assert result.code == 0, result.stderr
    assert f"{host.address}: installed" in result.stdout
    assert stat_files(host)[f"{PKI}/apiserver-etcd-client.key"] == "600 root:root"
    assert host_file(host, "apiserver-etcd-client.key") != old
