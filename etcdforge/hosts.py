"""Where commands run and files land: this machine, or a host over SSH, behind one interface.

Every operation is one shell command (argv quoted with shlex, paths passed as positional
arguments, never spliced into a script), so the same code serves a local host and an SSH host, and
`sudo -n` wraps it when the login user is not root. File writes are atomic on the host: a temp
file in the target directory is given its owner and mode *before* it is renamed over the target,
so etcd never reads half a key, and a key is never readable by anyone else, even for a moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from etcdforge.errors import HostError

T = TypeVar("T")
R = TypeVar("R")
DEFAULT_TIMEOUT = 120.0

# Atomic replace, checked against the sha256 sent along.
# $1 path, $2 mode, $3 owner:group, $4 sha256; the data on stdin.
_WRITE_SCRIPT = r"""
set -eu
dst=$1 mode=$2 owner=$3 sum=$4
dir=$(dirname -- "$dst")
tmp=$(mktemp "$dir/.$(basename -- "$dst").XXXXXX")
trap 'rm -f -- "$tmp"' EXIT
trap 'exit 129' HUP INT TERM PIPE
cat > "$tmp"
got=$(sha256sum < "$tmp"); got=${got%% *}
if [ "$got" != "$sum" ]; then echo "upload corrupted (sha256 $got, expected $sum)" >&2; exit 4; fi
chown -- "$owner" "$tmp"
chmod -- "$mode" "$tmp"
sync -- "$tmp" 2>/dev/null || true
mv -f -- "$tmp" "$dst"
trap - EXIT HUP INT TERM PIPE
"""

# A regular file's state ("<sha256> <octal mode> <user>:<group>"), or, given the state wanted,
# whether it is so; exit 3 when there is no such file.
_STATE_SCRIPT = r"""
[ -f "$1" ] && [ ! -L "$1" ] || exit 3
sum=$(sha256sum < "$1") || exit 1
state=$(stat -c "${sum%% *} %a %U:%G" -- "$1") || exit 1
if [ $# -eq 1 ]; then echo "$state"; else [ "$state" = "$2" ]; fi
"""


def file_matches(path: PurePosixPath, data: bytes, mode: int, owner: str) -> list[str]:
    """A command that exits 0 when `path` holds `data` with `mode` and `owner`: the question
    `FileState.matches` answers, asked on the host so that it can join a batch (`exit_codes`)."""
    return ["sh", "-c", _STATE_SCRIPT, "sh", str(path), f"{sha256(data)} {mode:o} {owner}"]


@dataclass(frozen=True)
class CommandResult:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode(errors="replace")

    @property
    def err(self) -> str:
        return self.stderr.decode(errors="replace")


@dataclass(frozen=True)
class FileState:
    """What is on the host now, enough to decide whether a write would change anything."""

    sha256: str
    mode: int
    owner: str  # user:group

    def matches(self, data: bytes, mode: int, owner: str) -> bool:
        return (self.sha256, self.mode, self.owner) == (sha256(data), mode, owner)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Host:
    """A machine etcdforge changes. `label` names it in every error ("etcd-2 (10.0.0.12)").

    Everything but the command transport lives here: argv quoting, sudo, atomic file writes.
    Subclasses (`LocalHost`, `SSHHost`) only run the command string.
    """

    def __init__(self, label: str, sudo: bool) -> None:
        self.label = label
        self.sudo = sudo

    async def _exec(self, command: str, input: bytes | None, timeout: float) -> CommandResult:
        raise NotImplementedError

    def command_line(self, argv: Sequence[str]) -> str:
        line = shlex.join(argv)
        return f"sudo -n -- {line}" if self.sudo else line

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        check: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        try:
            result = await asyncio.wait_for(
                self._exec(self.command_line(argv), input, timeout), timeout
            )
        except TimeoutError:
            raise HostError(
                f"{self.label}: `{_short(argv)}` did not finish in {timeout:.0f} s; "
                "check the host's load and rerun"
            ) from None
        if check and result.code != 0:
            reason = last_line(result.err) or last_line(result.out) or "no output"
            raise HostError(f"{self.label}: `{_short(argv)}` failed (exit {result.code}): {reason}")
        return result

    async def exit_codes(self, commands: Sequence[Sequence[str]]) -> list[int]:
        """Several commands in one round trip, each one's exit status (their output dropped).
        Every command costs the host a session, a login's work and (with sudo) PAM: a host's
        checks asked this way cost that once."""
        script = "\n".join(
            f"({shlex.join(argv)}) </dev/null >/dev/null 2>&1; echo $?" for argv in commands
        )
        found = (await self.run(["sh", "-c", script])).out.split()
        if len(found) != len(commands) or not all(code.isdigit() for code in found):
            raise HostError(
                f"{self.label}: {len(commands)} checks gave {len(found)} answers; rerun, and "
                "check the host's shell if this repeats"
            )
        return [int(code) for code in found]

    async def read_file(self, path: PurePosixPath) -> bytes | None:
        script = '[ -f "$1" ] || exit 3; cat -- "$1"'
        result = await self.run(["sh", "-c", script, "sh", str(path)], check=False)
        if result.code == 3:
            return None
        if result.code != 0:
            raise HostError(f"{self.label}: cannot read {path}: {last_line(result.err)}")
        return result.stdout

    async def file_state(self, path: PurePosixPath) -> FileState | None:
        result = await self.run(["sh", "-c", _STATE_SCRIPT, "sh", str(path)], check=False)
        if result.code == 3:
            return None
        if result.code != 0:
            raise HostError(f"{self.label}: cannot inspect {path}: {last_line(result.err)}")
        digest, mode, owner = result.out.split()
        return FileState(digest, int(mode, 8), owner)

    async def write_file(
        self,
        path: PurePosixPath,
        data: bytes,
        mode: int,
        owner: str = "root:root",
        checked: bool = False,
    ) -> bool:
        """Atomically replace `path`; returns False (and sends nothing) if it is already so.
        `checked`: the caller has just found it differs, so it is not asked again."""
        state = None if checked else await self.file_state(path)
        if state is not None and state.matches(data, mode, owner):
            return False
        argv = ["sh", "-c", _WRITE_SCRIPT, "sh", str(path), f"{mode:o}", owner, sha256(data)]
        timeout = DEFAULT_TIMEOUT + len(data) / 1_000_000  # a slow link still gets 1 MB/s
        result = await self.run(argv, input=data, timeout=timeout, check=False)
        if result.code != 0:
            reason = last_line(result.err) or f"exit {result.code}"
            raise HostError(f"{self.label}: cannot write {path}: {reason}")
        return True

    async def close(self) -> None:
        return None


def _short(argv: Sequence[str]) -> str:
    """A command as a user would recognise it: scripts are summarised, not dumped."""
    if len(argv) >= 3 and argv[0] == "sh" and argv[1] == "-c":
        return shlex.join(["sh", "-c", "…", *argv[4:]])
    return shlex.join(argv)


class LocalHost(Host):
    """This machine, through /bin/sh: the admin machine as a host, and the unit tests' host."""

    def __init__(self, label: str = "localhost", sudo: bool = False) -> None:
        super().__init__(label, sudo)

    async def _exec(self, command: str, input: bytes | None, timeout: float) -> CommandResult:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = await proc.communicate(input)
        except asyncio.CancelledError:
            # The whole group: sh's children (sleep, tar) would otherwise hold the pipes open.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        return CommandResult(proc.returncode or 0, out, err)


@dataclass(frozen=True)
class SSHTarget:
    """Everything needed to log in to one host; built from a member's `ssh` section."""

    label: str
    host: str
    port: int = 22
    user: str = "root"
    identity_file: Path | None = None
    known_hosts: Path | None = None
    sudo: bool = False
    connect_timeout: float = 10.0


MAX_CHANNELS = 6  # concurrent commands on one SSH connection (sshd's MaxSessions is 10)
CHANNEL_RETRIES = 6  # a channel refused for a moment: about 1 s of retries in all


class SSHHost(Host):
    """A host reached with asyncssh: one connection, one channel per command, host key checked."""

    def __init__(self, target: SSHTarget, connection: object) -> None:
        super().__init__(target.label, target.sudo)
        self.target = target
        self._conn = connection
        # sshd refuses channels beyond MaxSessions (10 by default) on one connection: a
        # phase that checks many steps of one host at once waits for a free channel instead.
        self._channels = asyncio.Semaphore(MAX_CHANNELS)

    @classmethod
    async def connect(cls, target: SSHTarget) -> SSHHost:
        import asyncssh

        where = f"{target.user}@{target.host}:{target.port}"
        options: dict[str, object] = {
            "port": target.port,
            "username": target.user,
            "connect_timeout": target.connect_timeout,
            "login_timeout": target.connect_timeout,
            "keepalive_interval": 15,
            "keepalive_count_max": 4,
        }
        if target.identity_file is not None:
            if not target.identity_file.is_file():
                raise HostError(
                    f"{target.label}: identity file {target.identity_file} does not exist; "
                    "fix ssh.identity_file"
                )
            options["client_keys"] = [str(target.identity_file)]
            options["agent_path"] = None  # only this key, like ssh -o IdentitiesOnly=yes
        if target.known_hosts is not None:
            if not target.known_hosts.is_file():
                raise HostError(
                    f"{target.label}: known_hosts file {target.known_hosts} does not exist; "
                    "fix ssh.known_hosts"
                )
            options["known_hosts"] = str(target.known_hosts)
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(target.host, **options), target.connect_timeout + 5
            )
        except asyncssh.PermissionDenied:
            raise HostError(
                f"{target.label}: ssh login {where} refused (permission denied); check "
                "ssh.user and ssh.identity_file, and the key in the user's authorized_keys"
            ) from None
        except asyncssh.HostKeyNotVerifiable as exc:
            raise HostError(
                f"{target.label}: host key of {where} not trusted ({exc.reason}); add it to "
                "known_hosts (ssh-keyscan) or point ssh.known_hosts at the right file"
            ) from None
        except (TimeoutError, asyncssh.misc.ConnectionLost) as exc:
            raise HostError(
                f"{target.label}: unreachable at {where} ({exc.__class__.__name__}: no answer in "
                f"{target.connect_timeout:.0f} s); check the address and that sshd runs"
            ) from None
        except asyncssh.Error as exc:
            raise HostError(
                f"{target.label}: ssh to {where} failed ({exc.reason}); check the ssh section"
            ) from None
        except OSError as exc:
            raise HostError(
                f"{target.label}: unreachable at {where} ({exc.strerror or exc}); check the "
                "address, the port and that sshd runs"
            ) from None
        return cls(target, conn)

    async def _exec(self, command: str, input: bytes | None, timeout: float) -> CommandResult:
        import asyncssh

        try:
            async with self._channels:
                result = await self._run_channel(command, input, timeout)
        except asyncssh.TimeoutError:
            raise TimeoutError from None
        except (asyncssh.Error, OSError) as exc:
            raise HostError(
                f"{self.label}: ssh connection lost ({exc}); check the host and rerun"
            ) from None
        code = result.exit_status if result.exit_status is not None else 255
        return CommandResult(code, result.stdout or b"", result.stderr or b"")

    async def _run_channel(self, command: str, input: bytes | None, timeout: float) -> Any:
        """One command on its own channel. sshd counts a channel until its close reaches it,
        so a burst can find all its sessions taken for a moment: a refused open (the command
        never started) is retried, briefly and a bounded number of times."""
        import asyncssh

        for attempt in range(CHANNEL_RETRIES):
            try:
                return await self._conn.run(  # type: ignore[attr-defined]
                    command, input=input, encoding=None, check=False, timeout=timeout
                )
            except asyncssh.ChannelOpenError:
                if attempt == CHANNEL_RETRIES - 1:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self._conn.close()  # type: ignore[attr-defined]
        await self._conn.wait_closed()  # type: ignore[attr-defined]


async def fan_out(
    items: Sequence[T], label: Callable[[T], str], work: Callable[[T], Awaitable[R]]
) -> list[R]:
    """Run `work` on every item concurrently; if any fail, raise one error naming them all.

    Every task is awaited before raising, so no host is left half-way in the background.
    """
    results = await asyncio.gather(*(work(item) for item in items), return_exceptions=True)
    failures = [
        (item, r) for item, r in zip(items, results, strict=True) if isinstance(r, BaseException)
    ]
    if not failures:
        return [r for r in results if not isinstance(r, BaseException)]
    first = failures[0][1]
    for _, exc in failures:
        if not isinstance(exc, Exception):
            raise exc  # KeyboardInterrupt, CancelledError: not a host's fault
    if len(failures) == 1:
        raise first
    others = ", ".join(label(item) for item, _ in failures[1:])
    message = f"{first} (also failed: {others})"
    raise (type(first)(message) if isinstance(first, HostError) else HostError(message)) from first
