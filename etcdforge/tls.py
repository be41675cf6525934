"""Client-side TLS material for talking to a cluster (kept light: status imports it)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from etcdforge.errors import EtcdClientError


@dataclass(frozen=True)
class TLSFiles:
    ca: Path
    cert: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        """Verify the server against `ca` and present our certificate (mutual TLS)."""
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
            context.load_cert_chain(str(self.cert), str(self.key))
        except (OSError, ssl.SSLError) as exc:
            raise EtcdClientError(
                f"cannot load TLS files (CA {self.ca}, cert {self.cert}, key {self.key}): {exc}"
            ) from None
        return context
