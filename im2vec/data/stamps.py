"""What identifies an input file's content, so that a resumed ingest can refuse a changed input:
size, mtime, a hash of its first and last MiB and, up to FULL_HASH_BYTES, of all of it."""

from __future__ import annotations

import hashlib
from pathlib import Path

MIB = 1 << 20
FULL_HASH_BYTES = 1 << 30  # inputs up to this size are hashed whole; larger ones by their first and last MiB


def input_stamp(path: str | Path) -> dict:
    """What identifies an input file's content: size, mtime, a hash of its first and last MiB and,
    up to FULL_HASH_BYTES, of all of it."""
    stamp = _light_stamp(path)
    if stamp["size"] <= FULL_HASH_BYTES:
        stamp["full"] = _full_hash(path)
    return stamp


def _light_stamp(path: str | Path) -> dict:
    st = Path(path).stat()
    with open(path, "rb") as f:
        head = f.read(MIB)
        f.seek(max(0, st.st_size - MIB))
        tail = f.read(MIB)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ends": hashlib.blake2b(head + b"\0" + tail, digest_size=16).hexdigest()}


def _full_hash(path: str | Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def input_changed(path: str | Path, stamp: dict) -> str | None:
    """Why ``path`` is not the file ``stamp`` describes, or None. A file whose time alone changed
    (touched, copied with its content) is compared by its full hash where one was recorded; a larger
    one whose time changed is taken as changed (its middle cannot be checked cheaply)."""
    now = _light_stamp(path)
    if now["size"] != stamp["size"]:
        return f"{stamp['size']:,} bytes then, {now['size']:,} now"
    if now["ends"] != stamp["ends"]:
        return "its first or last MiB differs"
    if now["mtime_ns"] != stamp["mtime_ns"]:
        if "full" not in stamp:
            return "modified since (its time changed, and it is too large to hash whole)"
        if _full_hash(path) != stamp["full"]:
            return "its content differs"
    return None
