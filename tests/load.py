"""A bounded background write load, shared by the renewal and CA-rotation tests.

Local and host clusters are loaded the same way: puts through the JSON gateway with the admin
certificate, so "0 lost writes" means the same thing in every test that claims it.
"""

from __future__ import annotations

import base64
import itertools
import ssl
import threading
import time
from pathlib import Path

import httpx

MAX_REQUESTS = 20_000
MAX_SECONDS = 900.0
SERVING_WAIT = 30.0  # a member still starting when the acknowledged writes are read back


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


def put(client: httpx.Client, endpoint: str, key: str, value: str) -> None:
    body = {
        "key": base64.b64encode(key.encode()).decode(),
        "value": base64.b64encode(value.encode()).decode(),
    }
    response = client.post(f"{endpoint}/v3/kv/put", json=body)
    if response.status_code != 200 or "error" in response.json():
        raise RuntimeError(f"{endpoint}: {response.status_code} {response.text}")


class WriteLoad:
    """Writes `prefix/NNNNNN` keys in a thread until stopped (bounded in count and time).

    `fresh_connections`: a new TLS handshake for every request, so renewed certificates are
    exercised at once. `reload`: on a failure, re-read the TLS files and retry the same key on
    the next endpoint, as a well-behaved client does while its CA bundle is rotated; without it a
    failed key is recorded and skipped.
    """

    def __init__(
        self,
        endpoints: list[str],
        admin_files: tuple[Path, Path, Path],
        prefix: str,
        *,
        fresh_connections: bool = False,
        reload: bool = False,
    ) -> None:
        self.endpoints, self.admin_files, self.prefix = endpoints, admin_files, prefix
        self.fresh_connections, self.reload = fresh_connections, reload
        self.acked: list[str] = []
        self.ack_times: list[float] = []  # time.monotonic() of each acknowledgement
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WriteLoad:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _client(self) -> httpx.Client:
        return httpx.Client(verify=tls_context(*self.admin_files), timeout=5.0)

    def _run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        context = tls_context(*self.admin_files)
        client = self._client()
        index = attempt = 0
        while not self.stop.is_set() and index < MAX_REQUESTS and time.monotonic() < deadline:
            key = f"{self.prefix}/{index:06d}"
            endpoint = self.endpoints[(index + attempt) % len(self.endpoints)]
            try:
                if self.fresh_connections:
                    with httpx.Client(verify=context, timeout=5.0) as once:
                        put(once, endpoint, key, "v")
                else:
                    put(client, endpoint, key, "v")
            except Exception as exc:
                self.failures.append(f"{key} via {endpoint}: {exc.__class__.__name__}: {exc}")
                if not self.reload:
                    index += 1
                    continue
                attempt += 1
                client.close()
                client = self._client()
                time.sleep(0.05)
                continue
            self.acked.append(key)
            self.ack_times.append(time.monotonic())
            index += 1
        client.close()

    def longest_stall(self, start: float | None = None, end: float | None = None) -> float:
        """The longest gap between two acknowledged writes (within [start, end] if given)."""
        times = [t for t in self.ack_times if (start is None or t >= start)]
        times = [t for t in times if end is None or t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    def missing(self, endpoints: list[str]) -> dict[str, int]:
        """Per member, how many acknowledged keys it does not hold (read from that member alone,
        serializable), so a write acknowledged but lost on any member is counted."""
        wanted = set(self.acked)
        counts = {}
        with self._client() as client:
            for endpoint in endpoints:
                counts[endpoint] = len(wanted - self._read_when_serving(client, endpoint))
        return counts

    def _read_when_serving(self, client: httpx.Client, endpoint: str) -> set[str]:
        """The keys on one member, waiting (bounded) while it is not serving yet: a member
        replaying its log after a restart holds its port open but answers no handshake."""
        deadline = time.monotonic() + SERVING_WAIT
        while True:
            try:
                return read_keys(client, endpoint, self.prefix)
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def read_keys(client: httpx.Client, endpoint: str, prefix: str) -> set[str]:
    """Every key under `prefix/` on one member (paged, bounded)."""
    start = f"{prefix}/".encode()
    end = f"{prefix}0".encode()  # "/" + 1
    keys: set[str] = set()
    for _ in range(MAX_REQUESTS // 1000 + 2):
        body = {
            "key": base64.b64encode(start).decode(),
            "range_end": base64.b64encode(end).decode(),
            "keys_only": True,
            "serializable": True,
            "limit": 1000,
        }
        response = client.post(f"{endpoint}/v3/kv/range", json=body)
        response.raise_for_status()
        payload = response.json()
        batch = [base64.b64decode(kv["key"]) for kv in payload.get("kvs", [])]
        keys.update(k.decode() for k in batch)
        if not payload.get("more") or not batch:
            break
        start = batch[-1] + b"\0"
    return keys
