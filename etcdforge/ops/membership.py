"""Adding, promoting and removing members of a live cluster, one change at a time.

This is the machinery behind `up`/`apply` membership changes and `member replace`, and what a
cluster grown back from one restored member reuses. Every change follows etcd's
runtime-reconfiguration guide (https://etcd.io/docs/v3.5/op-guide/runtime-configuration/):

- **add**: the new member's certificates and settings (initial-cluster = the live member list
  plus itself, initial-cluster-state = existing) → `member add` as a *learner* ("Add a new member
  as learner") → start it → wait until its raft log has caught up with the leader's (etcd refuses
  to promote before: "can only promote a learner member which is in sync with leader") →
  `member promote` → wait until every member is healthy;
- **remove**: leadership handed to a caught-up follower first if it leads → `member remove` →
  its service stopped and disabled → its data dir set aside (deleted only on request).

Every step looks at the live member list first, so a run killed at any point resumes on rerun:
a member already registered is not added again (its learner is finished instead), a member
already gone is only cleaned up, and the record follows the member list step by step
(`ops.member_record`). A learner that fails to start or to catch up is removed again, so no
half-registered member is left behind. Which changes to make, in which order, and whether they
are safe is decided by the pure `ops.member_plan`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from etcdforge.client import EndpointStatus, EtcdClient, EtcdReplyError
from etcdforge.errors import EtcdClientError, ServiceError, UnsafeOperationError
from etcdforge.names import initial_cluster
from etcdforge.ops.health import HEALTH_TIMEOUT, hand_off_leadership, wait_healthy
from etcdforge.ops.member_plan import CAUTIOUS as CAUTIOUS
from etcdforge.ops.member_plan import (
    PROMOTE_READY,
    ChangeKind,
    LiveMember,
    MemberChange,
    MemberPlan,
    Replacement,
    Wanted,
    catch_up,
    check_confirmed,
    live_members,
    plan_membership,
    promotion_warning,
)
from etcdforge.ops.member_plan import MemberOptions as MemberOptions
from etcdforge.ops.member_record import only_members, with_member, without_member
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.record import ClusterRecord, MemberRecord
from etcdforge.services.runtime import MemberRuntime

if TYPE_CHECKING:
    from etcdforge.spec import ClusterSpec

#: Errors etcd gives while a reconfiguration is not possible *yet*: just after another change
#: (members must have been connected for etcd's 5 s health interval), or while a learner syncs.
RETRYABLE = (
    "unhealthy cluster",
    "not enough started members",
    "in sync with leader",
    "leader changed",
    "no leader",
    "timed out",
)
RECONFIG_POLL = 0.25
CATCH_UP_POLL = 0.2
MAX_CHANGES = 16  # bounds a converge loop: a 7-member cluster replaced entirely is 14 changes
OBSERVE_TIMEOUT = 3.0
LEARNER_ASK = 0.5  # a learner applying a snapshot is busy: ask briefly, poll again
OBSERVE_POLL = 0.5
ELECTION_GRACE = 15.0  # a lost leader is replaced within a few election timeouts


class Provisioner(Protocol):
    """Where a member's files live and how its service is installed: this machine or a host."""

    def data_dir(self, name: str) -> str: ...

    async def has_data(self, name: str) -> bool:
        """The member's data dir already holds etcd data (a `member/` directory)."""
        ...

    async def provision(self, name: str, token: str, initial_cluster: str) -> None:
        """Certificates, data dir, settings and service for `name` to join the members listed
        in `initial_cluster` (initial-cluster-state existing); idempotent."""
        ...

    async def retire(self, member: MemberRecord, purge_data: bool) -> str | None:
        """Stop and disable a member that left (as the record knew it: a member rebuilt under
        its own name left from its old address), and set its data dir aside (delete it with
        `purge_data`); returns a warning instead when its machine cannot be reached."""
        ...


