"""`etcdforge certs rotate-ca`: replace both CAs of a live cluster without downtime.

etcd re-reads its certificate and key on every handshake but its trusted CA files only at
start-up, so the rotation runs in three phases, each safe with members in either state:

1. trust: every trust file holds the old and the new CA; members restart one at a time;
2. reissue: the new CAs sign; every leaf (members and admin) is reissued in place, no restart;
3. drop: trust files hold only the new CA; members restart one at a time; the old CA is gone.

Progress lives in `<state>/pki/rotation/` (the new CAs, the old trust, the phase reached) and in
the files themselves, so an interrupted rotation resumes where it stopped when rerun. An imported
single-CA PKI comes out with two CAs, like etcdforge's own.

On hosts the phases change the admin machine's copies the same way, and each phase ends with
`apply`'s convergence: it uploads the files atomically and, because the unit's fingerprint covers
the CA certificates, restarts members one at a time, followers first, each only while the
cluster is healthy (phases 1 and 3); new leaves alone restart nothing (phase 2). Restarts are
decided from the running processes, so a rerun after a kill finishes a half-rolled phase.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from etcdforge import pki
from etcdforge.errors import ServiceError
from etcdforge.ops.apply import apply, load_host_spec
from etcdforge.ops.health import HEALTH_TIMEOUT, wait_healthy
from etcdforge.ops.plan import SILENT, Progress, StepsOnly, execute
from etcdforge.ops.renew import cluster_leaves, wait_served
from etcdforge.ops.rotation_plan import (
    PHASES,
    Converge,
    RotationPlan,
    phase_reached,
    rotation_dir,
)
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.target import Selection, record_for, require_converted
from etcdforge.record import ClusterRecord
from etcdforge.services.local import LocalRuntime


@dataclass(frozen=True)
class RotateResult:
    cluster: str
    changed: tuple[str, ...]
    pending: tuple[str, ...]
    restarted: tuple[str, ...]
    phase: str  # the last phase completed, or "done"


def _confirm_served(record: ClusterRecord) -> None:
    """Every member presents its reissued certificates (etcd reads them on each handshake)."""
    for leaf in cluster_leaves(record):
        if leaf.member and not wait_served(leaf, pki.load_cert(leaf.cert).serial_number):
            port = leaf.serve[1] if leaf.serve else "?"
            raise ServiceError(
                f"member {leaf.member} still serves an old certificate on port {port} after "
                f"`apply` installed it; check that etcd can read it, then rerun rotate-ca"
            )


def _host_converge(selection: Selection, progress: Progress, timeout: float) -> Converge:
    """`apply` itself (preflight, files, rolling restarts, health), run once per phase."""

    def run() -> list[str]:
        nested = StepsOnly(progress)
        return apply(selection, progress=nested, timeout=timeout, allow_even=True).restarted

    return run


def _require_live(record: ClusterRecord, timeout: float) -> None:
    """Rotation is rolling: every member must run. A restart cut short is finished here."""
    runtime = LocalRuntime(record)

    async def check() -> None:
        await settle_all(record, runtime)
        down = [m.name for m in record.members if runtime.pid(m.name) is None]
        if not down:
            return
        if not rotation_dir(record.layout).exists():
            raise ServiceError(
                f"member(s) {', '.join(down)} of cluster {record.name} are not running; "
                "start them with `etcdforge up` before rotating the CA"
            )
        for name in down:
            await runtime.start(name)
        await wait_healthy(record, runtime, timeout)

    asyncio.run(check())


def rotate_ca(
    selection: Selection,
    *,
    stop_after: str | None = None,
    dry_run: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
) -> RotateResult:
    record = record_for(selection)
    converge: Converge | None = None
    if record.on_hosts:
        load_host_spec(selection, allow_even=True)  # needs -f, like apply
        require_converted(record, "certs rotate-ca")
        converge = _host_converge(selection, progress, timeout)
    elif not dry_run:
        _require_live(record, timeout)
    restarted: list[str] = []
    served = (lambda: _confirm_served(record)) if converge else None
    tagged = RotationPlan(record, restarted, timeout, converge, served).build()
    if stop_after is not None:
        last = PHASES.index(stop_after) + 1
        tagged = [(phase, step) for phase, step in tagged if phase <= last]
    phases = ("prepare", *PHASES)
    steps = [replace(step, phase=phases[phase]) for phase, step in tagged]
    result = execute(steps, progress, dry_run)
    reached = phase_reached(record.layout)
    if not rotation_dir(record.layout).exists():
        phase = "not started" if dry_run else "done"
    else:
        phase = PHASES[reached - 1] if reached else "preparation"
    return RotateResult(record.name, result.changed, result.pending, tuple(restarted), phase)
