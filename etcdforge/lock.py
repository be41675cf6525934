"""Exclusive operations: one changing command per cluster at a time.

Two locks, taken in this order and released in reverse:

1. `flock` on `<state>/lock`, for commands on one admin machine sharing a state dir. The kernel
   drops it when its process dies, even on SIGKILL, so it never needs breaking by hand. The
   holder writes who it is into the file, so a refused command can say.
2. For a deployed cluster that answers, the key `/etcdforge/lock` in the cluster itself, attached
   to a lease that a background thread renews: admin machines with copies of the state dir. A
   dead holder's key vanishes with its lease, within LEASE_TTL seconds; a holder that died from
   this very state dir is replaced at once (the file lock proves it is gone).

A cluster that does not answer (down, or being started by `up`) is changed under the file lock
alone, and the renewal thread takes the key as soon as it answers. A snapshot restore replaces
the cluster's data, key and lease included: the file lock guards the restore, and the thread takes
the key again once the restored cluster answers. Keys under RESERVED_PREFIX are etcdforge's own:
code that asks "is this cluster empty?" must not count them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from etcdforge.client import EtcdClient, run
from etcdforge.errors import EtcdClientError, EtcdforgeError
from etcdforge.fsutil import PRIVATE_FILE, ensure_dir
from etcdforge.interrupt import checkpoint
from etcdforge.record import ClusterRecord, read_record

RESERVED_PREFIX = b"/etcdforge/"
LOCK_KEY = RESERVED_PREFIX + b"lock"
LOCK_FILE = "lock"
LEASE_TTL = 12  # seconds a dead holder's key outlives it
RENEW_INTERVAL = 3.0  # four renewals per TTL: one member restarting costs at most one
REQUEST_TIMEOUT = 2.0  # per request and member
ROUND_TIMEOUT = 5.0  # one whole attempt or renewal, however many members hang
MAX_RENEWALS = int(7 * 24 * 3600 / RENEW_INTERVAL)  # a week; bounds the thread's loop
FILE_POLL = 0.1
CLUSTER_POLL = 0.5
REOPEN_ATTEMPTS = 5
MACHINE_ID = Path("/etc/machine-id")
T = TypeVar("T")


class LockHeldError(EtcdforgeError):
    """Another command holds the cluster's lock; nothing was changed."""

    def __init__(self, message: str, holder: Holder) -> None:
        super().__init__(message)
        self.holder = holder


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into the lock file and the lock key, read by whoever waits."""

    host: str
    pid: int
    command: str
    since: str
    state_dir: str
    machine: str

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Holder:
        """The recorded holder; an unreadable record (being written, or foreign) is 'unknown'."""
        try:
            fields = json.loads(data)
            return cls(**{key: fields[key] for key in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return UNKNOWN

    def describe(self) -> str:
        if self == UNKNOWN:
            return "an unknown holder"
        return f"pid {self.pid} on {self.host} (`{self.command}`, since {self.since})"

    def same_place(self, other: Holder) -> bool:
        """Same machine and state dir: then only the file lock's holder can be alive."""
        return (self.machine, self.host, self.state_dir) == (
            other.machine,
            other.host,
            other.state_dir,
        )


UNKNOWN = Holder(host="?", pid=0, command="?", since="?", state_dir="", machine="")


def command_summary(argv: list[str] | None = None) -> str:
    """`etcdforge up -f c.yaml`, as typed, cut to a length that fits one line."""
    args = sys.argv[1:] if argv is None else argv
    text = shlex.join(["etcdforge", *args])
    return text if len(text) <= 160 else text[:157] + "..."


def machine_id() -> str:
    try:
        return MACHINE_ID.read_text().strip()
    except OSError:
        return ""


def this_holder(state_dir: Path, command: str | None = None) -> Holder:
    return Holder(
        host=socket.gethostname(),
        pid=os.getpid(),
        command=command if command is not None else command_summary(),
        since=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        state_dir=str(state_dir.resolve()),
        machine=machine_id(),
    )


