"""Snapshots with etcd's own tools, and content fingerprints that prove two clusters agree.

`etcdctl snapshot save` streams a consistent copy of one member's database; `etcdutl` (3.5+) or
`etcdctl` (3.4) verifies and restores it. The tools are the ones next to the cluster's etcd
binary, each probed before use (a `PATH` entry may be a broken wrapper), and restore options
are read from the tool's own `--help` rather than assumed from its version.

A fingerprint is the key count and a SHA-256 over every key and value under a prefix, read page
by page at one pinned revision, so it can be compared across clusters and revisions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path, PurePath

from etcdforge.binaries import EtcdBinary, Version, parse_version
from etcdforge.client import EtcdClient, prefix_end
from etcdforge.errors import EtcdforgeError
from etcdforge.fsutil import PRIVATE_FILE
from etcdforge.lock import RESERVED_PREFIX
from etcdforge.services.local import command_line
from etcdforge.tls import TLSFiles

TOOL_TIMEOUT = 600.0
LEFTOVER_TIMEOUT = 5.0
PAGE_SIZE = 1000
#: What the Kubernetes docs suggest for a restore under a live control plane: far beyond any
#: revision a watcher has seen, and everything older marked compacted so watches restart.
DEFAULT_BUMP = 1_000_000_000


class SnapshotError(EtcdforgeError):
    """Saving, verifying or restoring a snapshot failed."""


@dataclass(frozen=True)
class SnapshotTools:
    """The admin machine's etcdctl/etcdutl of the cluster's own version (formats change)."""

    etcdctl: Path
    etcdutl: Path | None
    version: Version

    @property
    def restorer(self) -> Path:
        """etcdutl where it exists (3.5+); 3.4 restores with etcdctl."""
        return self.etcdutl or self.etcdctl


@dataclass(frozen=True)
class SnapshotInfo:
    """`snapshot status`: how a verified snapshot file is identified and how big it is."""

    hash: int
    revision: int
    total_keys: int
    total_size: int  # bytes


@dataclass(frozen=True)
class RestoreFeatures:
    """What a restore tool's `--help` offers: revision bump and compaction (3.5.10+/3.4.27+)."""

    bump_revision: bool
    mark_compacted: bool

    @property
    def can_bump(self) -> bool:
        return self.bump_revision and self.mark_compacted


@dataclass(frozen=True)
class Fingerprint:
    """Key count and a sha256 over every key and value under a prefix, at one revision."""

    count: int
    sha256: str
    revision: int

    def same_content(self, other: Fingerprint) -> bool:
        return self.count == other.count and self.sha256 == other.sha256


def _env() -> dict[str, str]:
    """A user's exported ETCDCTL_* (from `etcdforge env`) must not override our flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    return env


def _run(argv: list[str], what: str, timeout: float = TOOL_TIMEOUT) -> str:
    # Its own session: Ctrl-C stops the command between steps (etcdforge.interrupt), so the
    # terminal's SIGINT must not kill the tool in the middle of a snapshot or a restore.
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_env(),
            check=False,
            start_new_session=True,
        )
    except OSError as exc:
        raise SnapshotError(f"{argv[0]}: cannot run it for {what} ({exc.strerror})") from None
    except subprocess.TimeoutExpired:
        raise SnapshotError(f"{argv[0]}: {what} did not finish in {timeout:.0f} s") from None
    if result.returncode != 0:
        raise SnapshotError(f"{what} failed: {last_error(result.stderr or result.stdout)}")
    return result.stdout


def last_error(output: str) -> str:
    """etcd tools log JSON lines and then print `Error: ...`; keep the one line that matters."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("Error:"):
            return line.removeprefix("Error:").strip()
    for line in lines:  # a Go panic: its first line says why, the stack trace after it does not
        if line.startswith("panic:"):
            return line
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
                return ": ".join(str(entry[k]) for k in ("msg", "error") if entry.get(k))
    return lines[-1] if lines else "no output"


