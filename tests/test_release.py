"""Release tarballs: download over real HTTP on loopback, sha256 checks, the cache, local files."""

from __future__ import annotations

from pathlib import Path

import pytest

from etcdforge import release
from etcdforge.binaries import parse_version
from etcdforge.errors import BinaryError
from etcdforge.fsutil import file_sha256
from etcdforge.spec import EtcdSpec
from tests.apply_helpers import ReleaseServer, build_tarball, publish, release_sources, serve
from tests.helpers import DEBIAN_RELEASES, release_dir, require_tarball


def test_url_is_downloaded_verified_against_sha256sums_and_cached(
    release_server: ReleaseServer, tmp_path: Path
) -> None:
    spec = EtcdSpec(release=release_server.url("3.5.1"))
    first = release.resolve(spec, tmp_path, cache=tmp_path / "cache")
    assert first.version == (3, 5, 1)
    assert first.tarball.parent == tmp_path / "cache"
    assert first.sha256 == file_sha256(first.tarball)
    fetched = list(release_server.requests)
    assert any(r.endswith("/SHA256SUMS") for r in fetched)
    again = release.resolve(spec, tmp_path, cache=tmp_path / "cache")
    assert again == first
    assert release_server.requests == fetched  # the cache answered; nothing downloaded


def test_pinned_sha256_is_enough_and_must_match(
    release_server: ReleaseServer, etcd_releases: dict[str, Path], tmp_path: Path
) -> None:
    good = file_sha256(etcd_releases["3.4.23"])
    spec = EtcdSpec(release=release_server.url("3.4.23"), sha256=good)
    assert release.resolve(spec, tmp_path, cache=tmp_path / "a").version == (3, 4, 23)
    bad = EtcdSpec(release=release_server.url("3.4.23"), sha256="0" * 64)
    with pytest.raises(BinaryError, match=r"disagrees with .*SHA256SUMS"):
        release.resolve(bad, tmp_path, cache=tmp_path / "b")
    assert not list((tmp_path / "b").glob("etcd-*"))


