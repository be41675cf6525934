"""What a changing command shows: phases live on a terminal, plain lines otherwise."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from etcdforge.cli.progress import Board
from tests.conftest import ClusterFactory
from tests.helpers import REPO, run_cli

PHASES = ("PKI", "member files", "start", "health")


def run_in_terminal(args: list[str], timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with stdin/stdout/stderr on a pseudo-terminal, as a person at a shell would."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "etcdforge", *args],
        stdin=follower, stdout=follower, stderr=follower, env=env, cwd=REPO,
    )  # fmt: skip
    os.close(follower)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # bounded: the process ends or time runs out
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the terminal closed: the process is gone
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(leader)
    code = proc.wait(timeout=30)
    return code, b"".join(chunks).decode(errors="replace")


def test_plain_lines_name_every_phase_and_step(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("plain", count=1)
    down = cluster.cli("down")
    assert down.code == 0, down.stderr
    result = cluster.cli("up")
    assert result.code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "• start" in lines and "• health" in lines
    assert "  → start m1" in lines
    assert "  → cluster: wait for every member to be healthy" in lines
    assert lines.index("• start") < lines.index("  → start m1") < lines.index("• health")


def test_a_terminal_gets_one_live_display_of_the_phases(tmp_path: Path) -> None:
    spec = tmp_path / "c.yaml"
    spec.write_text((Path(__file__).parent / "fixtures" / "progress.yaml").read_text())
    args = ["-f", str(spec), "--state-dir", str(tmp_path / "state")]
    try:
        code, screen = run_in_terminal(["up", *args])
        assert code == 0, screen
        for phase in PHASES:
            assert phase in screen
        assert "✓" in screen and "✗" not in screen
        assert "→ issue server certificate for m1" not in screen  # detail only with -v
        assert run_cli("down", *args).code == 0
        code, verbose = run_in_terminal(["-v", "up", *args])
        assert code == 0, verbose
        assert "→ start m1" in verbose and "start" in verbose
    finally:
        run_cli("down", "--purge", *args)


def test_the_board_marks_a_failed_phase() -> None:
    board = Board(verbose=False)
    try:
        with board:
            board.phase("preflight")
            board.step("etcd-1", "probe")
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert board.failed and board.phases[-1][0] == "preflight" and board.phases[-1][2] is not None
    assert board.latest == {"etcd-1": "probe"}  # kept: where it stopped
