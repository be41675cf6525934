"""cfssl compatibility without a cluster: the seed's JSON files, interop with the real cfssl and
openssl, `certs check` on a cfssl directory, and one-line errors for bad inputs."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509

from etcdforge import cfssl, jsondoc, pki
from etcdforge.errors import PKIError
from tests.helpers import run_cli, write_spec

FIXTURES = Path(__file__).parent / "fixtures" / "cfssl"
SEED = Path(__file__).resolve().parent.parent.parent / "shared" / "seed"


def require_tool(name: str) -> Path:
    """Like helpers.require_binary: a missing tool fails under CI and skips elsewhere."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed here (apt-get install golang-cfssl)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(found)


def run_cfssl(directory: Path, *args: str, bare: str) -> None:
    """`cfssl gencert ARGS | cfssljson -bare BARE` in `directory`, as the seed does."""
    cfssl_bin, cfssljson = require_tool("cfssl"), require_tool("cfssljson")
    directory.mkdir(parents=True, exist_ok=True)
    gen = subprocess.run(
        [str(cfssl_bin), "gencert", *args],
        cwd=directory,
        capture_output=True,
        check=True,
        timeout=60,
    )
    subprocess.run(
        [str(cfssljson), "-bare", bare],
        cwd=directory,
        input=gen.stdout,
        capture_output=True,
        check=True,
        timeout=60,
    )


def gencert(directory: Path, *args: str) -> None:
    result = run_cli("certs", "gencert", "--out", str(directory), *args)
    assert result.code == 0, result.stderr


def seed_set(directory: Path, etcd_json: Path = FIXTURES / "etcd.json") -> Path:
    """The seed's four commands with etcdforge: ca, client, server, peer."""
    config = str(FIXTURES / "ca-config.json")
    gencert(directory, "-initca", str(FIXTURES / "ca-csr.json"))
    ca = ["-ca", str(directory / "ca.pem"), "-ca-key", str(directory / "ca-key.pem")]
    gencert(directory, *ca, "-config", config, "-profile", "client", str(FIXTURES / "client.json"))
    for profile in ("server", "peer"):
        gencert(directory, *ca, "-config", config, "-profile", profile, str(etcd_json))
    return directory


def cfssl_seed_set(directory: Path, etcd_json: Path = FIXTURES / "etcd.json") -> Path:
    """The same four commands with the real cfssl | cfssljson."""
    config = str(FIXTURES / "ca-config.json")
    run_cfssl(directory, "-initca", str(FIXTURES / "ca-csr.json"), bare="ca")
    ca = ["-ca=ca.pem", "-ca-key=ca-key.pem", f"-config={config}"]
    run_cfssl(directory, *ca, "-profile=client", str(FIXTURES / "client.json"), bare="client")
    for profile in ("server", "peer"):
        run_cfssl(directory, *ca, f"-profile={profile}", str(etcd_json), bare=profile)
    return directory


def _exts(path: Path) -> dict[str, object]:
    cert = pki.load_cert(path)
    key_usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    return {
        "key_usage": {
            name
            for name in ("digital_signature", "key_encipherment", "key_cert_sign", "crl_sign")
            if getattr(key_usage, name)
        },
        "eku": pki.inspect_cert(cert).extended_usages,
        "sans": sorted(pki.inspect_cert(cert).sans),
        "subject": cert.subject.rfc4514_string(),
        "ca": pki.inspect_cert(cert).is_ca,
    }


# --- the seed's files ---------------------------------------------------------------------


def test_fixtures_are_the_seed_files_unchanged() -> None:
    if not SEED.exists():
        pytest.skip("the seed document is not beside this checkout")
    text = (SEED / "standalone-etcd-cluster.zh.md").read_text()
    for name in ("ca-config.json", "ca-csr.json", "client.json", "etcd.json"):
        assert (FIXTURES / name).read_text() in text, name