def file_held_message(state_dir: Path, holder: Holder, waited: float) -> str:
    after = f" after waiting {waited:.0f} s" if waited else ""
    return (
        f"{state_dir} is locked by {holder.describe()}{after}; wait for it with "
        "--wait-lock DURATION (e.g. 5m), or stop that process"
    )


def cluster_held_message(cluster: str, holder: Holder, waited: float) -> str:
    after = f" after waiting {waited:.0f} s" if waited else ""
    return (
        f"cluster {cluster} is locked by {holder.describe()} from state dir "
        f"{holder.state_dir or '?'}{after}; wait for it with --wait-lock DURATION (e.g. 5m); "
        f"a holder that died releases it within {LEASE_TTL} s"
    )


class StateDirLock:
    """`flock` on `<state>/lock`, holding this process's Holder record while locked.

    A state dir made only to hold the lock is removed again on release if the command wrote
    nothing else into it: a command refused for bad input leaves no trace.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None
        self.created = False

    def try_acquire(self, holder: Holder) -> bool:
        if not self.state_dir.is_dir():
            ensure_dir(self.state_dir)
            self.created = True
        for _ in range(REOPEN_ATTEMPTS):
            fd = self._open()
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if not self._still_linked(fd):  # `down --purge` removed it while we waited
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_json() + b"\n", 0)
            self._fd = fd
            return True
        return False

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
        except FileNotFoundError:  # the state dir was removed since: make it again
            ensure_dir(self.state_dir)
            return None

    def _still_linked(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)

    def holder(self) -> Holder:
        try:
            return Holder.from_json(self.path.read_bytes())
        except OSError:
            return UNKNOWN

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # no stale holder record once the lock is free
        if self.created and self._only_the_lock():
            with contextlib.suppress(OSError):
                self.path.unlink()  # a waiter sees it unlinked and opens the dir anew
                self.state_dir.rmdir()
        os.close(fd)  # closing drops the flock

    def _only_the_lock(self) -> bool:
        try:
            return [p.name for p in self.state_dir.iterdir()] == [LOCK_FILE]
        except OSError:
            return False


def read_holder(record: ClusterRecord) -> Holder | None:
    """Who holds the cluster lock key now, or None if nobody does (raises if no member answers)."""

    async def read() -> Holder | None:
        async with EtcdClient(record.endpoints, record.admin_tls, REQUEST_TIMEOUT) as client:
            entry = await client.get_entry(LOCK_KEY)
        return Holder.from_json(entry.value) if entry is not None else None

    return run(read())


class ClusterLock:
    """The lease-backed lock key in a live cluster, renewed by a thread until released."""

    def __init__(self, record: ClusterRecord, holder: Holder) -> None:
        self.record = record
        self.holder = holder
        self.lost: Holder | None = None  # who took the key after the cluster lost ours
        self._lease = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> Holder | None:
        """None once the key is ours, else who holds it; EtcdClientError if nobody answers."""
        return run(self._bounded(self._attempt))

    async def _bounded(self, work: Callable[[EtcdClient], Awaitable[T]]) -> T:
        # A fresh client each time: `certs rotate-ca` replaces the TLS files we connect with.
        async with EtcdClient(
            self.record.endpoints, self.record.admin_tls, REQUEST_TIMEOUT
        ) as client:
            try:
                return await asyncio.wait_for(work(client), ROUND_TIMEOUT)
            except TimeoutError:
                raise EtcdClientError(
                    f"cluster {self.record.name} did not answer within {ROUND_TIMEOUT:.0f} s"
                ) from None

    async def _attempt(self, client: EtcdClient) -> Holder | None:
        entry = await client.get_entry(LOCK_KEY)
        expected = 0
        if entry is not None:
            if self._lease and entry.lease == self._lease:
                return None
            other = Holder.from_json(entry.value)
            if not self.holder.same_place(other):
                return other
            expected = entry.mod_revision  # a dead holder from this very state dir
        lease = await client.lease_grant(LEASE_TTL)
        taken, now = await client.put_if_unchanged(LOCK_KEY, self.holder.to_json(), lease, expected)
        if taken:
            self._lease = lease
            return None
        await client.lease_revoke(lease)
        return Holder.from_json(now.value) if now is not None else UNKNOWN

    async def _renew(self, client: EtcdClient) -> None:
        if self._lease and await client.lease_keepalive(self._lease) > 0:
            return
        self._lease = 0  # expired or wiped by a restore: take the key again
        other = await self._attempt(client)
        if other is not None:
            self.lost = other

    def start_renewal(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="cluster-lock", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        for _ in range(MAX_RENEWALS):
            if self._stop.wait(RENEW_INTERVAL):
                return
            with contextlib.suppress(EtcdforgeError, OSError):  # a member restarting; retry
                run(self._bounded(self._renew))

    def release(self) -> None:
        """Stop renewing and revoke the lease, which deletes the key; a dead cluster is fine."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(ROUND_TIMEOUT + 2 * REQUEST_TIMEOUT)
        with contextlib.suppress(EtcdforgeError, OSError):
            run(self._bounded(self._give_back))

    async def _give_back(self, client: EtcdClient) -> None:
        if not self._lease:
            # Never held (the cluster was down, e.g. after `down`): a key this state dir's last
            # command could not revoke would block other machines for a TTL; take it to drop it.
            await self._attempt(client)
        lease, self._lease = self._lease, 0
        if lease:
            await client.lease_revoke(lease)


