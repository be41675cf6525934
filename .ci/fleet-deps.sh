#!/bin/sh
# Install what tests/fleet.py needs to boot its test hosts (run as root; idempotent: packages
# already installed are left alone and apt is not even called).
#   debootstrap        builds the cached bookworm rootfs (once per machine)
#   systemd-container  systemd-nspawn, which boots each host
#   iproute2           ip netns / veth / bridge
#   openssh-client     ssh and ssh-keygen (admin key, per-host host keys, the tests' client)
# util-linux (nsenter, mount) and passwd/coreutils are in every Debian base system.
set -eu

packages="debootstrap systemd-container iproute2 openssh-client"
missing=""
for pkg in $packages; do
    status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null || true)
    case "$status" in
        ii*) ;;
        *) missing="$missing $pkg" ;;
    esac
done

if [ -z "$missing" ]; then
    echo "fleet-deps: all present ($packages)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "fleet-deps: need root to install:$missing" >&2
    exit 1
fi

echo "fleet-deps: installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # word splitting of the package list is intended
apt-get install -y -qq $missing  # Recommends bring debian-archive-keyring for debootstrap
