"""The security checks: CIS Kubernetes Benchmark §2 and §1.1.11-12 for etcd, key file modes,
plain-http listeners and the TLS floor, all judged on what each member's process runs with.

Sources, as cited on each check:

- CIS Kubernetes Benchmark v1.8, §2 "Etcd Node Configuration", as kube-bench encodes it
  (aquasecurity/kube-bench `cfg/cis-1.8/etcd.yaml`): every item is a test on the running etcd's
  flag *or* its `ETCD_*` variable (2.1 `--cert-file`/`ETCD_CERT_FILE` ..., 2.7
  `--trusted-ca-file`), which is why the facts merge both (`ops.check_probe.process_settings`).
- §1.1.11/1.1.12 (kube-bench `cfg/cis-1.8/master.yaml`): `stat -c %a` of `--data-dir` is 700 or
  stricter, `stat -c %U:%G` is etcd:etcd. A local cluster's data belongs to the user running it.
- Key files 0600: the CIS rule for Kubernetes PKI keys (§1.1.21), applied to etcd's own keys.
- Listeners: etcd's flag defaults are plain http (`http://localhost:2379`, `:2380`; etcd docs,
  op-guide/configuration), so an unset URL flag counts as http.
- TLS floor: etcd's TLS listeners refuse TLS 1.0/1.1 (measured on 3.4.23 and 3.5.1: "protocol
  version" alert), and `--tls-min-version` (3.5.8+, CHANGELOG-3.5) accepts only TLS1.2 and
  TLS1.3 (`etcd --help` of 3.5.16, 3.5.30), default TLS1.2. So the row passes unless a release
  is handed something else; it is kept so the floor shows in every report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from etcdforge.ops.check_model import (
    Check,
    Facts,
    MemberFacts,
    Verdict,
    failed,
    passed,
    per_member,
    warned,
)
from etcdforge.ops.check_probe import KUBERNETES_CA, KUBERNETES_CA_NAME

CIS = "CIS Kubernetes Benchmark v1.8 §{} (kube-bench cfg/cis-1.8/{})"
TRUE_VALUES = ("1", "t", "T", "TRUE", "true", "True")  # Go's strconv.ParseBool
#: etcd's defaults when a URL flag is not given (op-guide/configuration): plain http.
DEFAULT_URLS = {
    "listen-client-urls": "http://localhost:2379",
    "advertise-client-urls": "http://localhost:2379",
    "listen-peer-urls": "http://localhost:2380",
    "initial-advertise-peer-urls": "http://localhost:2380",
    "listen-client-http-urls": "",
}
TLS_SCHEMES = ("https", "unixs")
TLS_VERSIONS = ("TLS1.2", "TLS1.3")

MemberJudge = Callable[[MemberFacts, Facts], Verdict]


def redeploy(facts: Facts) -> str:
    """How a member gets back to the settings etcdforge renders."""
    if facts.on_hosts:
        return "`etcdforge apply -f FILE` restarts it with them"
    return "restart it from its flags file (`etcdforge down` then `etcdforge up`)"


def audited(judge: MemberJudge) -> MemberJudge:
    """Judge a member's process settings only when they could be read."""

    def wrapped(member: MemberFacts, facts: Facts) -> Verdict:
        if member.error is not None:
            return warned(f"not audited: {member.error}", "make the member's host reachable")
        if not member.running:
            return warned("not audited: the member is not running", "start it")
        config = member.settings.get("config-file")
        if config:
            return warned(
                f"not audited: runs with --config-file {config}, which overrides flags and env",
                "move the settings to flags or ETCD_* variables",
            )
        return judge(member, facts)

    return wrapped


def is_true(value: str | None) -> bool:
    return value in TRUE_VALUES


def _shown(member: MemberFacts, name: str) -> str:
    value = member.settings.get(name)
    return f"--{name}={value}" if value is not None else f"--{name} not set"


def missing_file(member: MemberFacts, name: str) -> bool:
    """The setting names a file the probe found missing (not merely unprobed)."""
    return name in member.files and member.files[name] is None


