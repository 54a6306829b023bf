"""npm packages as data sources for the real collections (``emoji``, ``openmoji``): fetched once, read as files.

Several emoji sets are published on npm with their pictures and annotations inside. ``npm pack``
downloads a package's tarball without installing anything (no scripts run, no ``node_modules``);
only the files a builder reads are then taken out of it, with Python's ``tarfile``. Both steps are
skipped when their result is already there, so a builder run again downloads and unpacks nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

from im2vec.errors import NotFound, UserError

_DONE = ".extracted"  # written last: an interrupted extraction is done again


def fetch(name: str, version: str, work: Path, keep: tuple[str, ...]) -> Path:
    """``name@version`` packed into ``work`` (once) and its files under the ``keep`` prefixes (paths in the
    tarball, e.g. ``package/emoji.json``) unpacked into ``work/name``; returns ``work/name/package``."""
    dest = Path(work) / name
    if (dest / _DONE).is_file():
        return dest / "package"
    tgz = Path(work) / f"{name}-{version}.tgz"  # npm pack's file name for an unscoped package
    if not tgz.is_file():
        if shutil.which("npm") is None:
            raise NotFound(f"{name}: npm not found", "install Node.js's npm, or pass --source with the "
                           "unpacked packages")
        tgz.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", f"{name}@{version}"], cwd=tgz.parent, capture_output=True, text=True)
        if done.returncode != 0 or not tgz.is_file():
            raise UserError(f"{name}: 'npm pack {name}@{version}' failed ({done.stderr.strip()[-300:]})",
                            "check the network, or pass --source with the unpacked packages")
    shutil.rmtree(dest, ignore_errors=True)
    with tarfile.open(tgz) as tar:
        # plain files only, none leading out of dest: a tarball is input from elsewhere
        files = [m for m in tar if m.isfile() and m.name.startswith(keep) and ".." not in m.name.split("/")]
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=files, **extra)
    (dest / _DONE).write_text(f"{name}@{version}\n")
    return dest / "package"


def find(source: Path, name: str, version: str) -> Path:
    """An unpacked package in ``source``: ``source/name/package`` (what ``fetch`` writes) or
    ``source/name-version/package`` (a tarball unpacked by hand beside others)."""
    for folder in (Path(source) / name, Path(source) / f"{name}-{version}"):
        if (folder / "package").is_dir():
            return folder / "package"
    raise NotFound(f"{name}: {source} has no {name}/package folder",
                   f"pass --source with the unpacked npm package {name}@{version} in it")
