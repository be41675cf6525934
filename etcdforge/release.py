"""etcd release tarballs: fetched once on the admin machine, verified, cached, then installed.

A release is the official `etcd-vX.Y.Z-linux-amd64.tar.gz` (top directory
`etcd-vX.Y.Z-linux-amd64/` with etcd, etcdctl and, from 3.5, etcdutl). It is given as a URL, a
local file, or a directory (an unpacked release, or one holding the tarball). A download is
refused unless its sha256 matches a pin (`etcd.sha256`) or the release's own `SHA256SUMS`; a
refused file never reaches the cache, let alone a host. The binary inside is run once on the admin
machine, so a tarball whose name lies about its version is refused too.

On a host, versions sit side by side in `<releases_dir>/vX.Y.Z/` and one symlink,
`<releases_dir>/current`, says which one runs; `<bin_dir>/etcd{,ctl,utl}` point through it. The
switch is a rename of a symlink, so it is atomic; a rolling upgrade flips it on one host right
before that member restarts, never on every host ahead of time.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from etcdforge.binaries import Version, format_version, parse_version, probe_version
from etcdforge.errors import BinaryError, HostError
from etcdforge.fsutil import file_sha256
from etcdforge.hosts import Host, last_line
from etcdforge.spec import EtcdSpec, HostPathsSpec

CACHE_ENV = "ETCDFORGE_CACHE_DIR"
OFFICIAL_URL = "https://github.com/etcd-io/etcd/releases/download/v{v}/etcd-v{v}-linux-amd64.tar.gz"
TARBALL_RE = re.compile(r"^etcd-v(\d+\.\d+\.\d+)-linux-amd64\.tar(\.gz)?$")
BINARIES = ("etcd", "etcdctl", "etcdutl")
MARKER = ".etcdforge-sha256"
DOWNLOAD_TIMEOUT = 300.0


@dataclass(frozen=True)
class Release:
    """A verified tarball on the admin machine, ready to upload."""

    version: Version
    tarball: Path
    sha256: str
    source: str

    @property
    def tag(self) -> str:
        return f"v{format_version(self.version)}"  # as releases and host directories name it

    @property
    def top_dir(self) -> str:
        """The tarball's one top directory, as the official releases are packed."""
        return f"etcd-{self.tag}-linux-amd64"


def cache_dir() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "etcdforge" / "releases"


def tarball_name(version: Version) -> str:
    return f"etcd-v{format_version(version)}-linux-amd64.tar.gz"


