"""`etcdforge down`: stop the local members; with purge, delete their data and the PKI too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from etcdforge.errors import StateError
from etcdforge.fsutil import remove_tree
from etcdforge.interrupt import before_step
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.target import Selection, record_for
from etcdforge.services.local import LocalRuntime


@dataclass(frozen=True)
class DownResult:
    cluster: str
    stopped: tuple[str, ...]
    purged: tuple[Path, ...]


def down(selection: Selection, purge: bool = False, progress: Progress = SILENT) -> DownResult:
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
        for path in (layout.pki_dir, layout.root):
            if path.exists():
                remove_tree(path)
                purged.append(path)
    return DownResult(cluster=record.name, stopped=tuple(stopped), purged=tuple(purged))
