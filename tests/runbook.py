"""The seed runbook's cluster, built literally on test hosts: what `etcdforge adopt` starts from.

Every step is the runbook's own (shared/seed/standalone-etcd-cluster.zh.md), with the fleet's
addresses in place of 10.0.0.12-14: the seed's cfssl JSON files (tests/fixtures/cfssl) fed to the
real `cfssl`/`cfssljson`, everything in /etc/etcd copied with `scp` (the CA key included), etcd
3.5.1 (the nearest to the runbook's 3.5.2 here, same known-bad class) in /usr/local/bin, the
runbook's unit with its typo written on the first member, copied to the others and patched there
with the runbook's `sed` lines, then `systemctl daemon-reload/enable/start` on every member.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.fleet import Host, run_command
from tests.helpers import REPO, require_binary

FIXTURES = REPO / "tests" / "fixtures" / "cfssl"
SSL_DIR = "/etc/etcd/ssl"
UNIT = "/usr/lib/systemd/system/etcd.service"
DATA_DIR = "/var/lib/etcd/default.etcd"
SEED_ADDRESSES = ("10.0.0.12", "10.0.0.13", "10.0.0.14")

# The runbook's unit for its first member, verbatim (typo included); its initial cluster is
# rebuilt for the member count, since a one-member cluster is built too (bad-input tests).
SEED_UNIT = """\
[Unit]
Description=Etcd Server
After=neCNork.target
After=network-online.target
Wants=network-online.target
[Service]
Type=notify
ExecStart=/usr/local/bin/etcd \\
--name=kubernetes-master1 \\
--data-dir=/var/lib/etcd/default.etcd \\
--listen-peer-urls=https://10.0.0.12:2380 \\
--listen-client-urls=https://10.0.0.12:2379,http://127.0.0.1:2379 \\
--advertise-client-urls=https://10.0.0.12:2379 \\
--initial-advertise-peer-urls=https://10.0.0.12:2380 \\
--initial-cluster=@INITIAL_CLUSTER@ \\
--initial-cluster-token=etcd-cluster \\
--initial-cluster-state=new \\
--cert-file=/etc/etcd/ssl/server.pem \\
--key-file=/etc/etcd/ssl/server-key.pem \\
--peer-cert-file=/etc/etcd/ssl/peer.pem \\
--peer-key-file=/etc/etcd/ssl/peer-key.pem \\
--trusted-ca-file=/etc/etcd/ssl/ca.pem \\
--peer-trusted-ca-file=/etc/etcd/ssl/ca.pem
Restart=on-failure
LimitNOFILE=65536
[Install]
WantedBy=multi-user.target
"""


@dataclass(frozen=True)
class RunbookCluster:
    """A runbook cluster on `hosts`; `ssl` is the admin machine's copy of its /etc/etcd/ssl."""

    hosts: list[Host]
    ssl: Path

    @property
    def names(self) -> list[str]:
        return [f"kubernetes-master{i + 1}" for i in range(len(self.hosts))]

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{h.address}:2379" for h in self.hosts]

    @property
    def client_files(self) -> tuple[Path, Path, Path]:
        """What the runbook hands the kube-apiserver: the CA and client.pem with its key."""
        return self.ssl / "ca.pem", self.ssl / "client.pem", self.ssl / "client-key.pem"


def ssh_options(host: Host) -> list[str]:
    return [
        "-F", "/dev/null", "-i", str(host.key_path), "-o", "IdentitiesOnly=yes",
        "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
        "-o", f"UserKnownHostsFile={host.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "LogLevel=ERROR",
    ]  # fmt: skip


def scp(host: Host, sources: Sequence[Path], target: str, recursive: bool = False) -> None:
    """The runbook's `scp [-r] ... root@HOST:TARGET`, as root with the fleet's key."""
    flags = ["-r"] if recursive else []
    argv = ["scp", *ssh_options(host), *flags, *map(str, sources), f"root@{host.address}:{target}"]
    run_command(argv, timeout=120)


