"""What the web demo (im2vec.use.serve) serves, apart from HTTP: ``Demo`` holds the Tagger (with the per-uploader
prior and the visual tags file it may have loaded), the index of a folder and the limits; it makes the torch calls
(one at a time, under a lock), decodes uploads as ``read_image`` reads a file, checks tags (an unknown one with
suggestions by spelling), uploader names (suggested by prefix, at most ``MAX_USERS`` at a time: the prior may name
millions) and the index's files. A request it refuses raises ``ApiError`` (status and message), which the app
(im2vec.use.app) answers as JSON."""

from __future__ import annotations

import bisect
import difflib
import functools
import os
import threading
from pathlib import Path

from PIL import UnidentifiedImageError
from torch import Tensor

from im2vec.data.images import MAX_PIXELS, TooLarge, open_image
from im2vec.data.samples import eval_view, to_uint8_tensor
from im2vec.use.predict import Tagger, UnknownTag

MB = 1 << 20
MAX_K = 100  # tags or images per answer: enough for a page, small enough that no request is expensive
MAX_GAMMA = 10.0  # the page's slider goes to 4; validation sweeps 0..4
MAX_TAG_CHARS = 200
MAX_USER_CHARS = 200  # an uploader's name (YFCC's are NSIDs, "12345678@N00"; other collections' are names)
MAX_USERS = 20  # uploader names per suggestion list: a prefix search, never the prior's whole list


