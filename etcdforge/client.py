"""The etcd v3 API over its JSON gateway (grpc-gateway) with mutual TLS, via httpx.

The gateway speaks JSON on the client port: 64-bit integers arrive as decimal strings, fields
with zero values are omitted and keys/values are base64. Queries to several members run
concurrently so that a status of 7 members costs about as much as one.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import types
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

# httpx's optional command-line entry point pulls in rich, pygments and click at import time
# (half of httpx's import cost); we never use it, so an empty stand-in keeps `status` quick.
sys.modules.setdefault("httpx._main", types.ModuleType("httpx._main"))
import httpx  # noqa: E402

from etcdforge.errors import EtcdClientError  # noqa: E402
from etcdforge.tls import TLSFiles  # noqa: E402

T = TypeVar("T")
DEFAULT_TIMEOUT = 5.0
GRPC_NOT_FOUND = 5  # the gateway's `code` for e.g. "etcdserver: requested lease not found"
GRPC_FAILED_PRECONDITION = 9  # e.g. "etcdserver: authentication is not enabled"
#: A user name no cluster has: authenticating as it only tells whether auth is enabled.
AUTH_PROBE_USER = "etcdforge-auth-probe"


class EtcdReplyError(EtcdClientError):
    """A member answered, with an error: `code` is the gRPC status code when it gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EndpointStatus:
    endpoint: str
    member_id: str | None = None
    version: str | None = None
    db_size: int | None = None
    leader: str | None = None
    raft_term: int | None = None
    raft_index: int | None = None
    is_learner: bool = False
    healthy: bool = False
    errors: tuple[str, ...] = ()
    error: str | None = None
    db_size_in_use: int | None = None  # 3.4+: dbSize minus the free pages defrag would drop
    revision: int | None = None  # the member's current store revision (response header)
    cluster_id: str | None = None
    db_size_quota: int | None = None  # 3.6+ reports its quota; older releases do not
    raft_applied_index: int | None = None

    @property
    def is_leader(self) -> bool:
        return self.member_id is not None and self.member_id == self.leader


@dataclass(frozen=True)
class Alarm:
    member_id: str
    alarm: str  # "NOSPACE", "CORRUPT"


@dataclass(frozen=True)
class HashKV:
    """A member's HashKV: equal hashes at one revision (same compaction) mean equal data."""

    hash: int
    compact_revision: int
    revision: int


def _optional_int(value: object) -> int | None:
    return int(str(value)) if value is not None else None


@dataclass(frozen=True)
class Member:
    id: str
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    is_learner: bool = False


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def describe_error(endpoint: str, exc: BaseException) -> str:
    """One short line for a failed request, naming the endpoint."""
    if isinstance(exc, httpx.ConnectError):
        cause = str(exc) or "connection refused"
        if "CERTIFICATE_VERIFY_FAILED" in cause:
            cause = "server certificate not trusted by the cluster CA"
        elif "refused" in cause.lower() or "Errno 111" in cause:
            cause = "connection refused"
        return f"{endpoint}: {cause}"
    if isinstance(exc, httpx.TimeoutException):
        return f"{endpoint}: timed out"
    if isinstance(exc, httpx.HTTPError):
        return f"{endpoint}: {exc.__class__.__name__}: {exc}"
    return f"{endpoint}: {exc}"


