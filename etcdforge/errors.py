"""One exception hierarchy, so the CLI can turn any user mistake into one line and exit 1."""


class EtcdforgeError(Exception):
    """Base of every error etcdforge raises on purpose; the message is meant for the user."""


class SpecError(EtcdforgeError):
    """The cluster description is invalid; raised before anything is changed."""


class PKIError(EtcdforgeError):
    """A certificate or key is missing, malformed or unusable."""


class BinaryError(EtcdforgeError):
    """The etcd binary is missing, unrunnable or a version we refuse."""


class StateError(EtcdforgeError):
    """The local state directory is missing or inconsistent with the request."""


class ServiceError(EtcdforgeError):
    """A member process or service could not be started or stopped."""


class EtcdClientError(EtcdforgeError):
    """An etcd endpoint could not be reached or returned an error."""


class UnsafeOperationError(EtcdforgeError):
    """The operation could lose quorum or data; refused before any change."""


class HostError(EtcdforgeError):
    """A host could not be reached, refused a command, or a command on it failed."""


class PreflightError(HostError):
    """A host is not fit for the change; raised before anything is changed on any host."""
