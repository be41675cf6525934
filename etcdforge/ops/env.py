"""`etcdforge env`: shell exports so the real etcdctl talks to the cluster with the admin cert."""

from __future__ import annotations

import shlex

from etcdforge.ops.target import Selection, record_for


def env_vars(selection: Selection) -> dict[str, str]:
    record = record_for(selection)
    tls = record.admin_tls
    return {
        "ETCDCTL_API": "3",
        "ETCDCTL_ENDPOINTS": ",".join(record.endpoints),
        "ETCDCTL_CACERT": str(tls.ca),
        "ETCDCTL_CERT": str(tls.cert),
        "ETCDCTL_KEY": str(tls.key),
    }


def render_exports(variables: dict[str, str]) -> str:
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in variables.items())
