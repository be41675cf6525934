"""kubeadm config, apiserver flags and the apiserver-etcd-client certificate.

Output is checked against the field names read from kubeadm's own types.go
(tests/fixtures/kubeadm/types.json), not against etcdforge's renderer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdforge import kubeadm, pki
from etcdforge.kubeadm import KubeadmError, KubeadmPaths, merge_config
from etcdforge.spec import KeyAlgorithm
from tests.helpers import run_cli, spec_data, write_spec

TYPES = json.loads((Path(__file__).parent / "fixtures" / "kubeadm" / "types.json").read_text())
ENDPOINTS = ["https://10.0.0.1:2379", "https://10.0.0.2:2379", "https://10.0.0.3:2379"]


def assert_matches_kubeadm_types(document: dict[str, Any], version: str) -> None:
    """Every key is a json field of kubeadm's type at that position; required ones are there."""
    types = TYPES[version]
    assert document["apiVersion"] == types["apiVersion"]
    assert document["kind"] == "ClusterConfiguration"

    def walk(value: dict[str, Any], type_name: str, where: str) -> None:
        definition = types[type_name]
        unknown = set(value) - set(definition["fields"])
        assert not unknown, f"{where}: {unknown} are not fields of kubeadm's {type_name}"
        for field in definition.get("required", []):
            assert field in value, f"{where}.{field} is required by kubeadm's {type_name}"
        exclusive = definition.get("exclusive", [])
        assert sum(f in value for f in exclusive) <= 1, f"{where}: {exclusive} are exclusive"
        for field, nested in definition.get("nested", {}).items():
            if field in value:
                assert isinstance(value[field], dict)
                walk(value[field], nested, f"{where}.{field}")

    walk(document, "ClusterConfiguration", "ClusterConfiguration")


@pytest.mark.parametrize("api", ["v1beta3", "v1beta4"])
def test_config_uses_kubeadm_field_names(api: str) -> None:
    text = kubeadm.render_cluster_configuration(ENDPOINTS, KubeadmPaths(), api)
    document = yaml.safe_load(text)
    assert_matches_kubeadm_types(document, api)
    assert document["etcd"] == {
        "external": {
            "endpoints": ENDPOINTS,
            "caFile": "/etc/kubernetes/pki/etcd/ca.crt",
            "certFile": "/etc/kubernetes/pki/apiserver-etcd-client.crt",
            "keyFile": "/etc/kubernetes/pki/apiserver-etcd-client.key",
        }
    }


def test_paths_are_overridable_and_must_be_absolute() -> None:
    paths = KubeadmPaths("/srv/pki/ca.pem", "/srv/pki/client.pem", "/srv/pki/client-key.pem")
    document = kubeadm.cluster_configuration(ENDPOINTS, paths.validate())
    assert document["etcd"]["external"]["keyFile"] == "/srv/pki/client-key.pem"
    with pytest.raises(
        KubeadmError, match=re.escape("--cert-file 'client.pem' must be an absolute path")
    ):
        KubeadmPaths(cert_file="client.pem").validate()


def test_endpoints_are_https_without_stray_commas() -> None:
    assert kubeadm.check_endpoints(["https://a:2379/", " https://b:2379"]) == [
        "https://a:2379",
        "https://b:2379",
    ]
    for bad in ("http://a:2379", "https://a:2379,", "https://a", ""):
        with pytest.raises(KubeadmError, match="is not https://HOST:PORT"):
            kubeadm.check_endpoints([bad])


def test_apiserver_flags() -> None:
    flags = kubeadm.apiserver_flags(ENDPOINTS, KubeadmPaths())
    assert flags == [
        "--etcd-servers=https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379",
        "--etcd-cafile=/etc/kubernetes/pki/etcd/ca.crt",
        "--etcd-certfile=/etc/kubernetes/pki/apiserver-etcd-client.crt",
        "--etcd-keyfile=/etc/kubernetes/pki/apiserver-etcd-client.key",
    ]


# --- merging ------------------------------------------------------------------------------

INIT = """\
# Cluster bootstrap for prod-1
apiVersion: kubeadm.k8s.io/{v}
kind: InitConfiguration
nodeRegistration:
  name: cp-1
  taints: []
"""
CLUSTER = """\
apiVersion: kubeadm.k8s.io/{v}
kind: ClusterConfiguration
kubernetesVersion: v1.31.2   # pinned
controlPlaneEndpoint: "api.example.test:6443"
etcd:
  local:
    dataDir: /var/lib/etcd
    serverCertSANs: [etcd.example.test]
# networking follows
networking:
  podSubnet: 10.244.0.0/16
"""
KUBELET = """\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: systemd
"""


