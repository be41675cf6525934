"""etcdforge: deploy and operate standalone mutual-TLS etcd clusters."""

__version__ = "0.1.0"
