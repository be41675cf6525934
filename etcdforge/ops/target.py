"""Which cluster a command acts on: from `-f FILE`, `--state-dir`, `--cluster`, or the default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etcdforge.errors import SpecError
from etcdforge.layout import StateLayout, resolve_state_dir
from etcdforge.record import ClusterRecord, read_record, require_record

if TYPE_CHECKING:
    # The spec layer pulls in pydantic; read-only commands without -f never need it.
    from etcdforge.spec import ClusterSpec

DEFAULT_CLUSTER = "default"


@dataclass(frozen=True)
class Selection:
    """What the user named on the command line; nothing is read until a resolver runs."""

    file: Path | None = None
    state_dir: Path | None = None
    cluster: str | None = None


def state_dir_for(selection: Selection, spec: ClusterSpec | None = None) -> Path:
    if selection.state_dir is not None:
        return selection.state_dir.absolute()
    if spec is not None and spec.state_dir is not None:
        return spec.state_dir
    name = spec.name if spec is not None else (selection.cluster or DEFAULT_CLUSTER)
    return resolve_state_dir(name)


def spec_for_up(
    selection: Selection, members: int | None, allow_even: bool
) -> tuple[ClusterSpec, StateLayout, ClusterRecord | None]:
    """The spec `up` converges to, and the record of what is already deployed, if any."""
    from etcdforge.spec import default_spec, load_spec, parse_spec

    if selection.file is not None:
        if members is not None:
            raise SpecError("--members and -f exclude each other; set the members in the file")
        spec = load_spec(selection.file, allow_even=allow_even)
        record = read_record(state_dir_for(selection, spec))
    else:
        name = selection.cluster or DEFAULT_CLUSTER
        record = read_record(state_dir_for(selection))
        if record is not None and members is None:
            spec = parse_spec(
                record.spec, source=f"{record.state_dir}/cluster.json", allow_even=True
            )
        else:
            count = 3 if members is None else members
            if count % 2 == 0 and not allow_even:
                raise SpecError(
                    f"--members {count} is an even count: it tolerates no more failures than "
                    f"{count - 1}; use 1, 3, 5 or 7, or pass --allow-even"
                )
            spec = default_spec(count, name)
    layout = StateLayout(state_dir_for(selection, spec), spec.data_dir, spec.cert_dir)
    return spec, layout, record


def record_for(selection: Selection) -> ClusterRecord:
    """The deployed cluster a read-only or teardown command acts on."""
    spec = None
    if selection.file is not None:
        from etcdforge.spec import load_spec

        spec = load_spec(selection.file, allow_even=True)
    name = spec.name if spec is not None else (selection.cluster or DEFAULT_CLUSTER)
    return require_record(state_dir_for(selection, spec), name)