def _docs(text: str) -> list[str]:
    return text.split("---\n")


@pytest.mark.parametrize("api", ["v1beta3", "v1beta4"])
def test_merge_replaces_local_and_keeps_everything_else(api: str) -> None:
    original = "---\n".join([INIT.format(v=api), CLUSTER.format(v=api), KUBELET])
    result = merge_config(original, "kubeadm.yaml", ENDPOINTS, KubeadmPaths())
    assert result.replaced == "local"
    assert result.api == api
    before, after = _docs(original), _docs(result.text)
    assert after[0] == before[0] and after[2] == before[2]  # byte for byte, comments included
    assert "# pinned" in after[1] and "# networking follows" in after[1]
    merged = list(yaml.safe_load_all(result.text))
    expected = list(yaml.safe_load_all(original))
    expected[1]["etcd"] = {"external": merged[1]["etcd"]["external"]}
    assert merged == expected
    assert merged[1]["etcd"]["external"]["endpoints"] == ENDPOINTS
    assert_matches_kubeadm_types(merged[1], api)


def test_merge_adds_etcd_when_missing_and_is_idempotent() -> None:
    original = "apiVersion: kubeadm.k8s.io/v1beta4\nkind: ClusterConfiguration\nclusterName: c1"
    first = merge_config(original, "k.yaml", ENDPOINTS, KubeadmPaths())
    assert first.replaced is None
    assert yaml.safe_load(first.text)["clusterName"] == "c1"
    second = merge_config(first.text, "k.yaml", ENDPOINTS, KubeadmPaths())
    assert second.replaced == "external"
    assert second.text == first.text


def test_merge_handles_flow_style() -> None:
    original = (
        "{apiVersion: kubeadm.k8s.io/v1beta3, kind: ClusterConfiguration, "
        "etcd: {local: {dataDir: /x}}, clusterName: c}\n---\nkind: KubeletConfiguration\n"
    )
    result = merge_config(original, "k.yaml", ENDPOINTS, KubeadmPaths())
    docs = list(yaml.safe_load_all(result.text))
    assert docs[0]["clusterName"] == "c"
    assert list(docs[0]["etcd"]) == ["external"]
    assert docs[1] == {"kind": "KubeletConfiguration"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: ClusterConfiguration\n  bad: [", r"k\.yaml:\d+: not valid YAML"),
        (KUBELET, "no ClusterConfiguration document"),
        (
            "apiVersion: kubeadm.k8s.io/v1beta2\nkind: ClusterConfiguration\n",
            r"k\.yaml:1: ClusterConfiguration apiVersion 'kubeadm.k8s.io/v1beta2' is not supported",
        ),
        ("kind: ClusterConfiguration\n", "apiVersion '\\(missing\\)' is not supported"),
        (
            CLUSTER.format(v="v1beta3") + "---\n" + CLUSTER.format(v="v1beta3"),
            "2 ClusterConfiguration documents",
        ),
    ],
)
def test_merge_refuses_bad_files(text: str, message: str) -> None:
    with pytest.raises(KubeadmError, match=message) as info:
        merge_config(text, "k.yaml", ENDPOINTS, KubeadmPaths())
    assert "\n" not in str(info.value)


def test_merge_refuses_an_api_other_than_the_files() -> None:
    with pytest.raises(
        KubeadmError, match=re.escape("is kubeadm.k8s.io/v1beta3, not kubeadm.k8s.io/v1beta4")
    ):
        merge_config(CLUSTER.format(v="v1beta3"), "k.yaml", ENDPOINTS, KubeadmPaths(), "v1beta4")


# --- the client certificate -----------------------------------------------------------------


def _ca(name: str = "etcd-ca") -> tuple[x509.Certificate, pki.PrivateKey]:
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    return pki.issue_ca(name, key, dt.timedelta(days=3650)), key


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.ECDSA_P256, KeyAlgorithm.RSA_2048])
def test_apiserver_client_cert_is_shaped_like_kubeadms(algorithm: KeyAlgorithm) -> None:
    expected = TYPES["apiserver_etcd_client"]
    ca_cert, ca_key = _ca()
    cert, key = kubeadm.issue_apiserver_etcd_client(
        ca_cert, ca_key, algorithm, dt.timedelta(days=365)
    )
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert cn == [expected["common_name"]]
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME) == []
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    # kubeadm's NewSignedCert sets keyEncipherment; it is only meaningful for RSA keys.
    assert usage.key_encipherment == (algorithm is not KeyAlgorithm.ECDSA_P256)
    assert pki.signed_by(cert, ca_cert)
    assert kubeadm.client_cert_problem(cert, key, ca_cert) is None


