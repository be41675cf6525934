"""The host layer on this machine (LocalHost), and the pure parts of rendering and preflight."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from etcdforge import render
from etcdforge.errors import HostError, SpecError
from etcdforge.hosts import LocalHost, fan_out
from etcdforge.ops.desired import host_member_files as member_files
from etcdforge.ops.preflight import parse_listeners
from etcdforge.services import systemd
from etcdforge.services.runtime import START, ActionKind, RunningMember, ServiceAction
from etcdforge.spec import HostPathsSpec, parse_spec


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_write_file_is_atomic_with_mode_and_owner_and_reports_change(tmp_path: Path) -> None:
    host = LocalHost()
    target = PurePosixPath(tmp_path / "server.key")
    assert run(host.write_file(target, b"secret\n", 0o600, "root:root")) is True
    info = os.stat(target)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0
    assert run(host.write_file(target, b"secret\n", 0o600, "root:root")) is False
    assert run(host.write_file(target, b"secret\n", 0o640, "root:root")) is True  # mode only
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert run(host.read_file(target)) == b"secret\n"
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]  # no temp file left
    state = run(host.file_state(target))
    assert state is not None and state.owner == "root:root" and state.mode == 0o640


def test_binary_content_round_trips(tmp_path: Path) -> None:
    host = LocalHost()
    data = bytes(range(256)) * 4096
    target = PurePosixPath(tmp_path / "blob")
    run(host.write_file(target, data, 0o644))
    assert run(host.read_file(target)) == data


def test_missing_file_reads_as_none(tmp_path: Path) -> None:
    host = LocalHost()
    assert run(host.read_file(PurePosixPath(tmp_path / "nope"))) is None
    assert run(host.file_state(PurePosixPath(tmp_path / "nope"))) is None


def test_write_into_a_missing_directory_names_host_and_command(tmp_path: Path) -> None:
    host = LocalHost("etcd-9 (192.0.2.9)")
    with pytest.raises(HostError, match=r"^etcd-9 \(192.0.2.9\): cannot write .*/no/dir: mktemp"):
        run(host.write_file(PurePosixPath(tmp_path / "no" / "dir"), b"x", 0o644))


def test_failed_command_is_one_line_with_the_reason() -> None:
    host = LocalHost("h1")
    with pytest.raises(HostError) as info:
        run(host.run(["ls", "/definitely/not/here"]))
    message = str(info.value)
    assert message.startswith("h1: `ls /definitely/not/here` failed (exit 2): ")
    assert "\n" not in message


def test_timeout_is_bounded_and_named() -> None:
    with pytest.raises(HostError, match="did not finish in 1 s"):
        run(LocalHost("h1").run(["sleep", "30"], timeout=1))


def test_paths_with_spaces_and_quotes_are_not_spliced(tmp_path: Path) -> None:
    host = LocalHost()
    odd = PurePosixPath(tmp_path / "a b'c\"$(touch pwned)")
    run(host.write_file(odd, b"ok", 0o644))
    assert Path(odd).read_bytes() == b"ok"
    assert not (Path.cwd() / "pwned").exists()


def test_fan_out_waits_for_all_and_names_every_failed_host() -> None:
    finished: list[str] = []

    async def work(name: str) -> str:
        if name in ("b", "c"):
            raise HostError(f"{name}: broken")
        await asyncio.sleep(0.05)
        finished.append(name)
        return name.upper()

    assert run(fan_out(["a", "d"], str, work)) == ["A", "D"]
    with pytest.raises(HostError, match=r"^b: broken \(also failed: c\)$"):
        run(fan_out(["a", "b", "c", "d"], str, work))
    assert sorted(finished) == ["a", "a", "d", "d"]


def test_unit_has_the_required_settings_and_no_etcd_flags() -> None:
    paths = HostPathsSpec()
    unit = systemd.render_unit(paths, "prod", "etcd-1", extra=b"CA")
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "LimitNOFILE=65536",
        "After=network-online.target",
        "Wants=network-online.target",
        "User=etcd",
        "EnvironmentFile=/etc/etcd/etcd.env",
        "ExecStart=/usr/local/bin/etcd",
        "WantedBy=multi-user.target",
    ):
        assert line in unit.splitlines()
    assert "--" not in unit  # settings live in the environment file only
    assert systemd.unit_fingerprint(unit) != systemd.unit_fingerprint(
        systemd.render_unit(paths, "prod", "etcd-1", extra=b"new CA")
    )


def test_env_file_is_mutual_tls_only() -> None:
    spec = parse_spec(
        {"name": "p", "members": [{"name": "e1", "address": "10.0.0.1", "ssh": {}}]}, "t"
    )
    files = member_files(spec.host_paths)
    text = render.as_env_file(render.etcd_settings(spec, spec.members[0], files, "tok"))
    pairs = systemd.env_pairs(text)
    assert pairs["ETCD_LISTEN_CLIENT_URLS"] == "https://10.0.0.1:2379"
    assert pairs["ETCD_LISTEN_PEER_URLS"] == "https://10.0.0.1:2380"
    assert pairs["ETCD_CLIENT_CERT_AUTH"] == "true"
    assert pairs["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert pairs["ETCD_DATA_DIR"] == "/var/lib/etcd"
    assert pairs["ETCD_KEY_FILE"] == "/etc/etcd/pki/server.key"
    assert "http://" not in text


def test_restart_reasons_come_from_the_live_process() -> None:
    env = "# c\nETCD_NAME=e1\nETCD_DATA_DIR=/var/lib/etcd\n"
    unit = systemd.render_unit(HostPathsSpec(), "p", "e1")
    version_dir = PurePosixPath("/opt/etcd/v3.5.1")
    live = {"ETCD_NAME": "e1", "ETCD_DATA_DIR": "/var/lib/etcd"}
    fingerprint = systemd.unit_fingerprint(unit)
    same = RunningMember(1, live, "/opt/etcd/v3.5.1/etcd", fingerprint)
    assert systemd.service_action(same, env, unit, version_dir) is None
    stale = RunningMember(1, {**live, "ETCD_HEARTBEAT_INTERVAL": "100"}, same.binary, fingerprint)
    action = systemd.service_action(stale, env, unit, version_dir)
    assert action == ServiceAction(ActionKind.RESTART, ("settings ETCD_HEARTBEAT_INTERVAL",))
    assert str(action) == "restart (settings ETCD_HEARTBEAT_INTERVAL)"
    old = RunningMember(1, live, "/opt/etcd/v3.4.23/etcd", fingerprint)
    assert systemd.service_action(old, env, unit, version_dir) == ServiceAction(
        ActionKind.RESTART, ("binary /opt/etcd/v3.4.23/etcd -> /opt/etcd/v3.5.1/etcd",)
    )
    other_unit = RunningMember(1, live, same.binary, "0" * 16)
    assert systemd.service_action(other_unit, env, unit, version_dir) == ServiceAction(
        ActionKind.RESTART, ("unit or CA certificates",)
    )
    assert systemd.service_action(None, env, unit, version_dir) == START


def test_unit_state_from_systemctl_show() -> None:
    text = (
        "ActiveState=activating\nSubState=auto-restart\nUnitFileState=enabled\nMainPID=0\n"
        "FragmentPath=/etc/systemd/system/etcd.service\nNeedDaemonReload=no\nInvocationID=ab12\n"
    )
    state = systemd.parse_show(text)
    assert (state.active, state.sub, state.invocation) == ("activating", "auto-restart", "ab12")
    assert state.crashed and not state.running and not state.in_transition
    stopping = systemd.parse_show("ActiveState=deactivating\nSubState=stop-sigterm\nMainPID=7")
    assert stopping.in_transition and not stopping.crashed
    prefixed = systemd.parse_show("unit_ActiveState=active\nunit_MainPID=9\n", prefix="unit_")
    assert prefixed.running and prefixed.main_pid == 9


def test_listeners_from_ss() -> None:
    text = (
        'LISTEN 0 4096 10.254.0.11:2379 0.0.0.0:* users:(("etcd",pid=812,fd=8))\n'
        'LISTEN 0 128 0.0.0.0:22 0.0.0.0:* users:(("sshd",pid=90,fd=3))\n'
        "LISTEN 0 128 [::]:2380 [::]:*\n"
    )
    found = parse_listeners(text)
    assert [(x.address, x.port, x.pid, x.process) for x in found] == [
        ("10.254.0.11", 2379, 812, "etcd"),
        ("0.0.0.0", 22, 90, "sshd"),
        ("::", 2380, None, "unknown process"),
    ]


def test_spec_ssh_sections() -> None:
    spec = parse_spec(
        {
            "name": "p",
            "members": [
                {"name": "e1", "address": "10.0.0.1", "ssh": {"user": "deploy"}},
                {"name": "e2", "address": "10.0.0.2", "ssh": {"host": "e2.example.org"}},
                {"name": "e3", "address": "10.0.0.3", "ssh": {"become": True}},
            ],
            "host_paths": {"data_dir": "/srv/etcd"},
        },
        "t",
    )
    assert spec.on_hosts
    assert [m.ssh.sudo for m in spec.members if m.ssh] == [True, False, True]
    assert spec.host_paths.data_dir == Path("/srv/etcd")
    assert spec.host_paths.bin_dir == Path("/usr/local/bin")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"members": [{"name": "a", "address": "10.0.0.1"}]},
            "members[0].address: 10.0.0.1 is not a loopback address",
        ),
        (
            {"members": [{"name": "a", "address": "10.0.0.1", "ssh": {}},
                         {"name": "b", "address": "127.0.0.1"},
                         {"name": "c", "address": "127.0.0.2"}]},
            "members[1].ssh: either every member has an ssh section",
        ),
        (
            {"members": [{"name": "a", "address": "10.0.0.1", "ssh": {"port": 0}}]},
            "members[0].ssh.port",
        ),
        (
            {"members": [{"name": "a", "address": "10.0.0.1", "ssh": {"user": "Root;"}}]},
            "members[0].ssh.user",
        ),
        (
            {"members": [{"name": "a", "address": "10.0.0.1", "ssh": {}}],
             "host_paths": {"data_dir": "var/lib/etcd"}},
            "host_paths.data_dir: 'var/lib/etcd' must be an absolute path on the host",
        ),
        (
            {"members": [{"name": "a", "address": "10.0.0.1", "ssh": {}}],
             "etcd": {"sha256": "abc"}},
            "etcd.sha256",
        ),
    ],
)  # fmt: skip
def test_bad_host_specs_are_one_line(data: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"name": "p", **data}, "c.yaml")
    assert message in str(info.value)
    assert "\n" not in str(info.value)