def parse_sums(text: str, name: str) -> str | None:
    """The digest for `name` in a SHA256SUMS file (`<hex>  <name>` or `<hex> *<name>`)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*").split("/")[-1] == name:
            return parts[0].lower()
    return None


def resolve(etcd: EtcdSpec, base_dir: Path, cache: Path | None = None) -> Release:
    """Find, fetch if needed, verify and cache the release the spec asks for."""
    wanted = parse_version(etcd.version) if etcd.version else None
    source = etcd.release
    if source is None:
        if wanted is None:
            raise BinaryError(
                "etcd.version or etcd.release is required for a cluster on hosts "
                "(e.g. version: 3.5.17, or release: a tarball URL, file or directory)"
            )
        source = OFFICIAL_URL.format(v=format_version(wanted))
    cache = cache or cache_dir()
    if source.startswith(("http://", "https://")):
        release = _fetch(source, etcd.sha256, cache)
    else:
        path = Path(source).expanduser()
        path = path if path.is_absolute() else (base_dir / path).resolve()
        release = _local(path, wanted, etcd.sha256, cache)
    if wanted is not None and release.version != wanted:
        raise BinaryError(
            f"etcd.release {source} is etcd {format_version(release.version)} but etcd.version "
            f"says {format_version(wanted)}; make them agree"
        )
    _check_binary(release, cache)
    return release


def _version_from_name(name: str, source: str) -> Version:
    match = TARBALL_RE.match(name)
    if not match:
        raise BinaryError(
            f"etcd.release {source}: expected an official tarball name like "
            "etcd-v3.5.17-linux-amd64.tar.gz"
        )
    return parse_version(match.group(1))


def _fetch(url: str, pin: str | None, cache: Path) -> Release:
    import httpx

    name = url.rstrip("/").rsplit("/", 1)[-1]
    version = _version_from_name(name, url)
    cached = cache / name
    verified = cached.with_name(name + ".sha256")
    if cached.is_file() and verified.is_file():
        # The digest, and the URL whose SHA256SUMS vouched for it: without a pin, a cached
        # file counts only for the URL it came from (another mirror may serve another file
        # under the same name).
        digest, _, source = verified.read_text().strip().partition("\n")
        trusted = digest == pin.lower() if pin is not None else source == url
        if trusted and file_sha256(cached) == digest:
            return Release(version, cached, digest, url)
    cache.mkdir(parents=True, exist_ok=True)
    sums_url = url.rsplit("/", 1)[0] + "/SHA256SUMS"
    try:
        with httpx.Client(follow_redirects=True, timeout=DOWNLOAD_TIMEOUT) as http:
            expected = _expected_digest(http, sums_url, name, pin)
            fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{name}.")
            tmp = Path(tmp_name)
            try:
                hasher = hashlib.sha256()
                with os.fdopen(fd, "wb") as out, http.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise BinaryError(
                            f"etcd.release {url}: HTTP {response.status_code}; check the URL "
                            "and the version"
                        )
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        hasher.update(chunk)
                got = hasher.hexdigest()
                if got != expected:
                    raise BinaryError(
                        f"etcd.release {url}: sha256 {got} does not match the expected {expected}"
                        " (corrupt or tampered download); nothing was installed"
                    )
                os.replace(tmp, cached)
            finally:
                tmp.unlink(missing_ok=True)
    except httpx.HTTPError as exc:
        raise BinaryError(
            f"etcd.release {url}: download failed ({exc.__class__.__name__}: {exc}); check the "
            "URL and the network, or give a local file"
        ) from None
    verified.write_text(f"{expected}\n{url}\n")
    return Release(version, cached, expected, url)


def _expected_digest(http: object, sums_url: str, name: str, pin: str | None) -> str:
    """The pin if given (and SHA256SUMS agrees, when published); else SHA256SUMS alone."""
    import httpx

    assert isinstance(http, httpx.Client)
    published = None
    try:
        response = http.get(sums_url)
        if response.status_code == 200:
            published = parse_sums(response.text, name)
    except httpx.HTTPError:
        published = None
    if pin is not None:
        if published is not None and published != pin.lower():
            raise BinaryError(
                f"etcd.sha256 {pin} disagrees with {sums_url} ({published}); check the pin"
            )
        return pin.lower()
    if published is None:
        raise BinaryError(
            f"cannot verify {name}: no etcd.sha256 pin and no entry in {sums_url}; "
            "set etcd.sha256 to the release's published checksum"
        )
    return published


def _local(path: Path, wanted: Version | None, pin: str | None, cache: Path) -> Release:
    if path.is_dir():
        if (path / "etcd").is_file():
            return _pack_dir(path, cache)
        if wanted is None:
            raise BinaryError(
                f"etcd.release {path}: a directory of tarballs needs etcd.version to pick one"
            )
        path = path / tarball_name(wanted)
    if not path.is_file():
        raise BinaryError(f"etcd.release {path}: no such file; fix etcd.release")
    version = _version_from_name(path.name, str(path))
    digest = file_sha256(path)
    expected = pin.lower() if pin else None
    sums = path.with_name("SHA256SUMS")
    if expected is None and sums.is_file():
        expected = parse_sums(sums.read_text(), path.name)
    if expected is not None and digest != expected:
        raise BinaryError(
            f"etcd.release {path}: sha256 {digest} does not match the expected {expected}; "
            "nothing was installed"
        )
    return Release(version, path, digest, str(path))


def _pack_dir(path: Path, cache: Path) -> Release:
    """An unpacked release becomes an (uncompressed) tarball in the official layout."""
    version = probe_version(path / "etcd")
    top = f"etcd-v{format_version(version)}-linux-amd64"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{top}.tar"
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{top}.")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w", dereference=True) as archive:
            for binary in BINARIES:
                if (path / binary).is_file():
                    archive.add(path / binary, f"{top}/{binary}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return Release(version, out, file_sha256(out), str(path))


def _check_binary(release: Release, cache: Path) -> None:
    """Run the tarball's etcd --version here once: a tarball's name must not lie."""
    binary = _extract(release, cache, ("etcd",)) / "etcd"
    actual = probe_version(binary)
    if actual != release.version:
        raise BinaryError(
            f"etcd.release {release.source}: named {release.tag} but its etcd is "
            f"{format_version(actual)}; use the real release tarball"
        )


def _extract(release: Release, cache: Path, names: tuple[str, ...]) -> Path:
    """Unpack `names` (those the tarball has; etcd is required) once into the cache."""
    directory = cache / "unpacked" / release.sha256[:16] / release.top_dir
    if all((directory / n).is_file() for n in names):
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(release.tarball) as archive:
            present = set(archive.getnames())
            for name in names:
                path = f"{release.top_dir}/{name}"
                if name == "etcd" or path in present:
                    archive.extract(archive.getmember(path), directory.parent, filter="data")
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise BinaryError(
            f"etcd.release {release.source}: not an etcd release tarball (no "
            f"{release.top_dir}/etcd inside: {exc})"
        ) from None
    return directory


def admin_tools(release: Release, cache: Path | None = None) -> Path:
    """The release's etcd, etcdctl and etcdutl unpacked on the admin machine (its directory):
    the hosts' own client tools, for work done here such as saving a snapshot."""
    return _extract(release, cache or cache_dir(), BINARIES)


# --- on a host ---------------------------------------------------------------------------------