class ApiError(Exception):
    """A request the server refuses: answered ``status`` with {"error": message, **extra}."""

    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class Demo:
    """What the app serves: a Tagger, optionally an index of a folder, and the limits."""

    def __init__(self, tagger: Tagger, index: dict | None = None, index_path: str | None = None,
                 max_upload_mb: float = 20.0, max_pixels: int = MAX_PIXELS):
        self.tagger, self.index, self.index_path = tagger, index, index_path
        self.max_upload = int(max_upload_mb * MB)
        self.max_pixels = max_pixels
        self.lock = threading.Lock()  # one torch call at a time (see im2vec.use.serve's docstring)
        # decoding a large image takes memory (up to max_pixels × 3 bytes): a few at a time
        self.decoding = threading.BoundedSemaphore(max(2, usable_cores()))
        self.sorted_tags = sorted(tagger.tags)  # prefix suggestions by bisection
        self.by_length: dict[int, list[str]] = {}  # close spellings are of about the same length
        for t in tagger.tags:
            self.by_length.setdefault(len(t), []).append(t)
        # about a second per unknown tag at 600k tags (difflib): a typo asked again is answered from here
        self.suggestions = functools.lru_cache(maxsize=1024)(self._suggestions)
        if index is not None:
            self.root = Path(index["root"]).resolve()
            self.paths = frozenset(index["paths"])  # /images/ serves these and nothing else
            self.vectors = index["vectors"].float()

    # ---- the torch calls, each under the lock (run in the threadpool, never on the event loop)
    def tag_pixels(self, pixels: Tensor, k: int, gamma: float, user: str | None = None,
                   hide: bool = True) -> tuple[list[tuple[str, float]], int]:
        """(the k best tags, how many hidden tags scored above the last of them: those hiding skipped)."""
        with self.lock:
            u = self.tagger.embed(pixels[None])  # (1, d)
            tags = self.tagger.tag_vectors(u, k, gamma, user=user, hide=hide)[0]
            hidden = self.tagger.hidden_above(u, [tags[-1][1]], gamma, user=user)[0] if hide and tags else 0
        return tags, hidden

    def search(self, tag: str, k: int) -> list[dict]:
        with self.lock:
            hits = self.tagger.search(self.vectors, tag, k)
        return [{"path": self.index["paths"][i], "url": "/images/" + _quote(self.index["paths"][i]), "score": s}
                for i, s in hits]

    def similar(self, tag: str, k: int) -> list[tuple[str, float]]:
        with self.lock:
            return self.tagger.similar_tags(tag, k)

    # ---- requests -> checked values
    def decode(self, data: bytes) -> Tensor:
        """Uploaded bytes -> (3, S, S) uint8, as ``read_image`` reads a file."""
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        with self.decoding:
            try:
                return to_uint8_tensor(eval_view(open_image(data, self.max_pixels), self.tagger.image_size))
            except TooLarge as e:
                raise ApiError(413, f"the image is too large to decode ({e})") from None
            except UnidentifiedImageError:  # its message names a BytesIO object: nothing the user can act on
                raise ApiError(422, "not an image (no image format this server reads)") from None
            except Exception as e:  # noqa: BLE001 -- PIL raises many kinds on bad bytes (a truncated JPEG: OSError)
                raise ApiError(422, f"not a readable image ({type(e).__name__}: {e})") from None

    def known_tag(self, tag: str | None) -> str:
        """``tag`` if the vocabulary has it; else 404 with the tags nearest by spelling."""
        if tag is None or not tag.strip():
            raise ApiError(400, "give a tag: ?tag=...")
        if len(tag) > MAX_TAG_CHARS:
            raise ApiError(400, f"a tag is at most {MAX_TAG_CHARS} characters")
        try:
            self.tagger.row(tag)
            return tag
        except UnknownTag as e:
            raise ApiError(404, str(e), tag=tag, suggestions=list(self.suggestions(tag))) from None

    def known_user(self, user: str | None) -> str | None:
        """``user`` checked: None for no user (missing or blank); refused (400) when it is too long, or when no
        per-uploader prior is loaded (a user would change nothing: better said than ignored)."""
        if user is None or not user.strip():
            return None
        if len(user) > MAX_USER_CHARS:
            raise ApiError(400, f"a user name is at most {MAX_USER_CHARS} characters, got {len(user):,}")
        if self.tagger.user_prior is None:
            raise ApiError(400, "no per-uploader prior is loaded, so a user changes nothing: start the server with "
                                "--user-prior FILE (python -m im2vec.eval.user_prior build CKPT), or send no user")
        return user.strip()

    def users(self, prefix: str, limit: int = MAX_USERS) -> dict:
        """The prior's uploaders whose names start with ``prefix``, any case (at most ``limit``, in order), and whether
        more do: a bisection in the sorted names, never the whole list."""
        prior = self.tagger.user_prior
        if prior is None:
            raise ApiError(404, "no per-uploader prior is loaded: start the server with --user-prior FILE")
        if len(prefix) > MAX_USER_CHARS:
            raise ApiError(400, f"a user name is at most {MAX_USER_CHARS} characters, got {len(prefix):,}")
        keys, names = self.user_index
        key = prefix.casefold()
        i, out = bisect.bisect_left(keys, key), []
        while i < len(keys) and len(out) <= limit and keys[i].startswith(key):
            out.append(names[i])
            i += 1
        return {"prefix": prefix, "users": out[:limit], "more": len(out) > limit}

    @functools.cached_property
    def user_index(self) -> tuple[list[str], list[str]]:
        """(the prior's names casefolded and sorted, the names in that order): people type names in any case."""
        pairs = sorted((u.casefold(), u) for u in self.tagger.user_prior.users)
        return [k for k, _ in pairs], [u for _, u in pairs]

    def _suggestions(self, tag: str, n: int = 8) -> tuple[str, ...]:
        """Known tags for an unknown one: its normalized spelling, tags it begins, then close spellings."""
        q = tag.strip().lower()
        out = [q] if q in self.tagger.rows else []
        i = bisect.bisect_left(self.sorted_tags, q)
        while i < len(self.sorted_tags) and len(out) < n // 2 and self.sorted_tags[i].startswith(q):
            out.append(self.sorted_tags[i])
            i += 1
        # difflib compares with every candidate: only tags of about the same length can be close anyway
        w = max(2, len(q) // 3)
        near = [t for length in range(len(q) - w, len(q) + w + 1) for t in self.by_length.get(length, ())]
        out += difflib.get_close_matches(q, near, n=n, cutoff=0.6)
        return tuple(dict.fromkeys(out))[:n]  # cached: not to be changed by a caller

    def index_file(self, rel: str) -> Path:
        """The file behind /images/REL, or 404: REL must be listed in the index, and the file, once
        symlinks are resolved, must lie inside the index's folder."""
        if self.index is None or rel not in self.paths:
            raise ApiError(404, "no such image in the index")
        try:
            path = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError):  # missing since the index was built, or a symlink loop
            raise ApiError(404, "no such image in the index") from None
        if not path.is_relative_to(self.root) or not path.is_file():
            raise ApiError(404, "no such image in the index")
        return path

    def info(self) -> dict:
        t = self.tagger
        return {"checkpoint": str(t.path), "tags": len(t.tags), "dim": t.dim, "gamma": t.gamma,
                "image_size": t.image_size, "device": str(t.device), "index": self.index is not None,
                "index_path": self.index_path, "index_root": str(self.root) if self.index else None,
                "index_size": len(self.index["paths"]) if self.index else 0,
                "max_upload_mb": self.max_upload / MB, "max_k": MAX_K, "max_gamma": MAX_GAMMA,
                "user_prior": None if t.user_prior is None else {
                    "path": t.user_prior_path, "users": len(t.user_prior.users), "lambda": t.user_lam,
                    "max_user_chars": MAX_USER_CHARS},
                "visual_tags": None if t.visual_path is None else {
                    "path": t.visual_path, "nonvisual": len(t.nonvisual),
                    "hidden": t.num_hidden}}


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _quote(rel: str) -> str:
    from urllib.parse import quote

    return quote(rel, safe="/")
