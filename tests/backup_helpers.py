"""Helpers for the backup, restore, recovery and maintenance tests on local clusters."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx

from tests.helpers import CLIResult, LocalCluster, run_cli
from tests.load import WriteLoad, read_keys, tls_context

MIB = 1 << 20


def admin_files(cluster: LocalCluster) -> tuple[Path, Path, Path]:
    pki_dir = cluster.state_dir / "pki"
    return pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key"


def endpoints(cluster: LocalCluster) -> list[str]:
    return [f"https://{m['address']}:2379" for m in cluster.data["members"]]


def load(cluster: LocalCluster, prefix: str) -> WriteLoad:
    """A writer that retries on the next member, as the apiserver's client does."""
    return WriteLoad(endpoints(cluster), admin_files(cluster), prefix, reload=True)


def http(cluster: LocalCluster, timeout: float = 10.0) -> httpx.Client:
    return httpx.Client(verify=tls_context(*admin_files(cluster)), timeout=timeout)


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def call(cluster: LocalCluster, path: str, body: dict[str, object], endpoint: str = "") -> dict:
    with http(cluster) as client:
        response = client.post(f"{endpoint or endpoints(cluster)[0]}{path}", json=body)
        return dict(response.json())


def revision(cluster: LocalCluster, endpoint: str = "") -> int:
    status = call(cluster, "/v3/maintenance/status", {}, endpoint)
    return int(status["header"]["revision"])


def keys_at(cluster: LocalCluster, prefix: str, at: int) -> set[str]:
    """Every key under `prefix/` at revision `at` (read before any restore replaces them)."""
    start, end = f"{prefix}/".encode(), f"{prefix}0".encode()
    body = {"key": b64(start), "range_end": b64(end), "keys_only": True, "revision": str(at)}
    payload = call(cluster, "/v3/kv/range", body)
    return {base64.b64decode(kv["key"]).decode() for kv in payload.get("kvs", [])}


def keys_on_each(cluster: LocalCluster, prefix: str) -> dict[str, set[str]]:
    """Per member, read from that member alone (serializable)."""
    with http(cluster) as client:
        return {e: read_keys(client, e, prefix) for e in endpoints(cluster)}


def backup(cluster: LocalCluster, *args: str, timeout: float = 300) -> CLIResult:
    return run_cli("backup", *cluster.args, *args, timeout=timeout)


def only_json(directory: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.db.json"))]


def put_big(cluster: LocalCluster, key: str, size: int, count: int = 1) -> None:
    """`count` puts of `size` random bytes to one key: history a compaction can free."""
    value = b64(os.urandom(size))
    with http(cluster, timeout=30) as client:
        for _ in range(count):
            client.post(
                f"{endpoints(cluster)[0]}/v3/kv/put", json={"key": b64(key), "value": value}
            )


def watch_from(cluster: LocalCluster, key: str, start: int) -> dict[str, object]:
    """The first answer of a watch on `key` from revision `start` that is not its creation:
    events, or the cancellation that says the revision was compacted."""
    body = {"create_request": {"key": b64(key), "start_revision": str(start)}}
    with (
        http(cluster) as client,
        client.stream("POST", f"{endpoints(cluster)[0]}/v3/watch", json=body) as stream,
    ):
        for index, line in enumerate(stream.iter_lines()):
            result = dict(json.loads(line)["result"])
            if result.get("canceled") or result.get("events") or index >= 5:
                return result
    return {}


def pids(cluster: LocalCluster) -> dict[str, int]:
    members = cluster.state_dir / "members"
    return {p.name: int((p / "etcd.pid").read_text()) for p in sorted(members.iterdir())}


def cluster_id(cluster: LocalCluster) -> str:
    return str(call(cluster, "/v3/maintenance/status", {})["header"]["cluster_id"])