def file_pair(cert: str, key: str) -> MemberJudge:
    def judge(member: MemberFacts, facts: Facts) -> Verdict:
        unset = [f"--{n}" for n in (cert, key) if not member.settings.get(n)]
        if unset:
            return failed(f"{' and '.join(unset)} not set", f"set them; {redeploy(facts)}")
        gone = [member.settings[n] for n in (cert, key) if missing_file(member, n)]
        if gone:
            return failed(f"missing: {', '.join(gone)}", f"restore the files; {redeploy(facts)}")
        return passed(f"{_shown(member, cert)} {_shown(member, key)}")

    return judge


def flag_true(name: str) -> MemberJudge:
    def judge(member: MemberFacts, facts: Facts) -> Verdict:
        if is_true(member.settings.get(name)):
            return passed(_shown(member, name))
        return failed(_shown(member, name), f"set --{name}=true; {redeploy(facts)}")

    return judge


def flag_not_true(name: str) -> MemberJudge:
    def judge(member: MemberFacts, facts: Facts) -> Verdict:
        if not is_true(member.settings.get(name)):
            return passed(_shown(member, name))
        return failed(_shown(member, name), f"remove --{name}; {redeploy(facts)}")

    return judge


def unique_ca(member: MemberFacts, facts: Facts) -> Verdict:
    """2.7: etcd trusts a CA of its own, not the Kubernetes cluster CA."""
    trusted = member.settings.get("trusted-ca-file")
    if not trusted:
        return failed("--trusted-ca-file not set", f"give etcd a CA of its own; {redeploy(facts)}")
    kubernetes = set(member.cas.get(KUBERNETES_CA_NAME, ()))
    if not kubernetes:
        return passed(f"--trusted-ca-file={trusted}; no {KUBERNETES_CA} on the member's machine")
    shared = [
        name for name in ("trusted-ca-file", "peer-trusted-ca-file")
        if kubernetes & set(member.cas.get(name, ()))
    ]  # fmt: skip
    if shared:
        return failed(
            f"{' and '.join('--' + n for n in shared)} trust the Kubernetes CA ({KUBERNETES_CA})",
            "issue etcd's certificates from a CA of its own (etcdforge does)",
        )
    return passed(f"--trusted-ca-file={trusted} differs from {KUBERNETES_CA}")


def separate_peer_ca(member: MemberFacts, facts: Facts) -> Verdict:
    """One CA for both ports lets any client certificate in on the peer port, unless the peer
    port is pinned to a CN or hostname (measured; shared/DESIGN.md "Facts")."""
    client = set(member.cas.get("trusted-ca-file", ()))
    peer = set(member.cas.get("peer-trusted-ca-file", ()))
    if not client or not peer:
        return passed("one of the CA files is unset or unreadable (see cis-2.4, cis-2.7)")
    if not client & peer:
        return passed("the peer port trusts a CA of its own")
    pinning = ("peer-cert-allowed-cn", "peer-cert-allowed-hostname")
    pins = [n for n in pinning if member.settings.get(n)]
    if pins:
        return passed(f"one CA for both ports; peer port pinned by {_shown(member, pins[0])}")
    return warned(
        "one CA for both ports: any client certificate is accepted on the peer port",
        "`etcdforge certs rotate-ca` gives the peer port a CA of its own",
    )


def data_dir_mode(member: MemberFacts, facts: Facts) -> Verdict:
    stat = member.data_dir_stat
    if stat is None:
        return _data_dir_unknown(member)
    seen = f"{member.data_dir} {stat.mode:04o}"
    if stat.mode & 0o077:
        return failed(seen, f"chmod 700 {member.data_dir}")
    return passed(seen)


def data_dir_owner(member: MemberFacts, facts: Facts) -> Verdict:
    stat = member.data_dir_stat
    if stat is None:
        return _data_dir_unknown(member)
    seen = f"{member.data_dir} {stat.owner}"
    if stat.owner != member.expected_owner:
        return failed(
            f"{seen} (expected {member.expected_owner})",
            f"chown -R {member.expected_owner} {member.data_dir}",
        )
    return passed(seen)