@dataclass
class Membership:
    """One cluster's membership changes. `record` follows the live member list and is saved
    (`save`) after every change; `spec` is where new members' addresses come from."""

    record: ClusterRecord
    spec: ClusterSpec
    runtime: MemberRuntime
    provisioner: Provisioner
    save: Callable[[ClusterRecord], object]
    progress: Progress = SILENT
    timeout: float = HEALTH_TIMEOUT
    warnings: list[str] = field(default_factory=list)

    # --- observing ------------------------------------------------------------------------

    async def observe(self, grace: float = ELECTION_GRACE) -> tuple[LiveMember, ...]:
        """The live member list, each member with its status (health, leader, raft index)."""
        return await observe(self.record, self.spec.client_endpoints, grace)

    def wanted(self) -> list[Wanted]:
        return [Wanted(m.name, m.peer_url, m.client_url) for m in self.spec.members]

    def plan(
        self,
        live: Collection[LiveMember],
        allow_even: bool = False,
        replacement: Replacement | None = None,
    ) -> MemberPlan:
        recorded = {m.name for m in self.record.members}
        return plan_membership(self.wanted(), list(live), recorded, allow_even, replacement)

    # --- converging -----------------------------------------------------------------------

    async def converge(
        self,
        options: MemberOptions,
        replacement: Replacement | None = None,
        live: tuple[LiveMember, ...] | None = None,
    ) -> list[str]:
        """Make the live members the spec's, one change at a time; returns what was done.

        `live`: the member list just observed, if the caller has it (saves a round)."""
        done: list[str] = []
        live = live if live is not None else await self.observe()
        plan = self.plan(live, options.allow_even, replacement)
        await self.check(plan, live, options, replacement)
        for _ in range(MAX_CHANGES):
            await self.retire_leftovers(live, options.purge_data, replacement)
            if not plan.changes:
                return done
            change = plan.changes[0]
            if change.kind is ChangeKind.ADD:
                await self.add(change, live)
            else:
                await self.remove(change, live, options.purge_data)
            done.append(change.title)
            await self._settle(live, change)
            live = await self.observe()
            plan = self.plan(live, options.allow_even, replacement)
        raise ServiceError(f"membership did not converge after {MAX_CHANGES} changes")

    async def check(
        self,
        plan: MemberPlan,
        live: Collection[LiveMember],
        options: MemberOptions,
        replacement: Replacement | None = None,
    ) -> None:
        """What the plan cannot see: confirmations, and data already where a member would join
        (another cluster's, or a member's removed by hand), checked before any change."""
        check_confirmed(plan, options, self.record.name)
        leaving = {c.name for c in plan.removals}
        leaving |= {m.name for m in self.leftovers(live, replacement)}
        for change in plan.additions:
            if change.member_id is None and change.name not in leaving:
                await self._refuse_data(change.name)

    async def _refuse_data(self, name: str) -> None:
        if await self.provisioner.has_data(name):
            raise UnsafeOperationError(
                f"{self.runtime.label(name)}: {self.provisioner.data_dir(name)} already holds etcd "
                f"data, but the cluster does not list {name}; move it away so that {name} joins "
                f"empty, or rebuild it with `etcdforge member replace {name} -f FILE`"
            )

    def leftovers(
        self, live: Collection[LiveMember], replacement: Replacement | None = None
    ) -> list[MemberRecord]:
        """Members of the record that the cluster no longer lists and the spec does not want
        (a run killed between `member remove` and stopping the member), or that are being
        replaced: their old data must go before the new member starts."""
        urls = {u for m in live for u in m.peer_urls}
        wanted = {(w.name, w.peer_url) for w in self.wanted()}
        rebuilt = replacement.name if replacement is not None else None
        return [
            m
            for m in self.record.members
            if m.peer_url not in urls and ((m.name, m.peer_url) not in wanted or m.name == rebuilt)
        ]

    async def retire_leftovers(
        self,
        live: Collection[LiveMember],
        purge_data: bool,
        replacement: Replacement | None = None,
    ) -> None:
        for member in self.leftovers(live, replacement):
            await self._retire(member.name, purge_data)

    async def _settle(self, before: Collection[LiveMember], change: MemberChange) -> None:
        """After a change, the members that were healthy before are healthy again."""
        healthy = {m.name for m in before if m.healthy and m.name != change.name}
        if change.kind is ChangeKind.ADD:
            healthy.add(change.name)
        view = only_members(self.record, healthy & {m.name for m in self.record.members})
        if view.members:
            await wait_healthy(view, self.runtime, self.timeout)

    # --- add ------------------------------------------------------------------------------

    async def add(self, change: MemberChange, live: Collection[LiveMember]) -> None:
        """Learner, start, catch up, promote, healthy; resumes a learner already registered."""
        name = change.name
        label = self.runtime.label(name)
        member_id = change.member_id
        if member_id is None:
            await self._refuse_data(name)
        joined = join_list(live, change, [m.name for m in self.spec.members])
        self.progress.step(label, f"install {name}'s certificates and settings (state existing)")
        await self.provisioner.provision(name, self.record.token, joined)
        if member_id is None:
            self.progress.step("cluster", f"member add {name} --learner ({change.peer_url})")
            member_id = await self._member_add(change.peer_url)
        member = self.spec.member(name)
        self._save(with_member(self.record, member, self.provisioner.data_dir(name)))
        try:
            if not await self.runtime.is_running(name):
                self.progress.step(label, f"start {self.runtime.service_name(name)} as a learner")
                await self.runtime.start(name)
            await self._promote_when_ready(name, member_id, member.client_url)
        except (ServiceError, EtcdClientError) as exc:
            await self._roll_back(name, member_id, exc)
        self.progress.step("cluster", f"wait for every member to be healthy ({name} votes)")
        await wait_healthy(self.record, self.runtime, self.timeout)

    async def _member_add(self, peer_url: str) -> str:
        body = {"peerURLs": [peer_url], "isLearner": True}
        reply = await self._reconfig("/v3/cluster/member/add", body, exclude=set())
        return str(reply["member"]["ID"])

    async def _promote_when_ready(self, name: str, member_id: str, endpoint: str) -> None:
        """Poll the learner's raft index against the leader's; promote once etcd will accept.

        Promoted only once the learner itself answers with its raft index caught up: the leader
        may count it in sync as soon as a snapshot is sent, but a voter still applying that
        snapshot serves nothing and makes the quorum larger. A learner busy applying is asked
        briefly (`LEARNER_ASK`), so the poll notices at once when it is done."""
        deadline, shown, endpoint = time.monotonic() + self.timeout, "", endpoint.rstrip("/")
        learner_last = sorted(self.record.endpoints, key=lambda e: e.rstrip("/") == endpoint)
        async with self._client(learner_last, OBSERVE_TIMEOUT) as client:
            for _ in range(int(self.timeout / CATCH_UP_POLL) + 10):
                if not await _is_learner(client, member_id):
                    return  # promoted already (a previous run was killed right after)
                voters, mine = await catch_up_view(client, endpoint)
                leader = next((s.raft_index for s in voters if s.is_leader), None)
                share = catch_up(mine, leader)
                line = f"catching up: raft index {mine or 0} of {leader or '?'}"
                line += f" ({share:.0%})" if share is not None else ""
                if line != shown:
                    self.progress.step(self.runtime.label(name), line)
                    shown = line
                ready = share is not None and share >= PROMOTE_READY
                if ready and await self._promote(client, member_id, voters):
                    self.progress.step("cluster", f"member promote {name}: it votes now")
                    self._warn_promotion(voters)
                    return
                if time.monotonic() > deadline:
                    break
                reason = await self.runtime.down_reason(name)
                if reason:
                    raise ServiceError(reason)
                await asyncio.sleep(CATCH_UP_POLL)
        raise ServiceError(
            f"learner {name} did not catch up with the leader in {self.timeout:.0f} s ({shown}); "
            "check its log and network, then rerun (a larger --timeout for a large database)"
        )

    async def _promote(
        self, client: EtcdClient, member_id: str, voters: Collection[EndpointStatus]
    ) -> bool:
        """Promote through the leader (or a voter that answered); False while etcd says "not in
        sync yet"."""
        leader_first = sorted(voters, key=lambda v: not v.is_leader)
        answering = [v.endpoint for v in leader_first if v.member_id is not None]
        try:
            await _ask_any(client, "/v3/cluster/member/promote", {"ID": member_id}, answering)
        except EtcdReplyError as exc:
            if "in sync with leader" in str(exc) or "unhealthy cluster" in str(exc):
                return False
            raise
        return True

    def _warn_promotion(self, statuses: Collection[Any]) -> None:
        versions = [s.version for s in statuses if s.version]
        warning = promotion_warning(versions or [self.record.version])
        if warning and warning not in self.warnings:
            self.warnings.append(warning)

    async def _roll_back(self, name: str, member_id: str, cause: Exception) -> None:
        """A learner that cannot start or catch up leaves again: no half-registered member."""
        self.progress.step("cluster", f"roll back: member remove {name} (still a learner)")
        with contextlib.suppress(EtcdClientError):
            await self._member_remove(member_id)
        await self._retire(name, purge_data=False)
        raise ServiceError(
            f"{cause}; learner {name} was removed again and its data set aside: fix the cause "
            "and rerun"
        ) from None

    # --- remove ---------------------------------------------------------------------------

    async def remove(
        self, change: MemberChange, live: Collection[LiveMember], purge_data: bool
    ) -> None:
        """Hand leadership off if it leads, member remove, stop it, set its data aside."""
        name = change.name
        assert change.member_id is not None
        me = next((m for m in live if m.id == change.member_id), None)
        if me is not None and me.is_leader and name in {m.name for m in self.record.members}:
            self.progress.step("cluster", f"{name} leads: hand leadership to a follower first")
            with contextlib.suppress(EtcdClientError):  # not possible: etcd elects a new leader
                await hand_off_leadership(self.record, name)
        self.progress.step("cluster", f"member remove {name} (ID {change.member_id})")
        await self._member_remove(change.member_id)
        await self._retire(name, purge_data)

    async def _member_remove(self, member_id: str) -> None:
        try:
            await self._reconfig("/v3/cluster/member/remove", {"ID": member_id}, {member_id})
        except EtcdReplyError as exc:
            if "member not found" not in str(exc):
                raise

    async def _retire(self, name: str, purge_data: bool) -> None:
        """Stop a member that left and set its data aside: only one etcdforge installed."""
        recorded = next((m for m in self.record.members if m.name == name), None)
        if recorded is not None:
            what = "delete its data" if purge_data else "set its data dir aside"
            self.progress.step(name, f"stop and disable etcd; {what}")
            warning = await self.provisioner.retire(recorded, purge_data)
            if warning:
                self.progress.step(name, f"skipped: {warning}")
                self.warnings.append(warning)
        self._save(without_member(self.record, name))

    # --- requests -------------------------------------------------------------------------

    def _client(self, endpoints: list[str], timeout: float) -> EtcdClient:
        return EtcdClient(endpoints, self.record.admin_tls, timeout=timeout)

    async def _reconfig(
        self, path: str, body: dict[str, Any], exclude: set[str], retry: bool = True
    ) -> Any:
        """A membership request to a voting member, retried while etcd says "not yet"."""
        endpoints = await self._voter_endpoints(exclude)
        deadline = time.monotonic() + self.timeout
        async with self._client(endpoints, 10.0) as client:
            for _ in range(int(self.timeout / RECONFIG_POLL) + 10):
                try:
                    return await _ask_any(client, path, body)
                except EtcdClientError as exc:
                    again = retry and any(r in str(exc) for r in RETRYABLE)
                    if not again or time.monotonic() > deadline:
                        raise
                await asyncio.sleep(RECONFIG_POLL)
        raise EtcdClientError(f"{path}: no answer in {self.timeout:.0f} s")

    async def _voter_endpoints(self, exclude: set[str]) -> list[str]:
        async with self._client(self.record.endpoints, OBSERVE_TIMEOUT) as client:
            members = await client.member_list()
        urls = [
            u for m in members if not m.is_learner and m.id not in exclude for u in m.client_urls
        ]
        return urls or self.record.endpoints

    def _save(self, record: ClusterRecord) -> None:
        self.record = record
        self.save(record)


