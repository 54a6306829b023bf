"""Each uploader's own habits: a per-user tag prior from the training shards, an optional term of the tagging score.

    python -m im2vec.eval.user_prior build CKPT [--shards 'train-*.tar' …] [--out user_prior.pt]

The score (shared/DESIGN.md, "Scoring", plus one term):

    s(t | x, user) = v_t·u + γ·log count(t) + λ·b(user, t)
    b(user, t)     = log p̃(t | user) − log p(t)
    p̃(t | user)    = (n_ut + μ·p(t)) / (n_u + μ)

n_ut: the user's training images carrying tag t; n_u = Σ_t n_ut (every in-vocabulary tag of theirs, the
ones cut by ``max_tags_per_user`` included); p(t) = c_t / Σc, the same count over every training image
(uploader known or not). b is the difference to the global prior, not log p̃ itself: an uploader never
seen in training (n_u = 0) has p̃ = p, so b = 0 exactly and the score is the plain one, whatever λ, and
γ keeps the meaning it was validated with. (With log p̃ alone the term would add λ·log p(t) = λ·log c_t −
const for an unknown user: a re-weighting of γ to γ + λ.) Computed as b = log(μ + n_ut/p(t)) − log(n_u + μ),
n_ut/p(t) taken as 0 where n_ut = 0, so a tag with no training count (p = 0) is no division by zero; every
tag the user did not use gets the same b = log μ − log(n_u + μ), which shifts all of that image's scores
alike and moves no ranking: what moves a ranking is log(1 + n_ut/(μ·p(t))) on the user's own tags.

μ (pseudo-counts of the global prior mixed into each user's counts) and λ are chosen on the validation split by
``choose_lambda``: at the end of training (``user_prior=auto``, im2vec/train/training.py), or by
``python -m im2vec.bench.user_prior CKPT --beside``; ``--mu`` here sets the default stored with the counts.

Storage (one ``torch.save`` file, read with ``weights_only``): like CSR, per user a slice of ``tag_ids`` (int32,
ascending) and ``counts`` (int32), ``offsets`` (int64, U + 1), ``totals`` n_u (int64), the users' names sorted, and
the global counts (int64, V). At most ``max_tags_per_user`` (id, count) pairs a user, the most frequent kept (ties:
the smaller id): 8 bytes a pair, 16 a user besides, and the name.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from im2vec.data.samples import META_ERRORS, read_meta
from im2vec.data.shards import expand_shards, user_of
from im2vec.errors import BadValue, NotFound, UserError, make, one_line
from im2vec.eval.ranking import TagRanks, rank_tags

FORMAT = "im2vec-user-prior/1"
MAX_TAGS_PER_USER = 4096
MU = 100.0  # the default pseudo-count; bench.user_prior chooses μ and λ on validation
LAMBDAS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # the grid λ and μ are chosen from (choose_lambda)
MUS = (1.0, 10.0, 100.0, 1000.0)


def count_shards(shards: list[str], index: dict[str, int]) -> tuple[dict[str, Counter], Counter, int]:
    """({user: Counter(tag id -> images)}, Counter(tag id -> images over all images), images read) over the
    shards' json members; a tag counts once an image (as the vocabulary's counts), unknown tags are dropped."""
    per_user: dict[str, Counter] = {}
    glob, images = Counter(), 0
    for url in shards:
        try:
            with tarfile.open(url, "r|*") as tar:
                for member in tar:
                    if not member.name.endswith(".json"):
                        continue
                    try:
                        meta = read_meta({"json": tar.extractfile(member).read()})
                        ids = {index[t] for t in meta["tags"] if isinstance(t, str) and t in index}
                        user = user_of(meta)
                    except (*META_ERRORS, AttributeError):
                        continue  # the loader counts such samples (bad_meta) when it meets them
                    images += 1
                    glob.update(ids)
                    if user and ids:
                        per_user.setdefault(user, Counter()).update(ids)
        except (OSError, tarfile.TarError, EOFError):
            pass  # a truncated shard: what was read counts
    return per_user, glob, images


@dataclass
class UserPrior:
    users: list[str]  # sorted
    offsets: Tensor  # (U + 1,) int64: user i's pairs are [offsets[i], offsets[i + 1])
    tag_ids: Tensor  # (nnz,) int32, ascending within a user
    counts: Tensor  # (nnz,) int32: n_ut
    totals: Tensor  # (U,) int64: n_u (the cut tags included)
    global_counts: Tensor  # (V,) int64: c_t
    fingerprint: str = ""  # the tags' (im2vec.data.vocab.Vocabulary.fingerprint)
    max_tags_per_user: int = MAX_TAGS_PER_USER
    mu: float = MU
    lam: float | None = None  # λ chosen on validation (choose_lambda's auto_lam); None: not chosen

    @classmethod
    def build(cls, shards: list[str], tags: list[str], max_tags_per_user: int = MAX_TAGS_PER_USER, mu: float = MU,
              fingerprint: str = "") -> "UserPrior":
        if max_tags_per_user < 1:
            raise BadValue(f"--max-tags-per-user={max_tags_per_user}", "use 1 or more")
        per_user, glob, _ = count_shards(shards, {t: i for i, t in enumerate(tags)})
        users = sorted(per_user)
        offsets, ids, counts, totals = [0], [], [], []
        for user in users:
            c = per_user[user]
            kept = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:max_tags_per_user]  # the most frequent
            kept.sort()  # by id
            ids += [t for t, _ in kept]
            counts += [n for _, n in kept]
            offsets.append(len(ids))
            totals.append(sum(c.values()))
        gc = torch.zeros(len(tags), dtype=torch.int64)
        if glob:
            gc[torch.tensor(list(glob))] = torch.tensor(list(glob.values()), dtype=torch.int64)
        return cls(users, torch.tensor(offsets, dtype=torch.int64), torch.tensor(ids, dtype=torch.int32),
                   torch.tensor(counts, dtype=torch.int32), torch.tensor(totals, dtype=torch.int64), gc,
                   fingerprint, max_tags_per_user, float(mu))

    @property
    def num_tags(self) -> int:
        return int(self.global_counts.shape[0])

    def row(self, user: str) -> tuple[Tensor, Tensor, int] | None:
        """(tag ids, counts, n_u) of a user seen in training, else None."""
        i = _find(self.users, user)
        if i is None:
            return None
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.tag_ids[a:b], self.counts[a:b], int(self.totals[i])

    def term(self, user: str, mu: float | None = None) -> Tensor:
        """(V,) float32: b(user, t) for every tag (the module docstring); zeros for a user not seen in training."""
        mu = self.mu if mu is None else float(mu)
        if not mu > 0:
            raise BadValue(f"user prior: μ = {mu}", "use a positive pseudo-count")
        r = self.row(user)
        if r is None:
            return torch.zeros(self.num_tags)
        ids, n, n_u = r
        total = float(self.global_counts.sum())
        b = torch.full((self.num_tags,), math.log(mu) - math.log(n_u + mu), dtype=torch.float64)
        p = self.global_counts[ids.long()].double() / total  # > 0: the user's own images are counted in it
        b[ids.long()] = torch.log(mu + n.double() / p) - math.log(n_u + mu)
        return b.float()

    def terms(self, users: list[str], mu: float | None = None) -> tuple[Tensor, Tensor]:
        """(B (G, V) one row per distinct user, (N,) the row of each image's user)."""
        names = sorted(set(users))
        where = {u: j for j, u in enumerate(names)}
        return (torch.stack([self.term(u, mu) for u in names]) if names else torch.zeros(0, self.num_tags),
                torch.tensor([where[u] for u in users], dtype=torch.long))

    def nbytes(self, user: str) -> int:
        """Bytes that one user takes in the stored tensors (pairs, offset, total; the name besides)."""
        r = self.row(user)
        return 0 if r is None else r[0].numel() * 4 + r[1].numel() * 4 + 8 + 8

    def save(self, path: str | Path) -> None:
        torch.save({"format": FORMAT, "users": self.users, "offsets": self.offsets, "tag_ids": self.tag_ids,
                    "counts": self.counts, "totals": self.totals, "global_counts": self.global_counts,
                    "fingerprint": self.fingerprint, "max_tags_per_user": self.max_tags_per_user, "mu": self.mu,
                    "lam": self.lam}, path)

    @classmethod
    def load(cls, path: str | Path) -> "UserPrior":
        if not Path(path).is_file():
            raise NotFound(f"user prior: no file {path}", "build it: python -m im2vec.eval.user_prior build CKPT")
        d = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise BadValue(f"user prior: {path} is not a user prior file ({FORMAT})",
                           "build it: python -m im2vec.eval.user_prior build CKPT")
        return cls(list(d["users"]), d["offsets"], d["tag_ids"], d["counts"], d["totals"], d["global_counts"],
                   d["fingerprint"], int(d["max_tags_per_user"]), float(d["mu"]), d["lam"])


def _find(users: list[str], user: str) -> int | None:
    import bisect

    i = bisect.bisect_left(users, user)
    return i if user and i < len(users) and users[i] == user else None


def user_scores(u: Tensor, table: Tensor, log_counts: Tensor, gamma: float, users: list[str] | None = None,
                prior: UserPrior | None = None, lam: float = 0.0, mu: float | None = None) -> Tensor:
    """(N, V) s(t | x, user) for small V and N (tests, a few images): v_t·u + γ·log count(t) + λ·b(user, t).
    λ = 0, no prior or no users: exactly the plain score."""
    s = u.float() @ table.float().t() + gamma * log_counts.float()
    if lam == 0 or prior is None or users is None:
        return s
    b, row = prior.terms(users, mu)
    return s + lam * b[row]


def rank_with_users(u: Tensor, table: Tensor, log_counts: Tensor, gamma: float, truths: list[Tensor],
                    users: list[str], prior: UserPrior | None, lam: float, mu: float | None = None,
                    kmax: int = 10) -> TagRanks:
    """The project's exact ranking (im2vec/eval/ranking.py: ties, mAP, per-tag figures from the result) under
    s(t | x, user): one rank_tags pass for the images of each user seen in training, with γ·log count(t) +
    λ·b(user, ·) as the tags' shared term, and one for all the others (b = 0: the plain scores). λ = 0 or no
    prior: a single plain pass, the same call evaluation makes."""
    if lam == 0 or prior is None:
        return rank_tags(u, table, log_counts, gamma, truths, kmax=kmax)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(users):
        groups.setdefault(name if _find(prior.users, name) is not None else "", []).append(i)
    parts, order = [], []
    for name, idx in groups.items():
        ix = torch.tensor(idx)
        sub = [t[ix] for t in truths]
        if name == "":
            r = rank_tags(u[ix], table, log_counts, gamma, sub, kmax=kmax)
        else:
            shared = gamma * log_counts.float() + lam * prior.term(name, mu)
            r = rank_tags(u[ix], table, shared, 1.0, sub, kmax=kmax)
        parts.append(r)
        order += idx
    back = torch.argsort(torch.tensor(order))
    cat = lambda xs: torch.cat(xs)[back]  # noqa: E731
    return TagRanks(cat([r.top_ids for r in parts]), list(truths),
                    [cat([r.n_gt[j] for r in parts]) for j in range(len(truths))],
                    [cat([r.n_ge[j] for r in parts]) for j in range(len(truths))],
                    [cat([r.true_scores[j] for r in parts]) for j in range(len(truths))],
                    cat([r.top_scores for r in parts]))


def checkpoint_data(ckpt: str | Path) -> tuple[list[str], dict | None]:
    """(tags, recorded data settings) of a training checkpoint file, read without the model."""
    if not Path(ckpt).is_file():
        raise NotFound(f"user prior: no checkpoint file {ckpt}", "give a .ckpt written by train.py")
    meta = torch.load(ckpt, map_location="cpu", weights_only=True).get("im2vec")
    if not isinstance(meta, dict) or "tags" not in meta:
        raise BadValue(f"user prior: {ckpt} is not an im2vec training checkpoint", "give a .ckpt written by train.py")
    return list(meta["tags"]), meta.get("data")


def build_for_checkpoint(ckpt: str | Path, shards: list[str] | None = None, out: str | Path | None = None,
                         max_tags_per_user: int = MAX_TAGS_PER_USER, mu: float = MU) -> tuple[UserPrior, Path]:
    """The checkpoint's own training shards (or ``shards``) counted in its vocabulary, saved to ``out``
    (default: user_prior.pt beside the checkpoint)."""
    tags, data = checkpoint_data(ckpt)
    if shards:
        files = [f for s in shards for f in expand_shards(s)]
    elif data and data.get("train_shards"):  # the shards' pattern as recorded (any layout of the package)
        files = expand_shards(data["train_shards"])
    elif data:  # the built-in corpus: its datamodule finds (or generates) the shards
        files = make(data).train_shards
    else:
        raise BadValue(f"user prior: {ckpt} records no data settings", "give the training shards: --shards …")
    if not files:
        raise NotFound("user prior: no training shards", "give them: --shards 'train-*.tar'")
    prior = build_beside(files, tags, Path(ckpt), max_tags_per_user, mu)
    out = Path(out) if out else Path(ckpt).with_name("user_prior.pt")
    prior.save(out)
    return prior, out


def build_beside(files: list[str], tags: list[str], ckpt: Path, max_tags_per_user: int = MAX_TAGS_PER_USER,
                 mu: float = MU) -> UserPrior:
    """The counts of ``files`` in the vocabulary ``tags`` (a checkpoint's), with the tags' fingerprint."""
    import hashlib

    fp = hashlib.sha1("\n".join(tags).encode()).hexdigest()[:16]
    return UserPrior.build(files, tags, max_tags_per_user, mu, fp)


def held_out_of(dm) -> tuple[list[str], list[str], set[str] | None]:
    """(validation image shards, test image shards, content tags or None) of a data module. Frozen-trunk features
    (a ``manifest``): the validation images are the ones its val/ features were extracted from."""
    val = list(dm.val_shards)
    if val and getattr(dm, "manifest", None) is not None:
        val = list(json.loads((Path(val[0]).parent / "features.json").read_text(encoding="utf-8"))["source_shards"])
    return val, list(dm.test_shards or []), dm.content_tags


def split_shards(data: dict) -> tuple[list[str], list[str], set[str] | None]:
    """(validation shards, test shards, content tags or None) a checkpoint's recorded data settings name."""
    if data.get("val_shards"):
        path = data.get("content_tags_path")
        content = set(Path(path).read_text(encoding="utf-8").split()) if path and Path(path).is_file() else None
        return expand_shards(data["val_shards"]), expand_shards(data.get("test_shards") or []), content
    return held_out_of(make(data))


def grid_p5(data: dict, model, prior: UserPrior, lambdas, mus, by: str = "precision@5",
            noise_ids=None, gamma: float | None = None) -> tuple[list[tuple[float, float]], Tensor]:
    """([(λ, μ)], (N, G)) every setting's per-image criterion ``by`` on one split's images (eval/validation.py's
    per_image: precision@5, or where the images have clean tags clean_minus_noise@5, γ's criterion there)."""
    from im2vec.eval.scoring import topk_by_index
    from im2vec.eval.validation import per_image

    plain = user_scores(data["u"][0], model.table, model.log_counts, model.gamma if gamma is None else gamma)  # (N, V)
    settings, cols = [], []
    for mu in mus:
        b, row = prior.terms(data["users"], mu)
        for lam in lambdas:
            settings.append((lam, mu))
            top = topk_by_index(plain if lam == 0 else plain + lam * b[row], 5)[1]
            cols.append(per_image(by, top, data["obs"], data["clean"], noise_ids))
    return settings, torch.stack(cols, 1)


def choose_lambda(model, prior: UserPrior, val: dict, content: set[str] | None, lambdas=LAMBDAS, mus=MUS,
                  by: str = "auto", gammas=()) -> dict:
    """λ and μ chosen on the validation images ``val`` (heldout.embed_shards's): the grid's best (ties: the smaller
    λ), and ``auto_lam``, the λ kept: the chosen one where the paired 90 % bootstrap interval over uploaders of its
    gain over λ = 0 lies above 0, else 0. ``gammas``: γ chosen with them (``val_gamma``; ties: the checkpoint's),
    the gain still against λ = 0 at the checkpoint's γ."""
    from im2vec.eval.heldout import noise_ids_for
    from im2vec.eval.intervals import bootstrap_means, choose, interval
    from im2vec.tags import PAD

    noise_ids = noise_ids_for(model.tags, content)
    if by == "auto":  # as γ's: where the images have clean tags, what describes the picture; else observed P@5
        by = "clean_minus_noise@5" if content is not None and bool((val["clean"] != PAD).any()) else "precision@5"
    settings, cols = [], []
    for g in [model.gamma] + [g for g in gammas if g != model.gamma]:
        s, c = grid_p5(val, model, prior, lambdas, mus, by, noise_ids, g)
        settings, cols = settings + [(lam, mu, g) for lam, mu in s], cols + [c]
    cols = torch.cat(cols, 1)
    point = torch.nanmean(cols, 0)
    boot = bootstrap_means(cols, val["users"], val["keys"])
    best, _ = choose([lam for lam, _, _ in settings], point, boot, "best")
    lam, mu, g = settings[best]
    lo, hi = interval(boot[:, best : best + 1] - boot[:, :1])  # the chosen against λ = 0 (the first column)
    return {"by": by, "lam": lam, "mu": mu, "auto_lam": lam if float(lo) > 0 else 0.0, "val_gamma": g,
            "val_gain": float(point[best] - point[0]), "val_gain_lo": float(lo), "val_gain_hi": float(hi),
            "val_p5": {f"{a:g}/{b:g}" + (f"/{c:g}" if gammas else ""): float(p)
                       for (a, b, c), p in zip(settings, point)}}


# user_prior=auto at the end of training (im2vec/train/training.py) builds only below these; true builds anyway
AUTO_MAX_IMAGES = 2_000_000  # training images, from the ingest's .stats.json (one process: ~6,500 a second, ~5 min)
AUTO_MAX_BYTES = 20 << 30  # training shards' bytes, where a shard has no .stats.json (the count reads every byte)
AUTO_MAX_SCORES = 1 << 28  # validation images × tags: the choice holds a few (N, V) float32 score matrices


def why_not_auto(train_shards: list[str], val_shards: list[str], num_tags: int) -> str | None:
    """Why user_prior=auto does not build at the end of training (None: it builds): no uploaders named in the
    training shards' .stats.json, or a split too large for one process."""
    from im2vec.data.ingest import stats_name
    from im2vec.data.shards import shard_sizes

    stats = [stats_name(Path(s)) for s in train_shards]
    if all(p.is_file() for p in stats) and not any(json.loads(p.read_text(encoding="utf-8")).get("users", 1)
                                                    for p in stats):
        return "the training shards name no uploader (their .stats.json)"
    later = "; build it with python -m im2vec.eval.user_prior build CKPT, then python -m im2vec.bench.user_prior " \
            "CKPT --beside (or user_prior=true)"
    sizes = shard_sizes(train_shards)
    if sizes and sum(sizes) > AUTO_MAX_IMAGES:
        return f"{sum(sizes):,} training images (.stats.json) > {AUTO_MAX_IMAGES:,} for a one-process count{later}"
    size = sum(Path(s).stat().st_size for s in train_shards if Path(s).is_file())
    if not sizes and size > AUTO_MAX_BYTES:
        return f"{size:,} bytes of training shards > {AUTO_MAX_BYTES:,} for a one-process count{later}"
    val = shard_sizes(val_shards)
    if val and sum(val) * num_tags > AUTO_MAX_SCORES:
        return f"{sum(val):,} validation images × {num_tags:,} tags > {AUTO_MAX_SCORES:,} scores in one process{later}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m im2vec.eval.user_prior", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="count each uploader's tags in a checkpoint's training shards")
    b.add_argument("checkpoint")
    b.add_argument("--shards", nargs="*", default=None, help="training shards (default: the checkpoint's own)")
    b.add_argument("--out", default=None, help="the file (default: user_prior.pt beside the checkpoint)")
    b.add_argument("--max-tags-per-user", type=int, default=MAX_TAGS_PER_USER)
    b.add_argument("--mu", type=float, default=MU, help="the default pseudo-count stored (default: %(default)s)")
    a = p.parse_args(argv)
    try:
        prior, out = build_for_checkpoint(a.checkpoint, a.shards, a.out, a.max_tags_per_user, a.mu)
    except UserError as e:
        print(f"im2vec.eval.user_prior: {one_line(e)}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(out), "users": len(prior.users), "pairs": int(prior.tag_ids.numel()),
                      "tags": prior.num_tags, "bytes": out.stat().st_size,
                      "max_tags_per_user": prior.max_tags_per_user, "mu": prior.mu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
