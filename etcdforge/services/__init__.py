"""How members are started and stopped: a local supervisor now, systemd on real hosts."""
