"""The adoption record: what `adopt` found, kept in the state dir for `plan` and `apply`.

`<state>/adopted.json` keeps the cluster ID, the runbook's token, each member's name, ID and host,
the runbook's unit and where the CA key lay on each member, so `apply` converts exactly the cluster
`adopt` read (names, IDs and data stay), finishes a conversion cut short, and deletes the CA keys
only once every member is converted. `converted` turns true at the very end.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from etcdforge.adopt_model import Adopted, AdoptedMember
from etcdforge.errors import StateError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write
from etcdforge.layout import StateLayout

ADOPTION_FILE = "adopted.json"


@dataclass(frozen=True)
class Adoption:
    found: Adopted
    converted: bool = False

    def member(self, name: str) -> AdoptedMember:
        return next(m for m in self.found.members if m.name == name)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()

    def done(self) -> Adoption:
        return replace(self, converted=True)


def adoption_path(layout: StateLayout) -> Path:
    return layout.root / ADOPTION_FILE


def write_adoption(layout: StateLayout, adoption: Adoption) -> bool:
    return atomic_write(adoption_path(layout), adoption.to_json(), PRIVATE_FILE)


def read_adoption(layout: StateLayout) -> Adoption | None:
    path = adoption_path(layout)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"{path}: unreadable adoption record ({exc}); rerun `adopt`") from None
    try:
        found = dict(payload["found"])
        members = tuple(AdoptedMember(**m) for m in found.pop("members"))
        ca_keys = {k: tuple(v) for k, v in found.pop("ca_keys").items()}
        adopted = Adopted(members=members, ca_keys=ca_keys, **found)
        return Adoption(adopted, bool(payload.get("converted", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"{path}: malformed adoption record ({exc}); rerun `adopt`") from None


def pending(layout: StateLayout) -> Adoption | None:
    """The adoption still to convert, if this cluster was adopted and not yet converted."""
    adoption = read_adoption(layout)
    return adoption if adoption is not None and not adoption.converted else None