class EtcdClient:
    """A small async client; use `async with` or call `aclose()`."""

    def __init__(
        self,
        endpoints: Sequence[str],
        tls: TLSFiles | None,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """`transport` replaces the TLS connection (and `tls`): requests relayed from another
        host with that host's files, as `kubeadm certs --check` does from control planes."""
        if not endpoints:
            raise EtcdClientError("no etcd endpoints given")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        if transport is not None:
            self._http = httpx.AsyncClient(transport=transport, timeout=timeout)
        elif tls is not None:
            self._http = httpx.AsyncClient(verify=tls.context(), timeout=timeout)
        else:
            raise EtcdClientError("internal: an etcd client needs TLS files or a transport")

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self,
        endpoint: str,
        path: str,
        body: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """POST one request; `timeout` overrides the client's for slow calls (defragment)."""
        wait: Any = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self._http.post(f"{endpoint}{path}", json=body or {}, timeout=wait)
        except httpx.HTTPError as exc:
            raise EtcdClientError(describe_error(endpoint, exc)) from None
        try:
            payload = response.json()
        except ValueError:
            payload = {}
        if response.status_code != 200 or "error" in payload:
            message = payload.get("message") or payload.get("error") or response.text.strip()
            code = payload.get("code")
            raise EtcdReplyError(
                f"{endpoint}{path}: {message or response.status_code}",
                code if isinstance(code, int) else None,
            )
        return payload

    async def first_ok(self, request: Callable[[str], Awaitable[T]]) -> T:
        """Try each endpoint in turn; the first answer wins (a dead member is not fatal)."""
        errors = []
        for endpoint in self.endpoints:
            try:
                return await request(endpoint)
            except EtcdClientError as exc:
                errors.append(str(exc))
        raise EtcdClientError("no endpoint answered: " + "; ".join(errors))

    # --- maintenance ------------------------------------------------------------------------

    async def health(self, endpoint: str, timeout: float | None = None) -> tuple[bool, str | None]:
        wait: Any = timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT
        try:
            response = await self._http.get(f"{endpoint}/health", timeout=wait)
        except httpx.HTTPError as exc:
            return False, describe_error(endpoint, exc)
        try:
            payload = response.json()
        except ValueError:
            return False, f"{endpoint}/health: not JSON ({response.status_code})"
        if str(payload.get("health")) == "true":
            return True, None
        reason = payload.get("reason") or "unhealthy"
        return False, f"{endpoint}: {reason}"

    async def status(self, endpoint: str, timeout: float | None = None) -> EndpointStatus:
        """Status and health of one member; failures are reported in the result, not raised.
        `timeout` replaces the client's for each of the two requests (a busy member)."""
        # One after the other on the same connection: one TLS handshake per member, not two.
        try:
            payload = await self.call(endpoint, "/v3/maintenance/status", timeout=timeout)
        except EtcdClientError as exc:
            return EndpointStatus(endpoint=endpoint, error=str(exc))
        healthy, health_error = await self.health(endpoint, timeout)
        header = payload.get("header", {})
        errors = tuple(payload.get("errors", []))
        return EndpointStatus(
            endpoint=endpoint,
            member_id=header.get("member_id"),
            version=payload.get("version"),
            db_size=int(payload.get("dbSize", 0)),
            leader=payload.get("leader"),
            raft_term=int(payload.get("raftTerm", 0)),
            raft_index=int(payload.get("raftIndex", 0)),
            is_learner=bool(payload.get("isLearner", False)),
            healthy=healthy and not errors,
            errors=errors,
            error=health_error or ("; ".join(errors) if errors else None),
            cluster_id=header.get("cluster_id"),
            revision=int(header.get("revision", 0)),
            db_size_in_use=_optional_int(payload.get("dbSizeInUse")),
            db_size_quota=_optional_int(payload.get("dbSizeQuota")),
            raft_applied_index=_optional_int(payload.get("raftAppliedIndex")),
        )

    async def statuses(self) -> list[EndpointStatus]:
        return list(await asyncio.gather(*(self.status(e) for e in self.endpoints)))

    async def alarms(self) -> list[Alarm]:
        """The cluster's active alarms (NOSPACE, CORRUPT), raised by any member."""
        body = {"action": "GET"}
        payload = await self.first_ok(lambda e: self.call(e, "/v3/maintenance/alarm", body))
        return [
            Alarm(member_id=str(a.get("memberID", "0")), alarm=str(a.get("alarm", "NONE")))
            for a in payload.get("alarms", [])
        ]

    async def hash_kv(
        self, endpoint: str, revision: int, timeout: float | None = None
    ) -> HashKV | None:
        """One member's hash of its MVCC keys up to `revision`; None where the gateway has no
        HashKV path: it serves /v3/maintenance/hashkv from etcd 3.5.10 on (etcd #16490; measured:
        3.4.23 and 3.5.1 answer 404)."""
        body = {"revision": str(revision)}
        try:
            payload = await self.call(endpoint, "/v3/maintenance/hashkv", body, timeout=timeout)
        except EtcdReplyError as exc:
            if "Not Found" in str(exc) or str(exc).endswith(": 404"):
                return None
            raise
        return HashKV(
            hash=int(payload.get("hash", 0)),
            compact_revision=int(payload.get("compact_revision", 0)),
            revision=revision,
        )

    async def versions(self, endpoint: str) -> tuple[str, str]:
        """`/version`: the member's own etcd version and the cluster version it agreed on.

        Plain HTTP on the client port, outside the gRPC gateway: it answers even where etcd
        auth turns the gateway's requests away.
        """
        try:
            response = await self._http.get(f"{endpoint}/version")
            payload = response.json()
            return str(payload["etcdserver"]), str(payload["etcdcluster"])
        except httpx.HTTPError as exc:
            raise EtcdClientError(describe_error(endpoint, exc)) from None
        except (ValueError, KeyError, TypeError):
            raise EtcdClientError(f"{endpoint}/version: not an etcd version answer") from None

    async def auth_enabled(self, endpoint: str) -> bool:
        """Whether etcd auth is on: an authentication attempt as a user no cluster has, which
        only an auth-disabled cluster refuses with FailedPrecondition ("authentication is not
        enabled"); the password check fails before anything reaches raft.

        Never `/v3/auth/status`: a 3.5 member puts AuthStatus through raft, and every 3.4
        member of a mixed cluster panics applying it ("not implemented"; measured here).
        """
        probe = {"name": AUTH_PROBE_USER, "password": ""}
        try:
            await self.call(endpoint, "/v3/auth/authenticate", probe)
        except EtcdReplyError as exc:
            return exc.code != GRPC_FAILED_PRECONDITION
        return True

    async def defragment(self, endpoint: str, timeout: float) -> None:
        """Rewrite one member's database without its free pages; the member blocks meanwhile."""
        await self.call(endpoint, "/v3/maintenance/defragment", timeout=timeout)

    async def disarm(self, alarm: Alarm) -> None:
        body = {"action": "DEACTIVATE", "memberID": alarm.member_id, "alarm": alarm.alarm}
        await self.first_ok(lambda e: self.call(e, "/v3/maintenance/alarm", body))

    async def compact(self, revision: int, timeout: float) -> None:
        """Drop history before `revision`; `physical`: return once it is removed from disk."""
        body = {"revision": str(revision), "physical": True}
        await self.first_ok(lambda e: self.call(e, "/v3/kv/compaction", body, timeout=timeout))

    # --- cluster ----------------------------------------------------------------------------

    async def member_list(self) -> list[Member]:
        payload = await self.first_ok(lambda e: self.call(e, "/v3/cluster/member/list"))
        return [
            Member(
                id=m["ID"],
                name=m.get("name", ""),
                peer_urls=tuple(m.get("peerURLs", [])),
                client_urls=tuple(m.get("clientURLs", [])),
                is_learner=bool(m.get("isLearner", False)),
            )
            for m in payload.get("members", [])
        ]

    # --- kv ---------------------------------------------------------------------------------

    async def put(self, key: str | bytes, value: str | bytes, endpoint: str | None = None) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if endpoint is not None:
            payload = await self.call(endpoint, "/v3/kv/put", body)
        else:
            payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/put", body))
        return int(payload.get("header", {}).get("revision", 0))

    async def get(self, key: str | bytes, endpoint: str | None = None) -> bytes | None:
        body = {"key": _b64(key)}
        if endpoint is not None:
            payload = await self.call(endpoint, "/v3/kv/range", body)
        else:
            payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/range", body))
        kvs = payload.get("kvs", [])
        return _unb64(kvs[0].get("value", "")) if kvs else None

    async def range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        revision: int = 0,
        count_only: bool = False,
        endpoint: str | None = None,
    ) -> RangePage:
        """One page of [key, range_end) in key order, optionally pinned to a past revision."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if count_only:
            body["count_only"] = True
        if endpoint is not None:
            payload = await self.call(endpoint, "/v3/kv/range", body)
        else:
            payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/range", body))
        return RangePage(
            kvs=tuple(
                (_unb64(kv.get("key", "")), _unb64(kv.get("value", "")))
                for kv in payload.get("kvs", [])
            ),
            more=bool(payload.get("more", False)),
            count=int(payload.get("count", 0)),
            revision=int(payload.get("header", {}).get("revision", 0)),
        )

    async def delete(self, key: str | bytes, endpoint: str | None = None) -> int:
        """Delete one key; returns how many keys were deleted (0 or 1)."""
        body = {"key": _b64(key)}
        if endpoint is not None:
            payload = await self.call(endpoint, "/v3/kv/deleterange", body)
        else:
            payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/deleterange", body))
        return int(payload.get("deleted", 0))

    async def get_entry(self, key: str | bytes) -> KeyValue | None:
        """One key with its revisions and lease, from the first member that answers."""
        payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/range", {"key": _b64(key)}))
        kvs = payload.get("kvs", [])
        return _key_value(kvs[0]) if kvs else None

    async def put_if_unchanged(
        self, key: str | bytes, value: str | bytes, lease: int, mod_revision: int
    ) -> tuple[bool, KeyValue | None]:
        """Put `key` with `lease` only if its mod_revision is still `mod_revision` (0: absent).

        One transaction, so two writers can never both succeed; a missing key compares as
        revision 0, which is etcd's create-if-absent idiom. Returns (succeeded, entry now there).
        """
        body = {
            "compare": [
                {
                    "key": _b64(key),
                    "target": "MOD",
                    "mod_revision": str(mod_revision),
                    "result": "EQUAL",
                }
            ],
            "success": [
                {"request_put": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}
            ],
            "failure": [{"request_range": {"key": _b64(key)}}],
        }
        payload = await self.first_ok(lambda e: self.call(e, "/v3/kv/txn", body))
        if payload.get("succeeded"):
            return True, None
        responses = payload.get("responses", [])
        kvs = responses[0].get("response_range", {}).get("kvs", []) if responses else []
        return False, _key_value(kvs[0]) if kvs else None

    # --- leases -----------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; keys attached to it vanish when it expires."""
        body = {"TTL": str(ttl)}
        payload = await self.first_ok(lambda e: self.call(e, "/v3/lease/grant", body))
        return int(payload["ID"])

    async def lease_keepalive(self, lease: int) -> int:
        """Renew a lease once; returns its new TTL, 0 when the lease no longer exists.

        The gateway streams one `{"result": ...}` line per request; we send exactly one.
        """
        body = {"ID": str(lease)}
        payload = await self.first_ok(lambda e: self.call(e, "/v3/lease/keepalive", body))
        return int(payload.get("result", {}).get("TTL", 0))

    async def lease_revoke(self, lease: int) -> bool:
        """Revoke a lease and delete its keys; False if it had already expired or was revoked."""
        body = {"ID": str(lease)}

        async def revoke(endpoint: str) -> bool:
            try:
                await self.call(endpoint, "/v3/lease/revoke", body)
            except EtcdReplyError as exc:
                if exc.code == GRPC_NOT_FOUND:
                    return False
                raise
            return True

        return await self.first_ok(revoke)


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    mod_revision: int
    lease: int


def _key_value(kv: dict[str, Any]) -> KeyValue:
    return KeyValue(
        key=_unb64(kv.get("key", "")),
        value=_unb64(kv.get("value", "")),
        mod_revision=int(kv.get("mod_revision", 0)),
        lease=int(kv.get("lease", 0)),
    )


@dataclass(frozen=True)
class RangePage:
    kvs: tuple[tuple[bytes, bytes], ...]
    more: bool
    count: int
    revision: int


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that selects every key starting with `prefix` (etcd's convention)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # an empty or all-0xff prefix: every key from `prefix` on


def run(coro: Awaitable[T]) -> T:
    """Run one client coroutine from synchronous code."""

    async def _main() -> T:
        return await coro

    return asyncio.run(_main())
