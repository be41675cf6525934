#!/usr/bin/env bash
# Usage: fetch-debian-etcd.sh VERSION SUITE   (e.g. 3.5.30 forky)
#
# Puts etcd VERSION, built by Debian for SUITE, in the test cache as an unpacked release,
# <cache>/etcd-vVERSION-linux-amd64/{etcd,etcdctl,etcdutl}, and as the official-layout tarball
# <cache>/etcd-vVERSION-linux-amd64.tar.gz, for tests that need an etcd newer than this machine's
# own Debian release ships. Nothing is installed and apt's own state is left alone: the suite's
# package list lives in a temporary directory and the .debs are only unpacked. The mirror is the
# one apt already uses here, so no host name is written into the repository. A no-op when cached.
set -euo pipefail

version=${1:?usage: fetch-debian-etcd.sh VERSION SUITE}
suite=${2:?usage: fetch-debian-etcd.sh VERSION SUITE}
cache=${ETCDFORGE_TEST_ETCD_CACHE:-/var/cache/etcdforge-test}
top="etcd-v$version-linux-amd64"
packages=(etcd-server etcd-client)

die() {
    echo "fetch-debian-etcd: $*" >&2
    exit 1
}

if [ -x "$cache/$top/etcd" ] && [ -f "$cache/$top.tar.gz" ]; then
    exit 0
fi
[ "$(dpkg --print-architecture)" = amd64 ] || die "the test releases are linux-amd64; this machine is $(dpkg --print-architecture)"

# The first enabled `deb` source for this machine's own release: "URI SIGNED-BY" (SIGNED-BY may
# be empty). Reads both the one-line (.list) and the deb822 (.sources) formats.
debian_mirror() {
    local codename
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    [ -n "$codename" ] || return 0
    local files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    ((${#files[@]})) || return 0
    awk -v codename="$codename" '
        function has_suite(list,   n, i, parts) {
            n = split(list, parts, /[ \t]+/)
            for (i = 1; i <= n; i++) if (parts[i] == codename) return 1
            return 0
        }
        function flush() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && uri != "" && has_suite(suites)) {
                print uri, signed; found = 1; exit
            }
            types = ""; uri = ""; suites = ""; signed = ""; enabled = ""
        }
        FNR == 1 { if (deb822) flush(); deb822 = (FILENAME ~ /\.sources$/) }
        /^[ \t]*#/ { next }
        !deb822 {
            line = $0; sub(/#.*/, "", line)
            n = split(line, f, /[ \t]+/)
            if (n < 3 || f[1] != "deb") next
            opts = ""; i = 2
            if (f[2] ~ /^\[/) {
                while (i <= n && f[i] !~ /\]$/) { opts = opts " " f[i]; i++ }
                opts = opts " " f[i]; i++
            }
            key = ""
            if (match(opts, /signed-by=[^] ]+/)) key = substr(opts, RSTART + 10, RLENGTH - 10)
            if (f[i + 1] == codename) { print f[i], key; found = 1; exit }
            next
        }
        /^[ \t]*$/ { flush(); next }
        /^[ \t]/ { next }
        {
            field = tolower($1); value = $0; sub(/^[^:]*:[ \t]*/, "", value)
            if (field == "types:") types = value
            else if (field == "uris:") { split(value, u, /[ \t]+/); uri = u[1] }
            else if (field == "suites:") suites = value
            else if (field == "enabled:") enabled = tolower(value)
            else if (field == "signed-by:" && value ~ /^\//) signed = value
        }
        END { if (!found && deb822) flush() }
    ' "${files[@]}"
}

read -r mirror keyring < <(debian_mirror) || true
[ -n "${mirror:-}" ] || die "no Debian source for this machine's release in /etc/apt/sources.list{,.d}; cannot fetch etcd $version from $suite"

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/download" "$work/root"
# apt downloads as the unprivileged _apt user where it exists: give it what it must write.
if id _apt >/dev/null 2>&1; then
    chown _apt "$work/lists/partial" "$work/download"
fi
echo "deb [arch=amd64${keyring:+ signed-by=$keyring}] $mirror $suite main" >"$work/sources.list"
apt_opts=(
    -o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
    -o Acquire::Retries=1 -o Acquire::http::Timeout=30 -o Acquire::https::Timeout=30
)

# Debian versions of etcd-server in the suite whose upstream part is exactly $version.
debian_versions() {
    apt-cache "${apt_opts[@]}" show etcd-server 2>/dev/null | awk -v want="$version" '
        $1 == "Version:" {
            upstream = $2; sub(/^[0-9]+:/, "", upstream); sub(/-[^-]*$/, "", upstream)
            if (upstream == want || index(upstream, want "+") == 1) print $2
        }'
}

debs="$cache/debs"
mkdir -p "$debs"
shopt -s nullglob
cached=("$debs"/etcd-server_"$version"[-+]*_amd64.deb "$debs"/etcd-client_"$version"[-+]*_amd64.deb)
if ((${#cached[@]} < 2)); then
    if ! apt-get "${apt_opts[@]}" --error-on=any -q update >"$work/update.log" 2>&1; then
        reason=$(grep -E '^(E|W):' "$work/update.log" | head -1 | sed 's/^[EW]: //' | tr -s ' \t' ' ')
        die "cannot read the $suite package list from $mirror (${reason:-apt-get update failed}); this machine must reach the Debian mirror in its apt sources"
    fi
    debian_version=$(debian_versions | sort -V | tail -1)
    if [ -z "$debian_version" ]; then
        offered=$(apt-cache "${apt_opts[@]}" show etcd-server 2>/dev/null | awk '$1 == "Version:" {print $2}' | paste -sd, -)
        die "Debian $suite has no etcd-server $version (it has: ${offered:-none}); pick the suite that ships it"
    fi
    echo "fetch-debian-etcd: etcd $version from Debian $suite: etcd-server/etcd-client $debian_version"
    (cd "$work/download" && apt-get "${apt_opts[@]}" -q download \
        "${packages[@]/%/=$debian_version}" >"$work/download.log" 2>&1) ||
        die "cannot download etcd-server/etcd-client $debian_version from $mirror ($(tail -1 "$work/download.log"))"
    mv -f "$work/download"/*.deb "$debs"/
fi

for pkg in "${packages[@]}"; do
    found=("$debs/${pkg}_$version"[-+]*_amd64.deb)
    ((${#found[@]})) || die "no ${pkg} $version .deb in $debs after the download"
    dpkg-deb -x "${found[-1]}" "$work/root"
done

mkdir "$work/$top"
for binary in etcd etcdctl etcdutl; do
    [ -x "$work/root/usr/bin/$binary" ] || die "Debian's etcd $version packages have no /usr/bin/$binary"
    cp "$work/root/usr/bin/$binary" "$work/$top/$binary"
done
check_version() {
    local got
    got=$("$@" 2>&1 | sed -n 's/^.*[Vv]ersion: *\([0-9][0-9.]*\)$/\1/p' | head -1)
    [ "$got" = "$version" ] || die "$1 reports version '${got:-none}', expected $version"
}
check_version "$work/$top/etcd" --version
check_version "$work/$top/etcdctl" version
check_version "$work/$top/etcdutl" version

tar -C "$work" --owner=0 --group=0 -czf "$work/$top.tar.gz" "$top"
mv -f "$work/$top.tar.gz" "$cache/$top.tar.gz"
rm -rf -- "${cache:?}/$top"
mv "$work/$top" "$cache/$top"
echo "fetch-debian-etcd: $cache/$top and $top.tar.gz ready"