@dataclass
class Held:
    """What `hold` yields: who we are, and the cluster lock if the cluster answered."""

    holder: Holder
    cluster: ClusterLock | None

    @property
    def lost(self) -> Holder | None:
        return self.cluster.lost if self.cluster is not None else None


Notify = Callable[[str], None]


@contextlib.contextmanager
def hold(
    state_dir: Path, command: str | None = None, wait: float = 0.0, notify: Notify | None = None
) -> Iterator[Held]:
    """Hold the state dir's file lock, then the cluster's lock key if the cluster is deployed.

    Waits up to `wait` seconds for both together, polling (`notify` hears once that we wait, and
    for whom); raises LockHeldError after that, or at once without `wait`.
    """
    holder = this_holder(state_dir, command)
    deadline = time.monotonic() + wait
    files = StateDirLock(state_dir)
    waiting = _Waiting(wait, notify)
    if not _poll(lambda: files.try_acquire(holder) or waiting(files.holder()), deadline, FILE_POLL):
        other = files.holder()
        raise LockHeldError(file_held_message(state_dir, other, wait), other)
    try:
        cluster = _cluster_lock(state_dir, holder, deadline, waiting)
        try:
            yield Held(holder, cluster)
        finally:
            if cluster is not None:
                cluster.release()
    finally:
        files.release()


def _cluster_lock(
    state_dir: Path, holder: Holder, deadline: float, waiting: _Waiting
) -> ClusterLock | None:
    record = read_record(state_dir)
    if record is None:
        return None
    lock = ClusterLock(record, holder)
    other: Holder | None = None

    def attempt() -> bool:
        nonlocal other
        try:
            other = lock.try_acquire()
        except EtcdClientError:
            other = None  # not answering: the file lock guards it; the thread takes the key later
        return other is None or waiting(other)

    if not _poll(attempt, deadline, CLUSTER_POLL):
        assert other is not None
        raise LockHeldError(cluster_held_message(record.name, other, waiting.wait), other)
    lock.start_renewal()
    return lock


class _Waiting:
    """Tells `notify` once that we wait, and for whom; always False, so polling goes on."""

    def __init__(self, wait: float, notify: Notify | None) -> None:
        self.wait = wait
        self.notify = notify if wait > 0 else None

    def __call__(self, other: Holder) -> bool:
        if self.notify is not None:
            self.notify(f"waiting up to {self.wait:.0f} s for the lock held by {other.describe()}")
            self.notify = None
        return False


def _poll(attempt: Callable[[], bool], deadline: float, interval: float) -> bool:
    """Call `attempt` until it succeeds or `deadline` passes (at least once)."""
    for _ in range(int(max(deadline - time.monotonic(), 0.0) / interval) + 2):
        if attempt():
            return True
        if time.monotonic() + interval > deadline:
            return False
        checkpoint("while waiting for the lock, before any change")
        time.sleep(interval)
    return False