def _tool_version(path: Path) -> Version | None:
    try:
        result = subprocess.run(
            [str(path), "version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"(?:etcdctl|etcdutl) version:\s*(\d+\.\d+\.\d+)", result.stdout)
    return parse_version(match.group(1)) if result.returncode == 0 and match else None


def _candidates(binary: EtcdBinary, name: str) -> list[Path]:
    sibling = binary.path.with_name(name)
    found = binary.etcdctl if name == "etcdctl" else binary.etcdutl
    return list(dict.fromkeys(p for p in (sibling, found) if p is not None and p.is_file()))


def find_tools(binary: EtcdBinary) -> SnapshotTools:
    """etcdctl (and etcdutl when there is one) that actually run, preferring the binary's own."""
    etcdctl = next((p for p in _candidates(binary, "etcdctl") if _tool_version(p)), None)
    if etcdctl is None:
        raise SnapshotError(
            f"no working etcdctl next to {binary.path} or on PATH; install the etcd client tools "
            "of the cluster's version"
        )
    etcdutl = None
    for path in _candidates(binary, "etcdutl"):
        version = _tool_version(path)
        if version is not None and version[:2] == binary.version[:2]:
            etcdutl = path
            break
    return SnapshotTools(etcdctl=etcdctl, etcdutl=etcdutl, version=binary.version)


def restore_features(tools: SnapshotTools) -> RestoreFeatures:
    """Read the restore command's own help: the options were backported to 3.5.10 / 3.4.27."""
    argv = [str(tools.restorer), "snapshot", "restore", "--help"]
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=20, env=_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return RestoreFeatures(False, False)
    return features_from_help(result.stdout + result.stderr)


def features_from_help(text: str) -> RestoreFeatures:
    """What a `snapshot restore --help` output offers; shared by local and remote tools."""
    return RestoreFeatures("--bump-revision" in text, "--mark-compacted" in text)


def streaming_path(dest: Path) -> Path:
    """Where the bytes of a `save` into `dest` arrive while they stream: `save`'s `.part`, in
    which etcdctl writes its own `.part` first (renamed twice once complete, the same file)."""
    return dest.with_name(dest.name + ".part.part")


def stop_leftover_tools(path: Path) -> None:
    """SIGKILL any etcdctl/etcdutl still writing `path`: a command killed while one ran leaves
    it running on (its own session, see `_run`), and two must never write the same file."""
    found = [pid for pid in _pids() if _tool_on(pid, str(path))]
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + LEFTOVER_TIMEOUT
    while any(_tool_on(pid, str(path)) for pid in found) and time.monotonic() < deadline:
        time.sleep(0.05)


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _tool_on(pid: int, path: str) -> bool:
    argv = command_line(pid)
    is_tool = bool(argv) and Path(argv[0]).name in ("etcdctl", "etcdutl")
    return is_tool and pid != os.getpid() and any(path in arg for arg in argv[1:])


def save(tools: SnapshotTools, endpoint: str, tls: TLSFiles, dest: Path) -> Path:
    """Stream one member's database to `dest` (0600); a partial file never takes its name."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    stop_leftover_tools(part)
    part.unlink(missing_ok=True)
    argv = [
        str(tools.etcdctl),
        f"--endpoints={endpoint}",
        f"--cacert={tls.ca}",
        f"--cert={tls.cert}",
        f"--key={tls.key}",
        "--command-timeout=300s",
        "snapshot",
        "save",
        str(part),
    ]
    try:
        _run(argv, f"snapshot of {endpoint}")
        os.chmod(part, PRIVATE_FILE)
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    return dest


def status(tools: SnapshotTools, path: Path) -> SnapshotInfo:
    """Verify a snapshot file (etcd checks its integrity hash) and read its revision."""
    if not path.is_file() or path.stat().st_size == 0:
        raise SnapshotError(f"{path}: snapshot file is missing or empty")
    out = _run([str(tools.restorer), "snapshot", "status", str(path), "-w", "json"], "verify")
    try:
        payload = json.loads(out.strip().splitlines()[-1])
        return SnapshotInfo(
            hash=int(payload["hash"]),
            revision=int(payload["revision"]),
            total_keys=int(payload["totalKey"]),
            total_size=int(payload["totalSize"]),
        )
    except (ValueError, KeyError, IndexError):
        raise SnapshotError(f"{path}: `snapshot status` printed no readable status") from None


@dataclass(frozen=True)
class KVHash:
    """One member's hash of its keyspace up to a revision, and where its history starts."""

    endpoint: str
    hash: int
    compact_revision: int


def hash_kv(
    tools: SnapshotTools, endpoints: list[str], tls: TLSFiles, revision: int
) -> list[KVHash]:
    """`etcdctl endpoint hashkv --rev`: every member hashes the same revision of its keyspace.

    (The JSON gateway's /v3/maintenance/hash is the whole-backend Hash, revision ignored, so it
    cannot be compared across members that are busy applying writes.)
    """
    argv = [
        str(tools.etcdctl),
        f"--endpoints={','.join(endpoints)}",
        f"--cacert={tls.ca}",
        f"--cert={tls.cert}",
        f"--key={tls.key}",
        "--command-timeout=30s",
        "endpoint",
        "hashkv",
        f"--rev={revision}",
        "-w",
        "json",
    ]
    out = _run(argv, f"hashkv at revision {revision}", timeout=120)
    try:
        return [
            KVHash(
                endpoint=str(entry["Endpoint"]),
                hash=int(entry["HashKV"]["hash"]),
                compact_revision=int(entry["HashKV"].get("compact_revision", 0)),
            )
            for entry in json.loads(out)
        ]
    except (ValueError, KeyError, TypeError):
        raise SnapshotError(f"hashkv at revision {revision}: unreadable output") from None


@dataclass(frozen=True)
class RestoredMember:
    """Who a restored data dir belongs to: every member of one restore shares the cluster and
    token, so they agree on one new cluster ID."""

    name: str
    initial_cluster: str
    token: str
    peer_url: str


def restore(
    tools: SnapshotTools,
    snapshot: Path,
    data_dir: Path,
    member: RestoredMember,
    bump_revision: int = 0,
    skip_hash_check: bool = False,
) -> None:
    """Restore one member's data dir (which must not exist yet) from `snapshot`."""
    stop_leftover_tools(data_dir)
    if data_dir.exists():
        raise SnapshotError(f"{data_dir}: already exists; a restore needs a fresh data dir")
    argv = restore_argv(
        str(tools.restorer), snapshot, data_dir, member, bump_revision, skip_hash_check
    )
    _run(argv, f"restore of {member.name}")


def restore_argv(
    restorer: str,
    snapshot: PurePath,
    data_dir: PurePath,
    member: RestoredMember,
    bump_revision: int = 0,
    skip_hash_check: bool = False,
) -> list[str]:
    """The restore command line, for this machine or a host (paths are the tool's side).

    `skip_hash_check`: the file is a member's `member/snap/db` copied from its data dir, which
    has no integrity hash appended (a `snapshot save` file has one).
    """
    argv = [
        restorer,
        "snapshot",
        "restore",
        str(snapshot),
        f"--data-dir={data_dir}",
        f"--name={member.name}",
        f"--initial-cluster={member.initial_cluster}",
        f"--initial-cluster-token={member.token}",
        f"--initial-advertise-peer-urls={member.peer_url}",
    ]
    if bump_revision:
        argv += [f"--bump-revision={bump_revision}", "--mark-compacted"]
    if skip_hash_check:
        argv.append("--skip-hash-check")
    return argv


async def fingerprint(
    client: EtcdClient,
    prefix: bytes,
    endpoint: str | None = None,
    revision: int = 0,
    page_size: int = PAGE_SIZE,
) -> Fingerprint:
    """Count and hash every key/value under `prefix` at one revision (0: the current one)."""
    digest = hashlib.sha256()
    count = 0
    key, end = prefix, prefix_end(prefix)
    pinned = revision
    # Bounded: each page advances past its last key; a keyspace this large would be absurd.
    for _ in range(10_000_000 // page_size + 1):
        page = await client.range(key, end, limit=page_size, revision=pinned, endpoint=endpoint)
        pinned = pinned or page.revision
        for k, v in page.kvs:
            digest.update(len(k).to_bytes(8, "big") + k + len(v).to_bytes(8, "big") + v)
        count += len(page.kvs)
        if not page.more or not page.kvs:
            return Fingerprint(count=count, sha256=digest.hexdigest(), revision=pinned)
        key = page.kvs[-1][0] + b"\0"
    raise SnapshotError(f"more than 10 million keys under {prefix!r}; refusing to fingerprint")


async def count_keys(client: EtcdClient, endpoint: str | None = None) -> int:
    """Every key in the keyspace (not just /registry/) but etcdforge's own: is it empty?

    The lock key of the command that asks is there while it runs; both counts are read at one
    revision so they subtract exactly.
    """
    every = await client.range(b"\0", b"\0", count_only=True, endpoint=endpoint)
    ours = await client.range(
        RESERVED_PREFIX,
        prefix_end(RESERVED_PREFIX),
        count_only=True,
        revision=every.revision,
        endpoint=endpoint,
    )
    return every.count - ours.count
