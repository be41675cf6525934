"""The CA rotation as a plan: three phases of steps, each step safe to redo.

`ops.rotate_ca` runs it; this module only says what each phase changes and how each step tells
that it is done, from the files themselves and from `<state>/pki/rotation/` (see that module).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from etcdforge import pki
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir, remove_tree
from etcdforge.layout import MemberLayout, StateLayout
from etcdforge.names import KeyAlgorithm
from etcdforge.ops.certs import bundle_ids, chains_to, fingerprint, swap_pair, write_bundle
from etcdforge.ops.health import HEALTH_TIMEOUT
from etcdforge.ops.plan import SILENT, Step
from etcdforge.ops.renew import Leaf, cluster_leaves, renew_step
from etcdforge.ops.rolling import restart_one
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


def phase_file(layout: StateLayout) -> Path:
    return rotation_dir(layout) / "phase"


def phase_reached(layout: StateLayout) -> int:
    """0 before phase 1 began, else the phase number entered (1-3)."""
    try:
        return int(phase_file(layout).read_text().strip())
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


#: A host phase's end: `apply`, then (phase 2) a check that members serve the new leaves.
AfterHosts = Callable[[], None]
Tagged = tuple[int, Step]


@dataclass
class RotationPlan:
    """Every step of a rotation, tagged with its phase (0 = preparation).

    With `converge` (a host cluster) the member steps write only the admin machine's copies, and
    each phase ends by converging the hosts; `confirm_served` then checks phase 2 took effect.
    """

    record: ClusterRecord
    restarted: list[str]
    timeout: float = HEALTH_TIMEOUT
    converge: Converge | None = None
    confirm_served: AfterHosts | None = None
    steps: list[Tagged] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.layout = self.record.layout
        self.runtime = LocalRuntime(self.record)
        self.work = rotation_dir(self.layout)
        settings = self.record.deployed.pki
        self.algorithm = KeyAlgorithm(settings.key_algorithm)
        self.ca_validity = dt.timedelta(days=settings.ca_validity_days)
        self.leaf_validity = dt.timedelta(days=settings.cert_validity_days)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M")
        self.planes = planes(self.record, stamp)

    def build(self) -> list[Tagged]:
        for plane in self.planes:
            self.steps += self.prepare(plane)
        self.trust_phase(
            1,
            _trust_with_new,
            "trust the old and new {plane} CAs in the state directory",
            "trust the old and new CAs {where} {name}{restart}",
            "install both CAs on the hosts, restarting one at a time",
        )
        self.steps.append(self.begin(2))
        self.steps += [self.switch_signer(plane) for plane in self.planes]
        by_bundle = {p.bundle: p for p in self.planes}
        leaves = cluster_leaves(self.record)
        self.steps += [self.reissue_leaf(leaf, by_bundle[leaf.ca_cert]) for leaf in leaves]
        if self.converge:
            title = "install the new certificates on the hosts (no restart)"
            self.steps.append(self.on_hosts(2, title, self.confirm_served))
        self.trust_phase(
            3,
            _only_new,
            "stop trusting the old {plane} CA in the state directory",
            "stop trusting the old CAs {where} {name}{restart}",
            "install the new CAs alone on the hosts, restarting one at a time",
        )
        retire = Step("retire the old CAs", lambda: not self.work.exists(), self.retire)
        self.steps.append((3, retire))
        return self.steps

    def later(self, phase: int) -> bool:
        return phase_reached(self.layout) > phase

    def retire(self) -> None:
        remove_tree(self.work)

    # --- preparation: remember what is trusted now, create the new CAs --------------------

    def prepare(self, plane: Plane) -> list[Tagged]:
        def save_old() -> None:
            ensure_dir(self.work)
            write_bundle(plane.old_trust, pki.load_certs(plane.bundle))

        def create_new() -> None:
            ensure_dir(self.work)
            key = pki.generate_key(self.algorithm)
            cert = pki.issue_ca(plane.common_name, key, self.ca_validity)
            swap_pair(plane.new_cert, plane.new_key, cert, key)

        def created() -> bool:
            return pki.key_matches(plane.new(), pki.load_key(plane.new_key))

        return [
            (0, Step(f"remember the {plane.label} CA in use", plane.old_trust.exists, save_old)),
            (0, Step(f"create the new {plane.label} CA", _safe(created), create_new)),
        ]

    def begin(self, phase: int) -> Tagged:
        def run() -> None:
            atomic_write(phase_file(self.layout), f"{phase}\n".encode(), PRIVATE_FILE)

        title = f"begin phase {phase}: {PHASES[phase - 1]}"
        return (phase, Step(title, lambda: phase_reached(self.layout) >= phase, run))

    # --- phases 1 and 3: the same trust change, in the state dir, each member, the hosts ----

    def trust_phase(self, phase: int, wanted: Wanted, state: str, member: str, hosts: str) -> None:
        where = "files of" if self.converge else "on"
        restart = "" if self.converge else " (restart)"
        self.steps.append(self.begin(phase))
        for plane in self.planes:
            title = state.format(plane=plane.label)
            self.steps.append(self.state_trust(phase, plane, title, wanted))
        for name in (m.name for m in self.record.members):
            title = member.format(where=where, name=name, restart=restart)
            self.steps.append((phase, self.member_trust_step(phase, name, title, wanted)))
        if self.converge:
            self.steps.append(self.on_hosts(phase, hosts))

    def state_trust(self, phase: int, plane: Plane, title: str, wanted: Wanted) -> Tagged:
        def done() -> bool:
            if phase == 1 and self.later(1):
                return True
            return bundle_ids(plane.bundle) == _ids(wanted(plane))

        return (phase, Step(title, _safe(done), lambda: write_bundle(plane.bundle, wanted(plane))))

    def member_trust_step(self, phase: int, name: str, title: str, wanted: Wanted) -> Step:
        files = self.layout.member(name)
        paths = [p.member_trust(files) for p in self.planes]
        runtime = self.runtime

        def correct() -> bool:
            ids = all(bundle_ids(p.member_trust(files)) == _ids(wanted(p)) for p in self.planes)
            return ids and runtime.started_after(name, *paths)

        def run() -> None:
            for plane in self.planes:
                write_bundle(plane.member_trust(files), wanted(plane))
            if runtime.pid(name) is not None and not runtime.started_after(name, *paths):
                why = "CA files changed"
                asyncio.run(restart_one(self.record, runtime, name, why, SILENT, self.timeout))
                self.restarted.append(name)

        return Step(title, _safe(lambda: self.later(phase) or correct()), run)

    def on_hosts(self, phase: int, title: str, after: AfterHosts | None = None) -> Tagged:
        """`apply`'s convergence, done once the next phase began (so a rerun redoes it)."""
        converge = self.converge
        assert converge is not None

        def run() -> None:
            self.restarted.extend(converge())
            if after is not None:
                after()

        return (phase, Step(title, lambda: self.later(phase), run))

    # --- phase 2: sign with the new CAs, reissue every leaf ----------------------------------

    def switch_signer(self, plane: Plane) -> Tagged:
        def done() -> bool:
            return self.later(2) or pki.key_matches(plane.new(), pki.load_key(plane.key))

        def run() -> None:
            atomic_write(plane.key, plane.new_key.read_bytes(), PRIVATE_FILE)

        return (2, Step(f"sign with the new {plane.label} CA", _safe(done), run))

    def reissue_leaf(self, leaf: Leaf, plane: Plane) -> Tagged:
        def done() -> bool:
            return self.later(2) or chains_to(pki.load_cert(leaf.cert), [plane.new()])

        def signer() -> tuple[x509.Certificate, pki.PrivateKey]:
            return plane.new(), pki.load_key(plane.new_key)

        step = renew_step(
            self.record, leaf, self.leaf_validity, False, "reissue", _safe(done), signer
        )
        return (2, step)
