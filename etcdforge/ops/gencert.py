"""`etcdforge certs gencert`: cfssl's gencert and cfssljson -bare in one step."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etcdforge import cfssl, pki
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    pass


# --- cfssl gencert --------------------------------------------------------------------------


@dataclass(frozen=True)
class GencertResult:
    files: cfssl.BareFiles
    subject: str
    sans: tuple[str, ...]
    serial: int
    not_after: dt.datetime


def _read(path: Path, what: str, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} not found; check the path given to {option}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PKIError(f"{path}: cannot read the {what} ({exc.__class__.__name__})") from None


def _parse_hostnames(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for host in hosts:
        try:
            pki.san_entries([host])
        except PKIError:
            raise PKIError(
                f"-hostname: {host!r} is neither an IP address nor a DNS name; fix or remove it"
            ) from None
    return hosts


def gencert(
    csr_file: Path,
    out_dir: Path,
    *,
    initca: bool = False,
    ca: Path | None = None,
    ca_key: Path | None = None,
    config: Path | None = None,
    profile: str | None = None,
    bare: str | None = None,
    hostname: str | None = None,
    force: bool = False,
) -> GencertResult:
    """`cfssl gencert ... | cfssljson -bare NAME` in one step: NAME.pem, NAME-key.pem, NAME.csr."""
    request = cfssl.parse_csr(_read(csr_file, "CSR file", "gencert"), str(csr_file))
    if initca:
        if ca is not None or ca_key is not None:
            raise PKIError("-initca creates a new self-signed CA; drop -ca and -ca-key")
        files = cfssl.BareFiles.of(out_dir, bare or "ca")
        if files.key.exists() and not force:
            raise PKIError(
                f"{files.key}: a CA key already exists; replacing it would orphan every "
                "certificate it signed: choose another -bare NAME or pass --force"
            )
        issued = cfssl.init_ca(request)
    else:
        if ca is None:
            raise PKIError(
                f"{csr_file}: no CA to sign with; pass -ca ca.pem -ca-key ca-key.pem "
                "(or -initca to create a CA)"
            )
        if ca_key is None:
            raise PKIError(f"{ca}: no CA key given; pass -ca-key with the key of {ca.name}")
        if not ca_key.exists():
            raise PKIError(f"{ca_key}: CA key not found; pass the key of {ca.name} with -ca-key")
        ca_cert, key = pki.load_cert(ca), pki.load_key(ca_key)
        if not pki.key_matches(ca_cert, key):
            raise PKIError(
                f"{ca_key}: does not match the CA certificate {ca}; pass the key made with it"
            )
        if not pki.inspect_cert(ca_cert).is_ca:
            raise PKIError(f"{ca}: not a CA certificate (no CA:TRUE); pass the CA's ca.pem")
        if config is not None:
            signing = cfssl.parse_config(_read(config, "config file", "-config"), str(config))
        else:
            signing = cfssl.parse_config('{"signing": {}}', "<cfssl default policy>")
        chosen = signing.profile(profile)
        hosts = _parse_hostnames(hostname) if hostname is not None else None
        issued = cfssl.sign(request, chosen, ca_cert, key, hosts)
        files = cfssl.BareFiles.of(out_dir, bare or profile or csr_file.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(files.key, issued.key_pem, PRIVATE_FILE)
    atomic_write(files.cert, issued.cert_pem, PUBLIC_FILE)
    atomic_write(files.csr, issued.csr_pem, PUBLIC_FILE)
    info = pki.inspect_cert(issued.cert)
    return GencertResult(files, info.subject, info.sans, info.serial, info.not_after)