def root_ssh(host: Host, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_command(
        ["ssh", *ssh_options(host), f"root@{host.address}", command], check=check, timeout=120
    )


def cfssl(directory: Path, addresses: Sequence[str]) -> None:
    """The runbook's certificate steps, in `directory` (its /etc/etcd/ssl on the first member)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("ca-config.json", "ca-csr.json", "client.json", "etcd.json"):
        shutil.copy(FIXTURES / name, directory / name)
    etcd_json = json.loads((FIXTURES / "etcd.json").read_text())
    etcd_json["hosts"] = [*addresses, "127.0.0.1"]  # the seed's 10.0.0.12-14 and 127.0.0.1
    (directory / "etcd.json").write_text(json.dumps(etcd_json, indent=2) + "\n")
    sign = "cfssl gencert -ca=ca.pem -ca-key=ca-key.pem -config=ca-config.json"
    for line in (
        "cfssl gencert -initca ca-csr.json | cfssljson -bare ca",
        f"{sign} -profile=client client.json | cfssljson -bare client -",
        f"{sign} -profile=server etcd.json | cfssljson -bare server",
        f"{sign} -profile=peer etcd.json | cfssljson -bare peer",
    ):
        subprocess.run(
            ["bash", "-o", "pipefail", "-c", line],
            cwd=directory, check=True, capture_output=True, timeout=60,
        )  # fmt: skip


def seed_unit(addresses: Sequence[str]) -> str:
    """The first member's unit as the runbook writes it, with these addresses for 10.0.0.12.."""
    initial = ",".join(
        f"kubernetes-master{i + 1}=https://{a}:2380" for i, a in enumerate(addresses)
    )
    return SEED_UNIT.replace("@INITIAL_CLUSTER@", initial).replace(SEED_ADDRESSES[0], addresses[0])


def build(hosts: list[Host], work: Path) -> RunbookCluster:
    """Build and start the runbook's cluster on `hosts`; returns once `member list` answers."""
    addresses = [h.address for h in hosts]
    ssl = work / "ssl"
    cfssl(ssl, addresses)
    etcd = require_binary("3.5.1")
    unit = work / "etcd.service"
    unit.write_text(seed_unit(addresses))

    def install(index: int) -> None:
        host = hosts[index]
        root_ssh(host, f"mkdir -p {SSL_DIR}")
        scp(host, sorted(ssl.iterdir()), f"{SSL_DIR}/", recursive=True)
        scp(host, [etcd, etcd.parent / "etcdctl"], "/usr/local/bin/")
        scp(host, [unit], UNIT)
        if index == 0:
            return
        # The runbook's own edits on each other member (its 0.12 -> 0.13 on our addresses).
        root_ssh(host, f"sed -i '/name/s/master1/master{index + 1}/' {UNIT}")
        root_ssh(host, f"sed -i '/urls/s/{addresses[0]}/{host.address}/g' {UNIT}")

    def start(host: Host) -> None:
        root_ssh(host, "systemctl daemon-reload && systemctl enable etcd && systemctl start etcd")

    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        list(pool.map(install, range(len(hosts))))
        list(pool.map(start, hosts))  # together: a member of a new cluster waits for a quorum
    cluster = RunbookCluster(hosts, ssl)
    listed = member_list(cluster)
    assert listed.returncode == 0 and listed.stdout.count("started") == len(hosts), listed
    return cluster


def member_list(cluster: RunbookCluster) -> subprocess.CompletedProcess[str]:
    """The runbook's own check, run on the first member in /etc/etcd/ssl."""
    endpoints = ",".join(cluster.endpoints)
    return root_ssh(
        cluster.hosts[0],
        f"cd {SSL_DIR} && ETCDCTL_API=3 etcdctl --endpoints='{endpoints}' --cacert=ca.pem "
        "--cert=server.pem --key=server-key.pem member list",
        check=False,
    )


def plain_http(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    """etcdctl over the runbook's plain-http listener, as any local process on the member can."""
    return host.run(
        "/usr/local/bin/etcdctl", "--endpoints=http://127.0.0.1:2379", "--command-timeout=3s",
        *args, check=False,
    )  # fmt: skip
