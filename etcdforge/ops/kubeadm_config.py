"""`etcdforge kubeadm config` / `apiserver-flags`: point a kube-apiserver at the cluster.

Endpoints are always derived, never stored: the live member list when the cluster answers (so a
membership change shows up in the next `kubeadm config`), the spec with a warning when not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etcdforge import kubeadm
from etcdforge.client import EtcdClient, run
from etcdforge.errors import EtcdClientError
from etcdforge.fsutil import atomic_write
from etcdforge.kubeadm import KubeadmError, KubeadmPaths
from etcdforge.ops.target import DEFAULT_CLUSTER, Selection, state_dir_for
from etcdforge.record import ClusterRecord, read_record, require_record
from etcdforge.spec import ClusterSpec, load_spec


@dataclass(frozen=True)
class ClusterEndpoints:
    cluster: str
    endpoints: list[str]
    live: bool
    warning: str | None = None


def _spec_and_record(selection: Selection) -> tuple[ClusterSpec | None, ClusterRecord | None]:
    spec = load_spec(selection.file, allow_even=True) if selection.file is not None else None
    record = read_record(state_dir_for(selection, spec))
    if spec is None and record is None:
        require_record(state_dir_for(selection), selection.cluster or DEFAULT_CLUSTER)
    return spec, record


def _live_client_urls(record: ClusterRecord) -> list[str]:
    async def members() -> list[str]:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
            listed = await client.member_list()
        # A learner serves no client requests; the apiserver must not be pointed at it.
        return [url for m in listed if not m.is_learner for url in m.client_urls]

    return run(members())


def cluster_endpoints(selection: Selection) -> ClusterEndpoints:
    """Client URLs of the voting members, live if possible; the spec's with a warning if not."""
    spec, record = _spec_and_record(selection)
    name = spec.name if spec is not None else record.name if record is not None else "?"
    fallback = spec.client_endpoints if spec is not None else record.endpoints if record else []
    if record is None:
        return ClusterEndpoints(
            name,
            fallback,
            False,
            f"cluster {name} is not deployed at {state_dir_for(selection, spec)}; endpoints come "
            "from the spec, not the live member list",
        )
    try:
        urls = _live_client_urls(record)
    except EtcdClientError as exc:
        return ClusterEndpoints(
            name,
            fallback,
            False,
            f"cluster {name} is not reachable ({exc}); endpoints come from the spec, "
            "not the live member list",
        )
    if not urls:
        return ClusterEndpoints(name, fallback, False, f"cluster {name} lists no client URLs")
    order = {url: i for i, url in enumerate(fallback)}
    urls = sorted(dict.fromkeys(u.rstrip("/") for u in urls), key=lambda u: order.get(u, 99))
    return ClusterEndpoints(name, urls, True)


@dataclass(frozen=True)
class ConfigResult:
    text: str
    endpoints: ClusterEndpoints
    merged_into: Path | None = None
    changed: bool = False
    replaced: str | None = None


def config(
    selection: Selection,
    paths: KubeadmPaths,
    api: str | None = None,
    merge: Path | None = None,
    dry_run: bool = False,
) -> ConfigResult:
    """A ClusterConfiguration for the cluster, or the user's kubeadm file rewritten to use it."""
    paths.validate()
    if api is not None:
        kubeadm.api_version(api)
    if merge is None:
        found = cluster_endpoints(selection)
        text = kubeadm.render_cluster_configuration(
            found.endpoints, paths, api or kubeadm.DEFAULT_API
        )
        return ConfigResult(text, found)
    try:
        original = merge.read_text(encoding="utf-8")
        mode = merge.stat().st_mode & 0o777
    except FileNotFoundError:
        raise KubeadmError(f"{merge}: no such file; pass your kubeadm config to --merge") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeadmError(f"{merge}: cannot read it ({exc.__class__.__name__})") from None
    # Validate the file before touching the cluster: a bad file is the cheaper mistake to report.
    kubeadm.validate_config(original, str(merge), api)
    found = cluster_endpoints(selection)
    result = kubeadm.merge_config(original, str(merge), found.endpoints, paths, api)
    changed = result.text != original
    if changed and not dry_run:
        atomic_write(merge, result.text.encode(), mode)
    return ConfigResult(result.text, found, merge, changed, result.replaced)


def apiserver_flags(
    selection: Selection, paths: KubeadmPaths
) -> tuple[list[str], ClusterEndpoints]:
    paths.validate()
    found = cluster_endpoints(selection)
    return kubeadm.apiserver_flags(found.endpoints, paths), found
