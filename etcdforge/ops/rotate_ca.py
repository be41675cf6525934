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
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from etcdforge import pki
from etcdforge.errors import PKIError, ServiceError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir, remove_tree
from etcdforge.layout import MemberLayout, StateLayout
from etcdforge.names import KeyAlgorithm
from etcdforge.ops.apply import apply, load_host_spec
from etcdforge.ops.certs import bundle_ids, chains_to, fingerprint, swap_pair, write_bundle
from etcdforge.ops.health import HEALTH_TIMEOUT, wait_healthy
from etcdforge.ops.plan import Progress, Step, execute
from etcdforge.ops.renew import Leaf, cluster_leaves, renew_step, wait_served
from etcdforge.ops.rolling import restart_one
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.target import Selection, record_for
from etcdforge.record import ClusterRecord
from etcdforge.services.local import LocalRuntime

PHASES = ("trust", "reissue", "drop")


@dataclass(frozen=True)
class Plane:
    """One trust plane (client or peer): its CA files in the state dir and on members."""

    label: str
    bundle: Path
    key: Path
    member_trust: Callable[[MemberLayout], Path]
    new_cert: Path
    new_key: Path
    old_trust: Path
    common_name: str

    def new(self) -> x509.Certificate:
        return pki.load_cert(self.new_cert)

    def old(self) -> list[x509.Certificate]:
        return pki.load_certs(self.old_trust)


def rotation_dir(layout: StateLayout) -> Path:
    return layout.pki_dir / "rotation"


def planes(record: ClusterRecord, stamp: str) -> list[Plane]:
    layout = record.layout
    work = rotation_dir(layout)
    return [
        Plane(
            "cluster",
            layout.ca_cert,
            layout.ca_key,
            lambda files: files.trusted_ca,
            work / "ca.crt",
            work / "ca.key",
            work / "old-ca.crt",
            f"{record.name}-etcd-ca-{stamp}",
        ),
        Plane(
            "peer",
            layout.peer_ca_cert,
            layout.peer_ca_key,
            lambda files: files.peer_trusted_ca,
            work / "peer-ca.crt",
            work / "peer-ca.key",
            work / "old-peer-ca.crt",
            f"{record.name}-etcd-peer-ca-{stamp}",
        ),
    ]


@dataclass(frozen=True)
class RotateResult:
    cluster: str
    changed: tuple[str, ...]
    pending: tuple[str, ...]
    restarted: tuple[str, ...]
    phase: str  # the last phase completed, or "done"


def _phase_file(layout: StateLayout) -> Path:
    return rotation_dir(layout) / "phase"


def phase_reached(layout: StateLayout) -> int:
    """0 before phase 1 began, else the phase number entered (1-3)."""
    try:
        return int(_phase_file(layout).read_text().strip())
    except (FileNotFoundError, ValueError):
        return 0


def _trust_with_new(plane: Plane) -> list[x509.Certificate]:
    return [*plane.old(), plane.new()]


def _only_new(plane: Plane) -> list[x509.Certificate]:
    return [plane.new()]


Wanted = Callable[[Plane], list[x509.Certificate]]


def _ids(certs: list[x509.Certificate]) -> frozenset[bytes]:
    return frozenset(fingerprint(c) for c in certs)


def _safe(check: Callable[[], bool]) -> Callable[[], bool]:
    """A done-check that reads files a previous step creates is simply 'not done' before."""

    def wrapped() -> bool:
        try:
            return check()
        except (PKIError, FileNotFoundError):
            return False

    return wrapped


#: Converge the hosts to the admin machine's files; returns the members it restarted.
Converge = Callable[[], list[str]]