def test_seed_config_profiles_parse_as_cfssl_does() -> None:
    config = cfssl.parse_config((FIXTURES / "ca-config.json").read_text(), "ca-config.json")
    assert set(config.profiles) == {"server", "client", "peer"}
    server = config.profile("server")
    assert server.expiry == dt.timedelta(hours=438000)
    assert server.key_usage is not None
    assert server.key_usage.digital_signature and server.key_usage.key_encipherment
    assert [u.dotted_string for u in server.extended_usages] == [
        "1.3.6.1.5.5.7.3.1",
        "1.3.6.1.5.5.7.3.2",
    ]
    assert [u.dotted_string for u in config.profile("client").extended_usages] == [
        "1.3.6.1.5.5.7.3.2"
    ]


def test_seed_csr_parses_with_subject_hosts_and_key() -> None:
    request = cfssl.parse_csr((FIXTURES / "etcd.json").read_text(), "etcd.json")
    assert request.hosts == ("10.0.0.12", "10.0.0.13", "10.0.0.14", "127.0.0.1")
    assert (request.key_algo, request.key_size) == ("rsa", 2048)
    assert request.subject.rfc4514_string() == "CN=etcd,OU=System,O=k8s,L=BJ,ST=BeiJing,C=CN"
    default = cfssl.parse_csr('{"CN": "x"}', "x.json")
    assert (default.key_algo, default.key_size) == ("ecdsa", 256)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8760h", dt.timedelta(hours=8760)),
        ("1h30m", dt.timedelta(minutes=90)),
        ("1.5h", dt.timedelta(minutes=90)),
        ("90s", dt.timedelta(seconds=90)),
        ("500ms", dt.timedelta(milliseconds=500)),
        ("10d", None),
        ("1y", None),
        ("", None),
        ("h", None),
    ],
)
def test_go_durations(text: str, expected: dt.timedelta | None) -> None:
    assert jsondoc.parse_duration(text) == expected


def test_seed_steps_write_cfssljson_bare_files(tmp_path: Path) -> None:
    seed_set(tmp_path)
    expected = {
        f"{n}{s}" for n in ("ca", "client", "server", "peer") for s in (".pem", "-key.pem", ".csr")
    }
    assert {p.name for p in tmp_path.iterdir()} == expected
    for path in tmp_path.iterdir():
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o600 if path.name.endswith("-key.pem") else 0o644), path
    # Keys in the formats cfssljson writes (PKCS#1 for RSA), CSRs as PEM requests.
    assert (tmp_path / "ca-key.pem").read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    csr = x509.load_pem_x509_csr((tmp_path / "server.csr").read_bytes())
    assert csr.is_signature_valid
    assert csr.subject == pki.load_cert(tmp_path / "server.pem").subject
    ca = pki.load_cert(tmp_path / "ca.pem")
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3649)


def test_bare_name_and_out_directory(tmp_path: Path) -> None:
    gencert(tmp_path / "ca", "-initca", "-bare", "root", str(FIXTURES / "ca-csr.json"))
    assert (tmp_path / "ca" / "root.pem").exists() and (tmp_path / "ca" / "root-key.pem").exists()
    ca = [
        "-ca",
        str(tmp_path / "ca" / "root.pem"),
        "-ca-key",
        str(tmp_path / "ca" / "root-key.pem"),
    ]
    # No -config: cfssl's default policy (server and client auth, one year).
    gencert(
        tmp_path / "out",
        *ca,
        "-hostname",
        "etcd.example.com,127.0.0.1",
        str(FIXTURES / "client.json"),
    )
    leaf = pki.inspect_cert(pki.load_cert(tmp_path / "out" / "client.pem"))
    assert sorted(leaf.sans) == ["127.0.0.1", "etcd.example.com"]
    assert leaf.extended_usages == ("server auth", "client auth")
    assert dt.timedelta(days=364) < leaf.not_after - leaf.not_before <= dt.timedelta(days=366)