def test_wrong_checksum_download_is_refused_and_not_cached(
    etcd_releases: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "www"
    publish(root, "3.5.1", etcd_releases["3.5.1"], sums="ab" * 32)  # a lying SHA256SUMS
    cache = tmp_path / "cache"
    with serve(root) as server:
        spec = EtcdSpec(release=server.url("3.5.1"))
        with pytest.raises(BinaryError, match=r"does not match the expected abab.*nothing was"):
            release.resolve(spec, tmp_path, cache=cache)
    assert [p.name for p in cache.iterdir()] == []  # no tarball, no temp file


def test_no_checksum_anywhere_is_refused(etcd_releases: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "www" / "v3.5.1"
    root.mkdir(parents=True)
    (root / etcd_releases["3.5.1"].name).write_bytes(etcd_releases["3.5.1"].read_bytes())
    with serve(tmp_path / "www") as server:
        spec = EtcdSpec(release=server.url("3.5.1"))
        with pytest.raises(BinaryError, match=r"no etcd.sha256 pin and no entry"):
            release.resolve(spec, tmp_path, cache=tmp_path / "cache")


def test_missing_url_names_the_status(release_server: ReleaseServer, tmp_path: Path) -> None:
    spec = EtcdSpec(release=release_server.url("3.5.9"), sha256="0" * 64)
    with pytest.raises(BinaryError, match=r"HTTP 404"):
        release.resolve(spec, tmp_path, cache=tmp_path / "cache")


def test_local_file_relative_to_the_spec_and_pin(
    etcd_releases: dict[str, Path], tmp_path: Path
) -> None:
    tarball = etcd_releases["3.4.23"]
    (tmp_path / tarball.name).write_bytes(tarball.read_bytes())
    found = release.resolve(EtcdSpec(release=tarball.name), tmp_path, cache=tmp_path / "c")
    assert found.tarball == tmp_path / tarball.name and found.version == (3, 4, 23)
    with pytest.raises(BinaryError, match=r"does not match the expected"):
        release.resolve(
            EtcdSpec(release=tarball.name, sha256="1" * 64), tmp_path, cache=tmp_path / "c"
        )


def test_directory_of_tarballs_needs_a_version(
    etcd_releases: dict[str, Path], tmp_path: Path
) -> None:
    directory = etcd_releases["3.5.1"].parent
    found = release.resolve(
        EtcdSpec(release=str(directory), version="3.4.23"), tmp_path, cache=tmp_path / "c"
    )
    assert found.tarball == etcd_releases["3.4.23"]
    with pytest.raises(BinaryError, match=r"needs etcd.version"):
        release.resolve(EtcdSpec(release=str(directory)), tmp_path, cache=tmp_path / "c")


def test_unpacked_release_directory_is_packed(tmp_path: Path) -> None:
    source = tmp_path / "unpacked"
    source.mkdir()
    for binary in release_sources()["3.4.23"]:
        (source / binary.name).symlink_to(binary)
    found = release.resolve(EtcdSpec(release=str(source)), tmp_path, cache=tmp_path / "c")
    assert found.version == (3, 4, 23)
    assert found.tarball.name == "etcd-v3.4.23-linux-amd64.tar"


@pytest.mark.parametrize("version", DEBIAN_RELEASES)
def test_debian_built_release_has_the_official_layout(
    release_server: ReleaseServer, version: str, tmp_path: Path
) -> None:
    """test-env's repacked Debian builds pass for real releases, as a URL and unpacked."""
    tarball = require_tarball(version)
    wanted = parse_version(version)
    served = release.resolve(
        EtcdSpec(release=release_server.url(version)), tmp_path, tmp_path / "a"
    )
    assert served.version == wanted and served.sha256 == file_sha256(tarball)
    tools = release.admin_tools(served, tmp_path / "a")
    assert tools.name == f"etcd-v{version}-linux-amd64"
    assert sorted(p.name for p in tools.iterdir()) == ["etcd", "etcdctl", "etcdutl"]
    unpacked = EtcdSpec(release=str(release_dir(version)), version=version)
    assert release.resolve(unpacked, tmp_path, cache=tmp_path / "b").version == wanted


def test_a_tarball_whose_name_lies_is_refused(tmp_path: Path) -> None:
    liar = build_tarball(tmp_path, "3.5.1", release_sources()["3.4.23"])  # 3.4.23 inside
    with pytest.raises(BinaryError, match=r"named v3.5.1 but its etcd is 3.4.23"):
        release.resolve(EtcdSpec(release=str(liar)), tmp_path, cache=tmp_path / "c")


def test_version_and_release_must_agree(etcd_releases: dict[str, Path], tmp_path: Path) -> None:
    spec = EtcdSpec(release=str(etcd_releases["3.5.1"]), version="3.4.23")
    with pytest.raises(BinaryError, match=r"is etcd 3.5.1 but etcd.version says 3.4.23"):
        release.resolve(spec, tmp_path, cache=tmp_path / "c")


def test_a_version_alone_means_the_official_url() -> None:
    assert release.OFFICIAL_URL.format(v="3.5.17") == (
        "https://github.com/etcd-io/etcd/releases/download/v3.5.17/etcd-v3.5.17-linux-amd64.tar.gz"
    )
    with pytest.raises(BinaryError, match=r"etcd.version or etcd.release is required"):
        release.resolve(EtcdSpec(), Path("/"))


def test_sha256sums_parsing() -> None:
    text = "aa  etcd-v3.5.1-darwin-amd64.zip\nbb *etcd-v3.5.1-linux-amd64.tar.gz\n"
    assert release.parse_sums(text, "etcd-v3.5.1-linux-amd64.tar.gz") == "bb"
    assert release.parse_sums(text, "missing.tar.gz") is None
