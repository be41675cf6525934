"""The cluster record while members join and leave: it always lists the members etcd lists.

The record is what every gate reads (health waits, the runtime, `status`), so it follows the live
member list step by step: a member enters it once `member add` has registered it, and leaves it
once `member remove` has, and its service is stopped. Its `spec` keeps, for every member it
lists, the member's entry (address, ports, ssh login), so a member on its way out can still be
reached after the spec dropped it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etcdforge.errors import StateError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write
from etcdforge.layout import StateLayout
from etcdforge.ops.member_plan import Replacement
from etcdforge.record import ClusterRecord, MemberRecord

if TYPE_CHECKING:
    from etcdforge.spec import MemberSpec

REPLACE_FILE = "replace.json"


def with_member(
    record: ClusterRecord, member: MemberSpec, data_dir: str, initial_state: str = "existing"
) -> ClusterRecord:
    """`record` with `member` in it (replacing an entry of the same name), as it joined."""
    entry = member.model_dump(mode="json")
    joined = MemberRecord(member.name, member.client_url, member.peer_url, data_dir, initial_state)
    members = [m for m in record.members if m.name != member.name] + [joined]
    entries = [e for e in _entries(record) if e["name"] != member.name] + [entry]
    return dataclasses.replace(
        record, members=tuple(members), spec={**record.spec, "members": entries}
    )


def without_member(record: ClusterRecord, name: str) -> ClusterRecord:
    members = tuple(m for m in record.members if m.name != name)
    entries = [e for e in _entries(record) if e["name"] != name]
    return dataclasses.replace(record, members=members, spec={**record.spec, "members": entries})


def only_members(record: ClusterRecord, names: set[str]) -> ClusterRecord:
    """A view of `record` with just these members: what a gate waits for."""
    result = record
    for member in record.members:
        if member.name not in names:
            result = without_member(result, member.name)
    return result


def _entries(record: ClusterRecord) -> list[dict[str, Any]]:
    return list(record.spec.get("members", []))


# --- a replacement in progress ------------------------------------------------------------------


def replace_file(layout: StateLayout) -> Path:
    return layout.root / REPLACE_FILE


def read_replacement(layout: StateLayout) -> Replacement | None:
    """The member `member replace` is rebuilding, and the ID it had; None when none is."""
    path = replace_file(layout)
    try:
        data = json.loads(path.read_text())
        return Replacement(str(data["name"]), str(data["old_id"]), str(data["old_peer_url"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise StateError(
            f"{path}: unreadable replacement marker ({exc}); remove it and rerun "
            "`etcdforge member replace`"
        ) from None


def write_replacement(layout: StateLayout, replacement: Replacement) -> None:
    data = json.dumps(dataclasses.asdict(replacement), indent=2) + "\n"
    atomic_write(replace_file(layout), data.encode(), PRIVATE_FILE)


def clear_replacement(layout: StateLayout) -> None:
    replace_file(layout).unlink(missing_ok=True)