def test_initca_refuses_to_overwrite_a_ca_key(tmp_path: Path) -> None:
    gencert(tmp_path, "-initca", str(FIXTURES / "ca-csr.json"))
    before = (tmp_path / "ca-key.pem").read_bytes()
    again = run_cli(
        "certs", "gencert", "--out", str(tmp_path), "-initca", str(FIXTURES / "ca-csr.json")
    )
    assert again.code == 1
    assert "a CA key already exists" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "ca-key.pem").read_bytes() == before
    gencert(tmp_path, "--force", "-initca", str(FIXTURES / "ca-csr.json"))
    assert (tmp_path / "ca-key.pem").read_bytes() != before


# --- interop with cfssl and openssl -------------------------------------------------------


def test_etcdforge_certs_pass_openssl_verify(tmp_path: Path) -> None:
    seed_set(tmp_path)
    for name in ("server", "peer", "client"):
        proc = subprocess.run(
            ["openssl", "verify", "-CAfile", "ca.pem", f"{name}.pem"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == f"{name}.pem: OK", proc.stderr
    purpose = subprocess.run(
        ["openssl", "verify", "-CAfile", "ca.pem", "-purpose", "sslserver", "server.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert purpose.returncode == 0, purpose.stderr


def test_same_usages_sans_and_subjects_as_cfssl(tmp_path: Path) -> None:
    ours, theirs = seed_set(tmp_path / "ours"), cfssl_seed_set(tmp_path / "cfssl")
    for name in ("ca", "server", "peer", "client"):
        assert _exts(ours / f"{name}.pem") == _exts(theirs / f"{name}.pem"), name
    certinfo = require_tool("cfssl")
    for name in ("server", "client"):
        infos = [
            json.loads(
                subprocess.run(
                    [str(certinfo), "certinfo", "-cert", str(d / f"{name}.pem")],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=30,
                ).stdout
            )
            for d in (ours, theirs)
        ]
        assert infos[0].get("sans") == infos[1].get("sans"), name
        assert infos[0]["subject"] == infos[1]["subject"], name


def test_cfssl_certs_signed_by_an_etcdforge_ca_and_vice_versa(tmp_path: Path) -> None:
    """Either tool can sign with the other's CA: the key formats and CA certs interoperate."""
    gencert(tmp_path, "-initca", str(FIXTURES / "ca-csr.json"))
    config = str(FIXTURES / "ca-config.json")
    run_cfssl(
        tmp_path,
        "-ca=ca.pem",
        "-ca-key=ca-key.pem",
        f"-config={config}",
        "-profile=server",
        str(FIXTURES / "etcd.json"),
        bare="server",
    )
    assert pki.signed_by(pki.load_cert(tmp_path / "server.pem"), pki.load_cert(tmp_path / "ca.pem"))
    other = tmp_path / "other"
    other.mkdir()
    run_cfssl(other, "-initca", str(FIXTURES / "ca-csr.json"), bare="ca")
    gencert(
        other,
        "-ca",
        str(other / "ca.pem"),
        "-ca-key",
        str(other / "ca-key.pem"),
        "-config",
        config,
        "-profile",
        "peer",
        str(FIXTURES / "etcd.json"),
    )
    assert pki.signed_by(pki.load_cert(other / "peer.pem"), pki.load_cert(other / "ca.pem"))


def test_check_accepts_cfssl_issued_seed_pki(tmp_path: Path) -> None:
    cfssl_seed_set(tmp_path)
    result = run_cli("certs", "check", "--pki-dir", str(tmp_path), "-o", "json")
    assert result.code == 0, result.stdout + result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"ca", "client", "peer", "server"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["server"]["sans"] == ["10.0.0.12", "10.0.0.13", "10.0.0.14", "127.0.0.1"]
    assert "server auth" in rows["server"]["usages"] and "client auth" in rows["server"]["usages"]
    assert set(rows["ca"]) >= {
        "name",
        "subject",
        "sans",
        "usages",
        "not_after",
        "remaining",
        "issuer",
        "status",
    }
    table = run_cli("certs", "check", "--pki-dir", str(tmp_path))
    assert table.code == 0 and "server" in table.stdout and "CN=etcd" in table.stdout


# --- check finds what is wrong -------------------------------------------------------------


def _spec_for(tmp_path: Path, addresses: list[str]) -> Path:
    return write_spec(
        tmp_path,
        {
            "name": "chk",
            "members": [{"name": f"m{i}", "address": a} for i, a in enumerate(addresses, 1)],
        },
        "chk.yaml",
    )


def test_check_flags_a_missing_member_san(tmp_path: Path) -> None:
    seed_set(tmp_path / "pki")  # hosts 10.0.0.12-14 and 127.0.0.1, as in the seed
    spec = _spec_for(tmp_path, ["127.0.0.1", "127.20.0.2", "127.20.0.3"])
    result = run_cli(
        "certs", "check", "-f", str(spec), "--pki-dir", str(tmp_path / "pki"), "-o", "json"
    )
    assert result.code == 1
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "no SAN for 127.20.0.2" in rows["server"]["status"]
    assert "no SAN for 127.20.0.3" in rows["peer"]["status"]
    assert rows["client"]["status"] == "ok"


def test_check_flags_wrong_usage_foreign_ca_and_key_mismatch(tmp_path: Path) -> None:
    seed_set(tmp_path)
    config = str(FIXTURES / "ca-config.json")
    # A client-profile certificate where a server certificate belongs.
    gencert(
        tmp_path,
        "-ca",
        str(tmp_path / "ca.pem"),
        "-ca-key",
        str(tmp_path / "ca-key.pem"),
        "-config",
        config,
        "-profile",
        "client",
        "-bare",
        "server",
        str(FIXTURES / "etcd.json"),
    )
    # A peer certificate from another CA.
    foreign = tmp_path / "foreign"
    gencert(foreign, "-initca", str(FIXTURES / "ca-csr.json"))
    gencert(
        tmp_path,
        "-ca",
        str(foreign / "ca.pem"),
        "-ca-key",
        str(foreign / "ca-key.pem"),
        "-config",
        config,
        "-profile",
        "peer",
        str(FIXTURES / "etcd.json"),
    )
    # The client certificate next to someone else's key.
    shutil.copy(tmp_path / "peer-key.pem", tmp_path / "client-key.pem")
    result = run_cli("certs", "check", "--pki-dir", str(tmp_path), "-o", "json")
    assert result.code == 1
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "lacks usage 'server auth' needed by a server certificate" in rows["server"]["status"]
    assert "not signed by the CA in ca.pem" in rows["peer"]["status"]
    assert "does not match its key client-key.pem" in rows["client"]["status"]
    assert rows["ca"]["status"] == "ok"


def test_check_near_expiry_and_warning_window(tmp_path: Path) -> None:
    gencert(tmp_path, "-initca", str(FIXTURES / "ca-csr.json"))
    config = tmp_path / "short.json"
    config.write_text(
        json.dumps(
            {
                "signing": {
                    "profiles": {
                        "server": {
                            "expiry": "240h",
                            "usages": ["signing", "key encipherment", "server auth", "client auth"],
                        }
                    }
                }
            }
        )
    )
    gencert(
        tmp_path,
        "-ca",
        str(tmp_path / "ca.pem"),
        "-ca-key",
        str(tmp_path / "ca-key.pem"),
        "-config",
        str(config),
        "-profile",
        "server",
        str(FIXTURES / "etcd.json"),
    )
    result = run_cli("certs", "check", "--pki-dir", str(tmp_path), "-o", "json")
    assert result.code == 1
    server = next(r for r in json.loads(result.stdout) if r["name"] == "server")
    assert server["status"] == "expires within 30d"
    assert server["remaining"].startswith(("9d", "10d"))
    relaxed = run_cli("certs", "check", "--pki-dir", str(tmp_path), "--warn-within", "5d")
    assert relaxed.code == 0, relaxed.stdout


def test_check_detects_an_expired_certificate(tmp_path: Path) -> None:
    gencert(tmp_path, "-initca", str(FIXTURES / "ca-csr.json"))
    config = tmp_path / "tiny.json"
    config.write_text(
        json.dumps(
            {
                "signing": {
                    "default": {
                        "expiry": "1s",
                        "usages": ["signing", "key encipherment", "client auth"],
                    }
                }
            }
        )
    )
    gencert(
        tmp_path,
        "-ca",
        str(tmp_path / "ca.pem"),
        "-ca-key",
        str(tmp_path / "ca-key.pem"),
        "-config",
        str(config),
        "-bare",
        "client",
        str(FIXTURES / "client.json"),
    )
    not_after = pki.load_cert(tmp_path / "client.pem").not_valid_after_utc
    for _ in range(100):  # at most ~10 s; the certificate lives one second
        if dt.datetime.now(dt.UTC) > not_after:
            break
        time.sleep(0.1)
    result = run_cli("certs", "check", "--pki-dir", str(tmp_path), "-o", "json")
    assert result.code == 1
    client = next(r for r in json.loads(result.stdout) if r["name"] == "client")
    assert client["status"] == "expired"
    assert client["remaining"].startswith("-")


# --- bad inputs: one line naming the file, and line:column for JSON ------------------------


def _fails(tmp_path: Path, *args: str) -> str:
    result = run_cli("certs", "gencert", "--out", str(tmp_path / "out"), *args)
    assert result.code == 1, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture()
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    gencert(directory, "-initca", str(FIXTURES / "ca-csr.json"))
    return directory


def _sign_args(ca_dir: Path, config: Path = FIXTURES / "ca-config.json") -> list[str]:
    return [
        "-ca",
        str(ca_dir / "ca.pem"),
        "-ca-key",
        str(ca_dir / "ca-key.pem"),
        "-config",
        str(config),
    ]


def test_malformed_json_names_file_line_and_column(tmp_path: Path, ca_dir: Path) -> None:
    config = tmp_path / "ca-config.json"
    config.write_text('{\n  "signing": {\n    "default": {"expiry": "8760h",}\n  }\n}\n')
    line = _fails(tmp_path, *_sign_args(ca_dir, config), str(FIXTURES / "etcd.json"))
    assert line.startswith(f"error: {config}:3:35: malformed JSON"), line


def test_unknown_profile_names_the_profiles(tmp_path: Path, ca_dir: Path) -> None:
    config = FIXTURES / "ca-config.json"
    line = _fails(tmp_path, *_sign_args(ca_dir), "-profile", "serer", str(FIXTURES / "etcd.json"))
    assert line == (
        f"error: {config}:6:21: no profile 'serer' in signing.profiles "
        "(profiles: client, peer, server); pass one of them with -profile"
    )


def test_missing_ca_key(tmp_path: Path, ca_dir: Path) -> None:
    missing = ca_dir / "nope-key.pem"
    args = ["-ca", str(ca_dir / "ca.pem"), "-ca-key", str(missing), "-profile", "server"]
    line = _fails(tmp_path, *args, str(FIXTURES / "etcd.json"))
    assert line == f"error: {missing}: CA key not found; pass the key of ca.pem with -ca-key"
    line = _fails(tmp_path, "-ca", str(ca_dir / "ca.pem"), str(FIXTURES / "etcd.json"))
    assert line.startswith(f"error: {ca_dir / 'ca.pem'}: no CA key given; pass -ca-key")


def test_ca_cert_and_key_mismatch(tmp_path: Path, ca_dir: Path) -> None:
    other = tmp_path / "other"
    gencert(other, "-initca", str(FIXTURES / "ca-csr.json"))
    args = ["-ca", str(ca_dir / "ca.pem"), "-ca-key", str(other / "ca-key.pem")]
    line = _fails(tmp_path, *args, str(FIXTURES / "etcd.json"))
    assert line == (
        f"error: {other / 'ca-key.pem'}: does not match the CA certificate {ca_dir / 'ca.pem'}; "
        "pass the key made with it"
    )


def test_rsa_below_2048_refused(tmp_path: Path, ca_dir: Path) -> None:
    csr = tmp_path / "weak.json"
    csr.write_text('{\n  "CN": "weak",\n  "key": {"algo": "rsa", "size": 1024}\n}\n')
    line = _fails(tmp_path, *_sign_args(ca_dir), "-profile", "client", str(csr))
    assert line == (
        f"error: {csr}:3:34: key.size: RSA key of 1024 bits is too weak; use 2048 or more "
        "(or ecdsa 256)"
    )
    line = _fails(tmp_path, "-initca", str(csr))
    assert "RSA key of 1024 bits is too weak" in line


def test_invalid_hosts_entry(tmp_path: Path, ca_dir: Path) -> None:
    csr = tmp_path / "etcd.json"
    csr.write_text('{\n  "CN": "etcd",\n  "hosts": [\n    "10.0.0.12",\n    "10.0.0.300"\n  ]\n}\n')
    line = _fails(tmp_path, *_sign_args(ca_dir), "-profile", "server", str(csr))
    assert line == (
        f"error: {csr}:5:5: hosts[1]: '10.0.0.300' is neither an IP address nor a DNS name; "
        "fix or remove it"
    )


def test_csr_without_cn(tmp_path: Path, ca_dir: Path) -> None:
    csr = tmp_path / "nocn.json"
    csr.write_text('{\n  "hosts": ["127.0.0.1"],\n  "key": {"algo": "ecdsa", "size": 256}\n}\n')
    line = _fails(tmp_path, *_sign_args(ca_dir), "-profile", "server", str(csr))
    assert line == f'error: {csr}:1:1: the CSR has no CN; add "CN"'


def test_unknown_usage_and_bad_expiry(tmp_path: Path, ca_dir: Path) -> None:
    config = tmp_path / "cfg.json"
    config.write_text(
        '{"signing": {"profiles": {"x": {"expiry": "10y", "usages": ["server auth"]}}}}'
    )
    line = _fails(
        tmp_path, *_sign_args(ca_dir, config), "-profile", "x", str(FIXTURES / "etcd.json")
    )
    assert line.startswith(
        f"error: {config}:1:43: signing.profiles.x.expiry: '10y' is not a positive"
    )
    config.write_text(
        '{"signing": {"profiles": {"x": {"expiry": "1h", "usages": ["server-auth"]}}}}'
    )
    line = _fails(
        tmp_path, *_sign_args(ca_dir, config), "-profile", "x", str(FIXTURES / "etcd.json")
    )
    assert line.startswith(f"error: {config}:1:60: signing.profiles.x.usages[0]: unknown usage")


def test_missing_csr_file(tmp_path: Path) -> None:
    line = _fails(tmp_path, "-initca", str(tmp_path / "absent.json"))
    assert line.startswith(f"error: {tmp_path / 'absent.json'}: CSR file not found")


def test_pure_api_errors_are_pki_errors() -> None:
    with pytest.raises(PKIError, match=r"^x.json:1:1: malformed JSON"):
        cfssl.parse_csr("", "x.json")
    with pytest.raises(PKIError, match=r"^x.json:1:2: unknown CSR key 'cn'; known keys: CN, ca"):
        cfssl.parse_csr('{"cn": "lower"}', "x.json")


# --- up --pki-dir refuses a PKI etcd would reject, before starting anything ----------------


def test_up_pki_dir_refuses_seed_certs_without_member_addresses(tmp_path: Path) -> None:
    seed_set(tmp_path / "pki")
    spec = _spec_for(tmp_path, ["127.21.0.1", "127.21.0.2", "127.21.0.3"])
    state = tmp_path / "state"
    result = run_cli(
        "up", "-f", str(spec), "--state-dir", str(state), "--pki-dir", str(tmp_path / "pki")
    )
    assert result.code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'pki' / 'peer.pem'}: no SAN for 127.21.0.1; no SAN for 127.21.0.2; "
        "no SAN for 127.21.0.3; reissue it with every member address (and 127.0.0.1) in the "
        "CSR's hosts"
    )
    assert not (state / "pki" / "ca.crt").exists()