async def observe(
    record: ClusterRecord, more: Sequence[str] = (), grace: float = ELECTION_GRACE
) -> tuple[LiveMember, ...]:
    """The live member list, asked of the recorded members (and `more` endpoints), each member
    with its own status: health, leadership, raft index. While the members answer but none is a
    healthy leader (an election after a member was lost), asks again for up to `grace` s."""
    endpoints = list(dict.fromkeys([*record.endpoints, *more]))
    deadline = time.monotonic() + grace
    async with EtcdClient(endpoints, record.admin_tls, timeout=OBSERVE_TIMEOUT) as client:
        for _ in range(int(grace / OBSERVE_POLL) + 2):
            try:
                members = await client.member_list()
            except EtcdClientError as exc:
                raise EtcdClientError(
                    f"cluster {record.name} does not answer, so its members cannot change "
                    f"({exc}); start it first (`etcdforge up`, or `apply` with the spec it was "
                    "deployed with)"
                ) from None
            urls = dict.fromkeys(u for m in members for u in m.client_urls)
            statuses = await asyncio.gather(*(client.status(u) for u in urls))
            found = live_members(members, statuses)
            if any(m.is_leader and m.healthy for m in found) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(OBSERVE_POLL)
    return found


def join_list(live: Collection[LiveMember], change: MemberChange, order: Sequence[str] = ()) -> str:
    """What a joining member's --initial-cluster must say: exactly the cluster's members, in the
    spec's `order` where it names them, so that once the spec's members are all in, the files
    phase finds the setting as it would write it and leaves the file alone."""
    others = [m for m in live if m.id != change.member_id and m.name and m.peer_urls]
    members = [
        *(Wanted(m.name, m.peer_urls[0], "") for m in others),
        Wanted(change.name, change.peer_url, ""),
    ]
    rank = {name: index for index, name in enumerate(order)}
    return initial_cluster(sorted(members, key=lambda m: rank.get(m.name, len(rank))))


async def _ask_any(
    client: EtcdClient, path: str, body: dict[str, Any], endpoints: Sequence[str] = ()
) -> Any:
    """The first member that answers decides: its error is etcd's answer, not a network fault."""
    errors = []
    for endpoint in endpoints or client.endpoints:
        try:
            return await client.call(endpoint, path, body)
        except EtcdReplyError:
            raise
        except EtcdClientError as exc:
            errors.append(str(exc))
    raise EtcdClientError("no member answered: " + "; ".join(errors))


async def _is_learner(client: EtcdClient, member_id: str) -> bool:
    members = await client.member_list()
    return any(m.id == member_id and m.is_learner for m in members)


async def catch_up_view(
    client: EtcdClient, learner: str
) -> tuple[list[EndpointStatus], int | None]:
    """The voters' statuses, and the learner's raft index if it answers within `LEARNER_ASK`."""
    learner = learner.rstrip("/")
    asked = [client.status(e, LEARNER_ASK if e == learner else None) for e in client.endpoints]
    statuses = await asyncio.gather(*asked)
    mine = next((s.raft_index for s in statuses if s.endpoint == learner), None)
    return [s for s in statuses if s.endpoint != learner], mine