def version_dir(paths: HostPathsSpec, release: Release) -> PurePosixPath:
    return PurePosixPath(paths.releases_dir) / release.tag


def installed_check(paths: HostPathsSpec, release: Release) -> list[str]:
    """Exits 0 when the release is unpacked whole: its marker names the tarball's sha256."""
    marker = version_dir(paths, release) / MARKER
    same = '[ "$(cat -- "$1" 2>/dev/null)" = "$2" ]'
    return ["sh", "-c", same, "sh", str(marker), release.sha256]


_UNPACK_SCRIPT = r"""
set -eu
tarball=$1 top=$2 final=$3 sum=$4
root=$(dirname -- "$final")
rm -rf -- "$root"/.unpack.*
work=$(mktemp -d "$root/.unpack.XXXXXX")
trap 'rm -rf -- "$work" "$tarball"' EXIT
trap 'exit 129' HUP INT TERM PIPE
tar -xf "$tarball" -C "$work" --no-same-owner --no-same-permissions
test -x "$work/$top/etcd" || { echo "no $top/etcd in the tarball" >&2; exit 5; }
chmod -R u=rwX,go=rX "$work/$top"
echo "$sum" > "$work/$top/.etcdforge-sha256"
if [ -e "$final" ]; then rm -rf -- "$final.broken"; mv -- "$final" "$final.broken"; fi
mv -- "$work/$top" "$final"
rm -rf -- "$final.broken"
"""


async def install(host: Host, paths: HostPathsSpec, release: Release) -> None:
    """Upload, unpack into `<releases_dir>/vX.Y.Z/`: the directory appears whole or not at all."""
    root = PurePosixPath(paths.releases_dir)
    await host.run(["install", "-d", "-m", "755", "-o", "root", "-g", "root", str(root)])
    incoming = root / f".incoming-{release.tarball.name}"
    await host.write_file(incoming, release.tarball.read_bytes(), 0o600)
    script = ["sh", "-c", _UNPACK_SCRIPT, "sh"]
    args = [str(incoming), release.top_dir, str(version_dir(paths, release)), release.sha256]
    await host.run([*script, *args], timeout=300)


def current_check(paths: HostPathsSpec) -> list[str]:
    """Exits 0 when the stable path `<releases_dir>/current` exists (names some release)."""
    return ["readlink", str(PurePosixPath(paths.releases_dir) / "current")]


async def current_version(host: Host, paths: HostPathsSpec) -> str | None:
    """The tag the stable path points at now (`v3.5.17`), or None."""
    result = await host.run(current_check(paths), check=False)
    return result.out.strip() or None if result.code == 0 else None


def _links(paths: HostPathsSpec) -> list[tuple[str, str]]:
    current = PurePosixPath(paths.releases_dir) / "current"
    return [(str(PurePosixPath(paths.bin_dir) / b), str(current / b)) for b in BINARIES]


def links_check(paths: HostPathsSpec) -> list[str]:
    """Exits 0 when `<bin_dir>/etcd{,ctl,utl}` point through `<releases_dir>/current`."""
    checks = " && ".join(
        f'[ "$(readlink {shlex.quote(link)})" = {shlex.quote(target)} ]'
        for link, target in _links(paths)
    )
    return ["sh", "-c", checks]


_SWAP_LINK = 'set -eu; ln -sfn -- "$1" "$2.tmp"; mv -Tf -- "$2.tmp" "$2"'


async def link_bins(host: Host, paths: HostPathsSpec) -> None:
    """Point `<bin_dir>/etcd{,ctl,utl}` through `current`: done once, never per version."""
    await host.run(["install", "-d", "-m", "755", str(paths.bin_dir)])
    for link, target in _links(paths):
        result = await host.run(["sh", "-c", _SWAP_LINK, "sh", target, link], check=False)
        if result.code != 0:
            raise HostError(
                f"{host.label}: cannot link {link} to {target}: {last_line(result.err)}; "
                "check host_paths.bin_dir"
            )


async def point_current(host: Host, paths: HostPathsSpec, tag: str) -> None:
    """Switch the member to the installed release `tag` (`v3.5.17`): one atomic rename of a
    symlink, so a start sees the old release or the new one, never neither. The member picks
    it up on its next start; the other versions stay installed beside it."""
    current = PurePosixPath(paths.releases_dir) / "current"
    await host.run(["sh", "-c", _SWAP_LINK, "sh", tag, str(current)])


async def our_links(host: Host, paths: HostPathsSpec) -> list[str]:
    """The links in bin_dir that point into our releases (others' binaries are left alone)."""
    found = []
    for link, target in _links(paths):
        result = await host.run(["readlink", link], check=False)
        if result.code == 0 and result.out.strip() == target:
            found.append(link)
    return found


async def remove_links(host: Host, paths: HostPathsSpec) -> None:
    for link in await our_links(host, paths):
        await host.run(["rm", "-f", "--", link])
