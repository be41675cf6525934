"""Which cluster a command acts on: from `-f FILE`, `--state-dir`, `--cluster`, or the default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etcdforge.errors import SpecError, UnsafeOperationError
from etcdforge.layout import StateLayout, resolve_state_dir
from etcdforge.names import SAFE_NAME
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
    from etcdforge.spec import default_spec, load_spec

    if selection.file is not None:
        if members is not None:
            raise SpecError("--members and -f exclude each other; set the members in the file")
        spec = load_spec(selection.file, allow_even=allow_even)
        record = read_record(state_dir_for(selection, spec))
    else:
        name = selection.cluster or DEFAULT_CLUSTER
        record = read_record(state_dir_for(selection))
        if record is not None and members is None:
            spec = deployed_spec(record)
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


def deployed_spec(record: ClusterRecord) -> ClusterSpec:
    """The full spec a cluster was deployed with, validated again (host paths, ssh sections)."""
    from etcdforge.spec import parse_spec  # pydantic: only for commands that need the whole spec

    return parse_spec(record.spec, source=f"{record.state_dir}/cluster.json", allow_even=True)


def record_for(selection: Selection) -> ClusterRecord:
    """The deployed cluster a read-only or teardown command acts on."""
    name, state_dir = locate(selection)
    return require_record(state_dir, name)


def record_to_change(selection: Selection, command: str) -> ClusterRecord:
    """The deployed cluster a changing command acts on, refused while it is an adopted cluster
    not yet converted: its members still run the runbook's unit, not etcdforge's."""
    record = record_for(selection)
    require_converted(record, command)
    return record


def require_converted(record: ClusterRecord, command: str) -> None:
    from etcdforge.adoption import pending

    if pending(record.layout) is not None:
        raise UnsafeOperationError(
            f"cluster {record.name} was adopted and is not converted yet; `{command}` works on "
            "etcdforge's own units and certificates: convert it first with "
            "`etcdforge apply -f FILE`"
        )


def locate(selection: Selection) -> tuple[str, Path]:
    """The cluster's name and state dir as every command finds them, without deploying anything.

    The YAML is fully validated only when it looks off, so that the validation names the mistake.
    """
    if selection.file is None:
        return selection.cluster or DEFAULT_CLUSTER, state_dir_for(selection)
    identity = spec_identity(selection.file)
    if identity is None:
        from etcdforge.spec import load_spec

        spec = load_spec(selection.file, allow_even=True)
        return spec.name, state_dir_for(selection, spec)
    name, state_dir = identity
    explicit = selection.state_dir.absolute() if selection.state_dir is not None else state_dir
    return name, explicit or resolve_state_dir(name)


def spec_identity(path: Path) -> tuple[str, Path | None] | None:
    """A spec's name and state dir from the YAML alone, or None if anything looks off.

    That is all a command needs to find the deployed record, which holds the spec validated at
    deploy time; skipping pydantic here keeps `status -f` and `env -f` quick.
    """
    import yaml  # only `-f` needs YAML; `status` without it skips the import

    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_yaml_loader(yaml))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    name, state_dir = data.get("name", DEFAULT_CLUSTER), data.get("state_dir")
    if not isinstance(name, str) or not SAFE_NAME.match(name):
        return None
    if state_dir is None:
        return name, None
    if not isinstance(state_dir, str):
        return None
    return name, (path.parent / state_dir).resolve()


def _yaml_loader(yaml: Any) -> Any:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)
