"""`etcdforge down`: stop the local members; with purge, delete their data and the PKI too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from etcdforge.errors import StateError
from etcdforge.fsutil import remove_tree
from etcdforge.interrupt import before_step
from etcdforge.lock import LOCK_FILE
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.target import Selection, locate, record_for
from etcdforge.services.local import LocalRuntime


@dataclass(frozen=True)
class DownResult:
    cluster: str
    stopped: tuple[str, ...]
    purged: tuple[Path, ...]


def down(selection: Selection, purge: bool = False, progress: Progress = SILENT) -> DownResult:
    name, state_dir = locate(selection)
    if purge and _purged_but_the_lock(state_dir):
        # A purge killed after it removed the record: only the lock file of this run is left.
        remove_tree(state_dir)
        return DownResult(cluster=name, stopped=(), purged=(state_dir,))
    record = record_for(selection)
    if record.on_hosts:
        raise StateError(
            f"cluster {record.name} runs on hosts; use `etcdforge reset -f FILE` to stop it"
        )
    layout = record.layout
    runtime = LocalRuntime(record)
    asyncio.run(settle_all(record, runtime))
    stopped = []
    for member in record.members:
        if runtime.pid(member.name) is not None:
            before_step("stop etcd", member.name)
            progress.step(member.name, "stop etcd")
            asyncio.run(runtime.stop(member.name))
            stopped.append(member.name)
    purged: list[Path] = []
    if purge:
        # Members are all stopped above (stop raises if one survives), so nothing is in use.
        for member in record.members:
            data_dir = Path(member.data_dir)
            if data_dir.exists():
                remove_tree(data_dir)
                purged.append(data_dir)
        if layout.pki_dir.exists():
            remove_tree(layout.pki_dir)
            purged.append(layout.pki_dir)
        _remove_state_dir(layout.root, layout.cluster_file)
        purged.append(layout.root)
    return DownResult(cluster=record.name, stopped=tuple(stopped), purged=tuple(purged))


def _remove_state_dir(root: Path, record: Path) -> None:
    """The record goes last: a purge cut short is finished by a rerun, which needs it."""
    for child in root.iterdir():
        if child != record:
            remove_tree(child)
    record.unlink(missing_ok=True)
    remove_tree(root)


def _purged_but_the_lock(state_dir: Path) -> bool:
    """The state dir holds nothing but the lock file (which this very command just took)."""
    try:
        return {p.name for p in state_dir.iterdir()} <= {LOCK_FILE}
    except FileNotFoundError:
        return False