def test_client_cert_problems_are_named() -> None:
    ca_cert, ca_key = _ca()
    other_ca, _ = _ca("other")
    cert, key = kubeadm.issue_apiserver_etcd_client(
        ca_cert, ca_key, KeyAlgorithm.ECDSA_P256, dt.timedelta(days=365)
    )
    assert "not signed by the cluster CA" in str(kubeadm.client_cert_problem(cert, key, other_ca))
    wrong_key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    assert "does not match" in str(kubeadm.client_cert_problem(cert, wrong_key, ca_cert))
    admin = pki.issue_role_cert(
        pki.Role.CLIENT, ca_cert, ca_key, "admin", key, dt.timedelta(days=365)
    )
    assert "CN is not" in str(kubeadm.client_cert_problem(admin, key, ca_cert))
    short, short_key = kubeadm.issue_apiserver_etcd_client(
        ca_cert, ca_key, KeyAlgorithm.ECDSA_P256, dt.timedelta(days=10)
    )
    assert "expires within 30 days" in str(kubeadm.client_cert_problem(short, short_key, ca_cert))
    assert kubeadm.parse_pair(b"junk", b"junk") is None


# --- the CLI without a running cluster -------------------------------------------------------


def test_cli_config_falls_back_to_the_spec_with_a_warning(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, spec_data("nodeploy", 3))
    result = run_cli("kubeadm", "config", "-f", str(spec), "--state-dir", str(tmp_path / "s"))
    assert result.code == 0, result.stderr
    assert "warning: cluster nodeploy is not deployed" in result.stderr
    document = yaml.safe_load(result.stdout)
    assert_matches_kubeadm_types(document, "v1beta4")
    addresses = [m["address"] for m in yaml.safe_load(spec.read_text())["members"]]
    assert document["etcd"]["external"]["endpoints"] == [f"https://{a}:2379" for a in addresses]


def test_cli_merge_rewrites_the_file_in_place(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, spec_data("mergecli", 3))
    target = tmp_path / "kubeadm.yaml"
    original = "---\n".join([INIT.format(v="v1beta3"), CLUSTER.format(v="v1beta3"), KUBELET])
    target.write_text(original)
    os.chmod(target, 0o640)
    args = ["kubeadm", "config", "-f", str(spec), "--state-dir", str(tmp_path / "s")]
    dry = run_cli(*args, "--merge", str(target), "--dry-run")
    assert dry.code == 0, dry.stderr
    assert target.read_text() == original
    assert "external:" in dry.stdout
    result = run_cli(*args, "--merge", str(target))
    assert result.code == 0, result.stderr
    assert "etcd.local replaced by etcd.external (3 endpoints)" in result.stdout
    assert (target.stat().st_mode & 0o777) == 0o640
    merged = list(yaml.safe_load_all(target.read_text()))
    assert_matches_kubeadm_types(merged[1], "v1beta3")
    again = run_cli(*args, "--merge", str(target))
    assert "nothing changed" in again.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("a: [", "not valid YAML"),
        (KUBELET, "no ClusterConfiguration"),
        ("apiVersion: kubeadm.k8s.io/v1beta1\nkind: ClusterConfiguration\n", "not supported"),
    ],
)
def test_cli_merge_bad_files_are_one_line_errors(
    tmp_path: Path, content: str | None, message: str
) -> None:
    spec = write_spec(tmp_path, spec_data("badmerge", 3))
    target = tmp_path / "kubeadm.yaml"
    if content is not None:
        target.write_text(content)
    result = run_cli(
        "kubeadm",
        "config",
        "-f",
        str(spec),
        "--state-dir",
        str(tmp_path / "s"),
        "--merge",
        str(target),
    )
    assert result.code == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")
    if content is not None:
        assert target.read_text() == content


def test_cli_control_plane_refusals_before_any_login(tmp_path: Path) -> None:
    """Bad HOST syntax and a cluster that is not deployed stop before any SSH connection."""
    spec = write_spec(tmp_path, spec_data("cp", 3))
    base = ("kubeadm", "certs", "-f", str(spec), "--state-dir", str(tmp_path))
    result = run_cli(*base, "--control-plane", "cp1")
    assert result.code == 1
    assert result.stderr.startswith(f"error: no cluster 'cp' at {tmp_path}")
    result = run_cli(*base, "--control-plane", "Admin@cp1")
    assert result.code == 1
    assert result.stderr.startswith(
        "error: --control-plane 'Admin@cp1': user (USER@ or --ssh-user)"
    )
