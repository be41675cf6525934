"""Pure kubeadm hand-off: external-etcd ClusterConfiguration, apiserver flags, the client cert.

Field names and nesting follow kubeadm's public types (cmd/kubeadm/app/apis/kubeadm/v1beta3 and
v1beta4 types.go: `etcd.external.{endpoints,caFile,certFile,keyFile}`, identical in both). The
apiserver-etcd-client certificate follows kubeadm's certlist.go (`KubeadmCertEtcdAPIClient`: CN
`kube-apiserver-etcd-client`, no organization since v1.29, extended usage clientAuth only,
signed by the etcd CA). Nothing here touches the disk or the network.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from etcdforge import pki
from etcdforge.errors import EtcdforgeError
from etcdforge.spec import KeyAlgorithm, SSHSpec

KUBEADM_GROUP = "kubeadm.k8s.io"
API_VERSIONS = {"v1beta3": f"{KUBEADM_GROUP}/v1beta3", "v1beta4": f"{KUBEADM_GROUP}/v1beta4"}
DEFAULT_API = "v1beta4"
CLUSTER_KIND = "ClusterConfiguration"

#: kubeadm's default certificatesDir and file names (constants.go).
KUBEADM_PKI_DIR = PurePosixPath("/etc/kubernetes/pki")
CA_RELATIVE = "etcd/ca.crt"
CERT_RELATIVE = "apiserver-etcd-client.crt"
KEY_RELATIVE = "apiserver-etcd-client.key"
APISERVER_ETCD_CLIENT_CN = "kube-apiserver-etcd-client"


class KubeadmError(EtcdforgeError):
    """A kubeadm config file or kubeadm hand-off input is unusable; nothing was changed."""


@dataclass(frozen=True)
class KubeadmPaths:
    """Where the kube-apiserver finds the etcd CA and its client pair (kubeadm's defaults)."""

    ca_file: str = str(KUBEADM_PKI_DIR / CA_RELATIVE)
    cert_file: str = str(KUBEADM_PKI_DIR / CERT_RELATIVE)
    key_file: str = str(KUBEADM_PKI_DIR / KEY_RELATIVE)

    def validate(self) -> KubeadmPaths:
        # kubeadm's ValidateEtcd rejects relative paths; catch it before the user runs kubeadm.
        for field, value in (
            ("--ca-file", self.ca_file),
            ("--cert-file", self.cert_file),
            ("--key-file", self.key_file),
        ):
            if not PurePosixPath(value).is_absolute():
                raise KubeadmError(
                    f"{field} {value!r} must be an absolute path (kubeadm requires it)"
                )
        return self


def check_endpoints(endpoints: Sequence[str]) -> list[str]:
    """https URLs only, no blanks or stray commas: kubeadm joins them into --etcd-servers."""
    clean = []
    for endpoint in endpoints:
        value = endpoint.strip().rstrip("/")
        if not re.fullmatch(r"https://[^\s,/]+:\d+", value):
            raise KubeadmError(
                f"etcd endpoint {endpoint!r} is not https://HOST:PORT; "
                "the apiserver connects with TLS client certificates"
            )
        clean.append(value)
    if not clean:
        raise KubeadmError("no etcd endpoints: the cluster has no members with client URLs")
    return list(dict.fromkeys(clean))


def api_version(api: str) -> str:
    try:
        return API_VERSIONS[api]
    except KeyError:
        raise KubeadmError(
            f"--api {api!r} is not supported; use one of {', '.join(API_VERSIONS)}"
        ) from None


def external_etcd(endpoints: Sequence[str], paths: KubeadmPaths) -> dict[str, Any]:
    """The `etcd` value of a ClusterConfiguration; kubeadm's ExternalEtcd (same in v1beta3/4)."""
    return {
        "external": {
            "endpoints": check_endpoints(endpoints),
            "caFile": paths.ca_file,
            "certFile": paths.cert_file,
            "keyFile": paths.key_file,
        }
    }


def cluster_configuration(
    endpoints: Sequence[str], paths: KubeadmPaths, api: str = DEFAULT_API
) -> dict[str, Any]:
    return {
        "apiVersion": api_version(api),
        "kind": CLUSTER_KIND,
        "etcd": external_etcd(endpoints, paths),
    }


def dump(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)


def render_cluster_configuration(
    endpoints: Sequence[str], paths: KubeadmPaths, api: str = DEFAULT_API
) -> str:
    return dump(cluster_configuration(endpoints, paths, api))


def apiserver_flags(endpoints: Sequence[str], paths: KubeadmPaths) -> list[str]:
    """What kubeadm itself puts on kube-apiserver for an external etcd (controlplane manifests)."""
    return [
        f"--etcd-servers={','.join(check_endpoints(endpoints))}",
        f"--etcd-cafile={paths.ca_file}",
        f"--etcd-certfile={paths.cert_file}",
        f"--etcd-keyfile={paths.key_file}",
    ]


# --- merging into a user's kubeadm config file ---------------------------------------------


@dataclass(frozen=True)
class MergeResult:
    text: str
    api: str
    replaced: str | None  # "local", "external" or None when the file had no etcd section


def merge_config(
    text: str,
    source: str,
    endpoints: Sequence[str],
    paths: KubeadmPaths,
    api: str | None = None,
) -> MergeResult:
    """Point the file's ClusterConfiguration at the external cluster; keep everything else.

    Only the `etcd:` block of the ClusterConfiguration document is rewritten, as text, so every
    other document, field, comment and quoting stays byte for byte as the user wrote it. The
    result is parsed again and compared with the intended data before it is returned.
    """
    nodes, documents, index, version = _parse(text, source, api)
    etcd = external_etcd(endpoints, paths)
    old_etcd = documents[index].get("etcd") or {}
    replaced = next((k for k in ("local", "external") if k in old_etcd), None)
    expected = [dict(d) if isinstance(d, dict) else d for d in documents]
    expected[index]["etcd"] = etcd
    merged = _splice_etcd(text, nodes[index], etcd)
    if merged is None or list(yaml.safe_load_all(merged)) != expected:
        merged = _redump(text, nodes, index, expected[index])
    return MergeResult(text=merged, api=_short(version), replaced=replaced)


def validate_config(text: str, source: str, api: str | None = None) -> str:
    """Check a kubeadm file is mergeable before anything else runs; returns its API version."""
    return _short(_parse(text, source, api)[3])


def _parse(text: str, source: str, api: str | None) -> tuple[list[yaml.Node], list[Any], int, str]:
    try:
        nodes = list(yaml.compose_all(text))
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise KubeadmError(f"{where}: not valid YAML ({problem}); fix the file") from None
    index, version = _find_cluster_configuration(nodes, documents, source)
    if api is not None and version != api_version(api):
        raise KubeadmError(
            f"{source}: its ClusterConfiguration is {version}, not {api_version(api)}; drop --api "
            "or convert the file with `kubeadm config migrate`"
        )
    return nodes, documents, index, version


def _short(version: str) -> str:
    return version.rsplit("/", 1)[-1]


def _find_cluster_configuration(
    nodes: list[yaml.Node], documents: list[Any], source: str
) -> tuple[int, str]:
    found: list[tuple[int, str]] = []
    for i, document in enumerate(documents):
        if not isinstance(document, dict) or document.get("kind") != CLUSTER_KIND:
            continue
        version = str(document.get("apiVersion", ""))
        line = nodes[i].start_mark.line + 1
        if version not in API_VERSIONS.values():
            raise KubeadmError(
                f"{source}:{line}: ClusterConfiguration apiVersion {version or '(missing)'!r} is "
                f"not supported; use {' or '.join(API_VERSIONS.values())} "
                "(convert with `kubeadm config migrate`)"
            )
        found.append((i, version))
    if not found:
        raise KubeadmError(
            f"{source}: no ClusterConfiguration document (kind: {CLUSTER_KIND}); add one, or run "
            "without --merge to print a new one"
        )
    if len(found) > 1:
        raise KubeadmError(
            f"{source}: {len(found)} ClusterConfiguration documents; kubeadm accepts one, "
            "remove the others"
        )
    return found[0]


def _block(etcd: dict[str, Any], indent: int) -> str:
    lines = dump({"etcd": etcd}).splitlines()
    return "\n".join(" " * indent + line for line in lines)


def _splice_etcd(text: str, node: yaml.Node, etcd: dict[str, Any]) -> str | None:
    """Replace (or append) the top-level `etcd:` entry of one block-style mapping document."""
    if not isinstance(node, yaml.MappingNode) or node.flow_style or not node.value:
        return None
    indent = node.value[0][0].start_mark.column
    block = _block(etcd, indent)
    for key, value in node.value:
        if key.value != "etcd":
            continue
        start, end = key.start_mark.index, value.end_mark.index
        # A block value's span runs on over trailing comments and blank lines that belong to
        # the next key; leave those where they are.
        span = text[start:end]
        lines = span.splitlines(keepends=True)
        while len(lines) > 1 and (not lines[-1].strip() or lines[-1].lstrip().startswith("#")):
            lines.pop()
        kept = "".join(lines)
        newline = "\n" if kept.endswith("\n") else ""
        return text[:start] + block + newline + text[start + len(kept) :]
    end = node.end_mark.index
    prefix = text[:end]
    if not prefix.endswith("\n"):
        prefix += "\n"
    return prefix + block + "\n" + text[end:]


def _redump(text: str, nodes: list[yaml.Node], index: int, document: dict[str, Any]) -> str:
    """Fallback for unusual layouts (flow style): re-serialise just that one document."""
    node = nodes[index]
    start, end = node.start_mark.index, node.end_mark.index
    tail = text[end:]
    body = dump(document).rstrip("\n")
    return text[:start] + body + ("" if tail.startswith("\n") else "\n") + tail


# --- the apiserver-etcd-client certificate -------------------------------------------------


def issue_apiserver_etcd_client(
    ca_cert: x509.Certificate,
    ca_key: pki.PrivateKey,
    algorithm: KeyAlgorithm,
    validity: dt.timedelta,
) -> tuple[x509.Certificate, pki.PrivateKey]:
    """kubeadm's apiserver-etcd-client: CN kube-apiserver-etcd-client, clientAuth, etcd CA."""
    key = pki.generate_key(algorithm)
    cert = pki.issue_role_cert(
        pki.Role.CLIENT, ca_cert, ca_key, APISERVER_ETCD_CLIENT_CN, key, validity
    )
    return cert, key


def parse_pair(
    cert_pem: bytes | None, key_pem: bytes | None
) -> tuple[x509.Certificate, pki.PrivateKey] | None:
    """An installed certificate and key, or None when either is missing or unreadable."""
    if cert_pem is None or key_pem is None:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return None
    return cert, key


#: Renew an installed client certificate this long before it expires.
RENEW_BEFORE = dt.timedelta(days=30)


def client_cert_problem(
    cert: x509.Certificate,
    key: pki.PrivateKey,
    ca_cert: x509.Certificate,
    now: dt.datetime | None = None,
) -> str | None:
    """Why an installed apiserver-etcd-client pair must be reissued, or None if it is good."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [n.value for n in names] != [APISERVER_ETCD_CLIENT_CN]:
        return f"its CN is not {APISERVER_ETCD_CLIENT_CN}"
    if not pki.key_matches(cert, key):
        return "the key does not match the certificate"
    if not pki.signed_by(cert, ca_cert):
        return "it is not signed by the cluster CA"
    try:
        usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        return "it lacks the clientAuth usage"
    if pki.inspect_cert(cert).remaining(now) < RENEW_BEFORE:
        return "it expires within 30 days"
    return None


# --- control-plane hosts ---------------------------------------------------------------------

#: What each installed file's mode must be; a file with another mode or owner is not installed.
INSTALLED_MODES = {CA_RELATIVE: 0o644, CERT_RELATIVE: 0o644, KEY_RELATIVE: 0o600}
INSTALLED_OWNER = "root:root"

_USER_AT = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<rest>[^@\s]+)$")


def parse_control_plane(
    value: str, defaults: dict[str, Any], option: str = "--control-plane"
) -> tuple[str, SSHSpec]:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`) over the --ssh-* defaults, validated as a
    member's `ssh` section is, so both accept and refuse the same things.

    Returns the host as written (the label every message and check row uses) and its ssh section.
    """
    match = _USER_AT.match(value.strip())
    if match is None:
        raise KubeadmError(f"{option} {value!r}: expected [USER@]HOST[:PORT]")
    fields = dict(defaults)
    if match["user"]:
        fields["user"] = match["user"]
    rest = match["rest"]
    bracketed = re.fullmatch(r"\[(?P<host>[^\]]+)\](?::(?P<port>[^:]*))?", rest)
    if bracketed:
        host, port = bracketed["host"], bracketed["port"]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    else:
        host, port = rest, None  # a name, an IPv4 address or a bare IPv6 address
    if port is not None:
        if not port.isdigit():
            raise KubeadmError(f"{option} {value!r}: port {port!r} is not a number")
        fields["port"] = int(port)
    fields["host"] = host
    try:
        ssh = SSHSpec.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "value"
        fields_named = {"user": "user (USER@ or --ssh-user)", "port": "port (:PORT or --ssh-port)"}
        raise KubeadmError(
            f"{option} {value!r}: {fields_named.get(where, where)}: {error['msg']}"
        ) from None
    return host, ssh