def rotation_steps(
    record: ClusterRecord,
    restarted: list[str],
    timeout: float = HEALTH_TIMEOUT,
    converge: Converge | None = None,
) -> list[tuple[int, Step]]:
    """Every step tagged with its phase (0 = preparation).

    With `converge` (a host cluster) the member steps write only the admin machine's copies,
    and each phase ends by converging the hosts.
    """
    layout = record.layout
    runtime = LocalRuntime(record)
    work = rotation_dir(layout)
    pki_spec = record.deployed.pki
    algorithm = KeyAlgorithm(pki_spec.key_algorithm)
    ca_validity = dt.timedelta(days=pki_spec.ca_validity_days)
    leaf_validity = dt.timedelta(days=pki_spec.cert_validity_days)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M")
    all_planes = planes(record, stamp)
    members = [m.name for m in record.members]
    steps: list[tuple[int, Step]] = []

    def later(phase: int) -> bool:
        return phase_reached(layout) > phase

    # --- preparation: remember what is trusted now, create the new CAs --------------------
    def prepare(plane: Plane) -> list[tuple[int, Step]]:
        def save_old() -> None:
            ensure_dir(work)
            write_bundle(plane.old_trust, pki.load_certs(plane.bundle))

        def create_new() -> None:
            ensure_dir(work)
            key = pki.generate_key(algorithm)
            cert = pki.issue_ca(plane.common_name, key, ca_validity)
            swap_pair(plane.new_cert, plane.new_key, cert, key)

        def created() -> bool:
            return pki.key_matches(plane.new(), pki.load_key(plane.new_key))

        return [
            (0, Step(f"remember the {plane.label} CA in use", plane.old_trust.exists, save_old)),
            (0, Step(f"create the new {plane.label} CA", _safe(created), create_new)),
        ]

    def state_trust(phase: int, plane: Plane, title: str, wanted: Wanted) -> tuple[int, Step]:
        def done() -> bool:
            return (phase == 1 and later(1)) or bundle_ids(plane.bundle) == _ids(wanted(plane))

        return (phase, Step(title, _safe(done), lambda: write_bundle(plane.bundle, wanted(plane))))

    def switch_signer(plane: Plane) -> tuple[int, Step]:
        def done() -> bool:
            return later(2) or pki.key_matches(plane.new(), pki.load_key(plane.key))

        def run() -> None:
            atomic_write(plane.key, plane.new_key.read_bytes(), PRIVATE_FILE)

        return (2, Step(f"sign with the new {plane.label} CA", _safe(done), run))

    def reissue_leaf(leaf: Leaf, plane: Plane) -> tuple[int, Step]:
        def done() -> bool:
            return later(2) or chains_to(pki.load_cert(leaf.cert), [plane.new()])

        def signer() -> tuple[x509.Certificate, pki.PrivateKey]:
            return plane.new(), pki.load_key(plane.new_key)

        return (2, renew_step(record, leaf, leaf_validity, False, "reissue", _safe(done), signer))

    for plane in all_planes:
        steps += prepare(plane)

    def begin(phase: int) -> tuple[int, Step]:
        return (
            phase,
            Step(
                f"begin phase {phase}: {PHASES[phase - 1]}",
                lambda: phase_reached(layout) >= phase,
                lambda: atomic_write(_phase_file(layout), f"{phase}\n".encode(), PRIVATE_FILE),
            ),
        )

    def member_trust_step(
        phase: int, name: str, title: str, wanted: Callable[[Plane], list[x509.Certificate]]
    ) -> Step:
        files = layout.member(name)
        paths = [p.member_trust(files) for p in all_planes]

        def correct() -> bool:
            return all(
                bundle_ids(p.member_trust(files)) == _ids(wanted(p)) for p in all_planes
            ) and runtime.started_after(name, *paths)

        def run() -> None:
            for plane in all_planes:
                write_bundle(plane.member_trust(files), wanted(plane))
            if runtime.pid(name) is not None and not runtime.started_after(name, *paths):
                reason = "CA files changed"
                asyncio.run(restart_one(record, runtime, name, reason, _quiet, timeout))
                restarted.append(name)

        return Step(title, _safe(lambda: later(phase) or correct()), run)

    def on_hosts(phase: int, title: str, check_served: bool = False) -> tuple[int, Step]:
        """`apply`'s convergence, done once the next phase began (so a rerun redoes it)."""
        assert converge is not None

        def run() -> None:
            restarted.extend(converge())
            if check_served:
                _confirm_served(record)

        return (phase, Step(title, lambda: later(phase), run))

    where = "files of" if converge else "on"
    restart = "" if converge else " (restart)"

    # --- phase 1: trust old and new ---------------------------------------------------------
    steps.append(begin(1))
    for plane in all_planes:
        title = f"trust the old and new {plane.label} CAs in the state directory"
        steps.append(state_trust(1, plane, title, _trust_with_new))
    for name in members:
        title = f"trust the old and new CAs {where} {name}{restart}"
        steps.append((1, member_trust_step(1, name, title, _trust_with_new)))
    if converge:
        steps.append(on_hosts(1, "install both CAs on the hosts, restarting one at a time"))

    # --- phase 2: sign with the new CAs, reissue every leaf ----------------------------------
    steps.append(begin(2))
    steps += [switch_signer(plane) for plane in all_planes]
    by_bundle = {p.bundle: p for p in all_planes}
    steps += [reissue_leaf(leaf, by_bundle[leaf.ca_cert]) for leaf in cluster_leaves(record)]
    if converge:
        steps.append(on_hosts(2, "install the new certificates on the hosts (no restart)", True))

    # --- phase 3: drop the old CAs ----------------------------------------------------------
    steps.append(begin(3))
    for plane in all_planes:
        title = f"stop trusting the old {plane.label} CA in the state directory"
        steps.append(state_trust(3, plane, title, _only_new))
    for name in members:
        title = f"stop trusting the old CAs {where} {name}{restart}"
        steps.append((3, member_trust_step(3, name, title, _only_new)))
    if converge:
        steps.append(
            on_hosts(3, "install the new CAs alone on the hosts, restarting one at a time")
        )
    steps.append(
        (3, Step("retire the old CAs", lambda: not work.exists(), lambda: remove_tree(work)))
    )
    return steps