def _data_dir_unknown(member: MemberFacts) -> Verdict:
    if member.error is not None:
        return warned(f"not audited: {member.error}", "make the member's host reachable")
    return failed(f"{member.data_dir or 'data dir'}: missing", "restore the member's data dir")


def key_modes(member: MemberFacts, facts: Facts) -> Verdict:
    seen: list[str] = []
    lax: list[str] = []
    for name in ("key-file", "peer-key-file"):
        path, stat = member.settings.get(name), member.files.get(name)
        if path is None or stat is None:
            continue
        seen.append(f"{path} {stat.mode:04o}")
        if stat.mode & 0o177:
            lax.append(path)
    if lax:
        return failed("; ".join(seen), f"chmod 600 {' '.join(lax)}")
    return passed("; ".join(seen) or "no key files set (see cis-2.1, cis-2.4)")


def plain_urls(settings: Mapping[str, str]) -> list[str]:
    """`setting url` for every URL a member listens on or advertises without TLS."""
    found = []
    for name, default in DEFAULT_URLS.items():
        value = settings.get(name, default)
        for url in (u.strip() for u in value.split(",")):
            if url and url.partition("://")[0].lower() not in TLS_SCHEMES:
                found.append(f"{name} {url}" + ("" if name in settings else " (etcd's default)"))
    return found


def no_plain_http(member: MemberFacts, facts: Facts) -> Verdict:
    found = plain_urls(member.settings)
    if found:
        return failed("; ".join(found), f"use https:// URLs only; {redeploy(facts)}")
    urls = member.settings.get("listen-client-urls", "")
    return passed(f"https only (client {urls}, peer {member.settings.get('listen-peer-urls')})")


def tls_floor(member: MemberFacts, facts: Facts) -> Verdict:
    value = member.settings.get("tls-min-version")
    if value is None:
        return passed("TLS 1.2 minimum (etcd's default; built in before --tls-min-version, 3.5.8)")
    if value not in TLS_VERSIONS:
        return failed(f"--tls-min-version={value}", "set --tls-min-version=TLS1.2 or TLS1.3")
    return passed(f"--tls-min-version={value}")


def _cis(number: str, title: str, judge: MemberJudge, source: str = "etcd.yaml") -> Check:
    return Check(f"cis-{number}", title, CIS.format(number, source), per_member(judge))


SECURITY_CHECKS: Sequence[Check] = (
    _cis("2.1", "client TLS cert and key set", audited(file_pair("cert-file", "key-file"))),
    _cis("2.2", "client-cert-auth=true", audited(flag_true("client-cert-auth"))),
    _cis("2.3", "no auto-tls", audited(flag_not_true("auto-tls"))),
    _cis("2.4", "peer TLS cert and key set", audited(file_pair("peer-cert-file", "peer-key-file"))),
    _cis("2.5", "peer-client-cert-auth=true", audited(flag_true("peer-client-cert-auth"))),
    _cis("2.6", "no peer-auto-tls", audited(flag_not_true("peer-auto-tls"))),
    _cis("2.7", "a CA for etcd alone", audited(unique_ca)),
    Check(
        "peer-ca-separate",
        "peer port trusts its own CA",
        "etcd security docs (--peer-cert-allowed-cn); shared/DESIGN.md Facts (measured)",
        per_member(audited(separate_peer_ca)),
    ),
    _cis("1.1.11", "data dir mode 0700", data_dir_mode, "master.yaml"),
    _cis("1.1.12", "data dir owner", data_dir_owner, "master.yaml"),
    Check(
        "key-file-mode",
        "key files 0600",
        CIS.format("1.1.21", "master.yaml") + ", applied to etcd's keys",
        per_member(audited(key_modes)),
    ),
    Check(
        "listen-plain-http",
        "no plain-http client or peer URL",
        "etcd docs op-guide/configuration (URL flags default to http://localhost)",
        per_member(audited(no_plain_http)),
    ),
    Check(
        "tls-min-version",
        "TLS 1.2 or newer only",
        "etcd CHANGELOG-3.5 (3.5.8 --tls-min-version); measured on 3.4.23/3.5.1",
        per_member(audited(tls_floor)),
    ),
)
