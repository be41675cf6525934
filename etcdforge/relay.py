"""An httpx transport whose requests leave from another host, with that host's certificate files.

A check that runs from the admin machine proves only the admin machine's view. Relaying each
request through `openssl s_client` on a control-plane host (over its `Host`, SSH) proves what the
kube-apiserver there will see: its network path, its installed CA, certificate and key. The
etcd client (etcdforge.client) takes this as its transport and stays unaware of the relay.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

import httpx

from etcdforge.errors import HostError
from etcdforge.hosts import CommandResult, Host, last_line
from etcdforge.names import is_ip

# Seconds one relayed request may take on the host (connect, handshake, answer).
RELAY_TIMEOUT = 10


class RelayTransport(httpx.AsyncBaseTransport):
    """httpx requests sent from another host: `openssl s_client` there, with that host's files.

    openssl is in every mainstream distribution's base system (Debian's ca-certificates depends
    on it), so nothing is uploaded. Each request is one HTTP/1.0 exchange on the same TLS port
    and certificate checks the apiserver's gRPC client uses: the server's certificate against
    the installed CA *and* the endpoint's IP or name (-verify_ip / -verify_hostname), the client
    certificate presented to etcd (mutual TLS).
    """

    def __init__(self, host: Host, ca: PurePosixPath, cert: PurePosixPath, key: PurePosixPath):
        self.host = host
        self.files = (ca, cert, key)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        body = await request.aread()
        head = (
            f"{request.method} {url.raw_path.decode()} HTTP/1.0\r\n"
            f"Host: {url.netloc.decode()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        argv = s_client_argv(url.host, url.port or 443, self.files)
        try:
            result = await self.host.run(
                argv, input=head.encode() + body, check=False, timeout=RELAY_TIMEOUT + 10
            )
        except HostError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        return _response(result, request)


def s_client_argv(
    name: str, port: int, files: tuple[PurePosixPath, PurePosixPath, PurePosixPath]
) -> list[str]:
    """`openssl s_client` checking the server as a gRPC client would, under a hard timeout."""
    verify = ["-verify_ip", name] if is_ip(name) else ["-verify_hostname", name]
    if not is_ip(name):
        verify += ["-servername", name]
    ca, cert, key = (str(f) for f in files)
    return [
        "timeout", "-k", "2", str(RELAY_TIMEOUT),
        "openssl", "s_client", "-quiet", "-verify_return_error",
        "-connect", f"[{name}]:{port}" if ":" in name else f"{name}:{port}",
        "-CAfile", ca, "-cert", cert, "-key", key, *verify,
    ]  # fmt: skip


def _response(result: CommandResult, request: httpx.Request) -> httpx.Response:
    """The HTTP/1.0 answer s_client printed, or the transport error httpx callers expect."""
    if result.code == 124:
        raise httpx.ConnectTimeout("timed out", request=request)
    if not result.stdout.startswith(b"HTTP/"):
        raise httpx.ConnectError(openssl_reason(result.err), request=request)
    head_bytes, _, content = result.stdout.partition(b"\r\n\r\n")
    status = head_bytes.split(b"\r\n", 1)[0].split()
    try:
        code = int(status[1])
    except (IndexError, ValueError):
        raise httpx.RemoteProtocolError(f"bad status line {status!r}", request=request) from None
    return httpx.Response(code, content=content, request=request)


def openssl_reason(stderr: str) -> str:
    """The one cause in `openssl s_client`'s stderr (it prints chains and error stacks)."""
    for line in stderr.splitlines():
        if line.startswith("verify error:"):
            # verify error:num=64:IP address mismatch
            return f"server certificate not accepted: {line.split(':', 2)[-1]}"
    for line in stderr.splitlines():
        if "alert" in line and "error:" in line:
            # ...:ssl3_read_bytes:sslv3 alert bad certificate:../ssl/...: SSL alert number 42
            alert = re.search(r"alert ([a-z ]+)", line)
            what = alert.group(1).strip() if alert else "rejected"
            return f"client certificate rejected by etcd (TLS alert: {what})"
    for line in stderr.splitlines():
        if "Connection refused" in line:
            return "connection refused"
    errors = [m.group(1) for m in re.finditer(r"error:[0-9A-F]+:[^:]*:[^:]*:([^:]+)", stderr)]
    return errors[-1] if errors else last_line(stderr) or "no answer"