def _confirm_served(record: ClusterRecord) -> None:
    """Every member presents its reissued certificates (etcd reads them on each handshake)."""
    for leaf in cluster_leaves(record):
        if leaf.member and not wait_served(leaf, pki.load_cert(leaf.cert).serial_number):
            port = leaf.serve[1] if leaf.serve else "?"
            raise ServiceError(
                f"member {leaf.member} still serves an old certificate on port {port} after "
                f"`apply` installed it; check that etcd can read it, then rerun rotate-ca"
            )


def _quiet(_where: str, _message: str) -> None:
    """Local restarts show as the step's own title; the roll's detail stays silent."""


def _host_converge(selection: Selection, progress: Progress | None, timeout: float) -> Converge:
    """`apply` itself (preflight, files, rolling restarts, health), run once per phase."""

    def show(host: str, message: str) -> None:
        if progress:
            progress(f"{host}: {message}")

    def run() -> list[str]:
        return apply(selection, progress=show, timeout=timeout, allow_even=True).restarted

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
    stop_after: str | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = HEALTH_TIMEOUT,
) -> RotateResult:
    record = record_for(selection)
    converge: Converge | None = None
    if record.on_hosts:
        load_host_spec(selection, allow_even=True)  # needs -f, like apply
        converge = _host_converge(selection, progress, timeout)
    elif not dry_run:
        _require_live(record, timeout)
    restarted: list[str] = []
    tagged = rotation_steps(record, restarted, timeout, converge)
    if stop_after is not None:
        last = PHASES.index(stop_after) + 1
        tagged = [(phase, step) for phase, step in tagged if phase <= last]
    result = execute([step for _, step in tagged], progress, dry_run)
    reached = phase_reached(record.layout)
    if not rotation_dir(record.layout).exists():
        phase = "not started" if dry_run else "done"
    else:
        phase = PHASES[reached - 1] if reached else "preparation"
    return RotateResult(record.name, result.changed, result.pending, tuple(restarted), phase)
