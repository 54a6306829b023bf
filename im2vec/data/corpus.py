"""The embedded default corpus: a generated, YFCC-like set of tagged photos.

Content that tags describe (coloured objects of several shapes on textured scenes, each concept
named by several tags in several languages) plus the noise YFCC has: tags a user puts on all their
photos whatever they show, camera brands, years and months, generic junk, true tags missing,
random wrong tags and a Zipfian long tail. Every sample's json keeps its clean tags (all names
of the concepts really in the picture) beside the observed ones, so evaluation can say how much
of the noise the model learned to ignore.

Written once as webdataset shards + ``vocab.tsv`` into a cache directory keyed by the parameters.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from im2vec.data.vocab import Vocabulary

# concept -> names (en first, then de, es, others)
COLOURS = {
    "red": ["red", "rot", "rojo", "rouge"],
    "green": ["green", "grün", "verde", "vert"],
    "blue": ["blue", "blau", "azul", "bleu"],
    "yellow": ["yellow", "gelb", "amarillo", "jaune"],
    "purple": ["purple", "lila", "morado", "violet"],
    "orange": ["orange", "orangefarben", "naranja", "tangerine"],
}
RGB = {"red": (210, 30, 30), "green": (40, 190, 60), "blue": (30, 60, 220),
       "yellow": (240, 220, 30), "purple": (140, 40, 170), "orange": (250, 140, 20)}
SHAPES = {
    "circle": ["circle", "kreis", "círculo", "round"],
    "square": ["square", "quadrat", "cuadrado", "box"],
    "triangle": ["triangle", "dreieck", "triángulo", "pyramid"],
    "star": ["star", "stern", "estrella", "starshape"],
    "cross": ["cross", "kreuz", "cruz", "plus"],
    "ring": ["ring", "donut", "anillo", "hoop"],
}
SCENES = {
    "water": ["water", "wasser", "agua", "sea"],
    "grass": ["grass", "gras", "hierba", "meadow"],
    "sand": ["sand", "strand", "arena", "beach"],
    "snow": ["snow", "schnee", "nieve", "winter"],
    "brick": ["brick", "ziegel", "ladrillo", "wall"],
    "sky": ["sky", "himmel", "cielo", "clouds"],
}
CAMERAS = [["canon", "eos"], ["nikon", "d90"], ["sony", "alpha"], ["iphone", "apple"],
           ["olympus"], ["fujifilm", "xt1"], ["panasonic", "lumix"], ["samsung"]]
# generic junk: YFCC's most frequent tags sit on a few percent of photos each
JUNK = {"photo": 0.12, "flickr": 0.07, "nature": 0.05, "instagram": 0.04, "iphoneography": 0.02,
        "hdr": 0.03, "nofilter": 0.02, "pic": 0.03, "upload": 0.03, "explore": 0.04}
MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august",
          "september", "october", "november", "december"]
SYLLABLES = ["ka", "lo", "mi", "ra", "tu", "ve", "zo", "ni", "sa", "po", "da", "el", "fu", "gi", "ho", "ju"]


def content_tags() -> list[str]:
    """Every tag that names real content; all other tags of the corpus are noise."""
    return [n for group in (COLOURS, SHAPES, SCENES) for names in group.values() for n in names]


@dataclass
class CorpusSpec:
    num_train: int = 6000  # training photos
    num_val: int = 600  # validation photos (their own users: γ is chosen on unseen uploaders)
    num_test: int = 600  # test photos (a third set of users, seen by neither: what evaluate.py reports)
    image_size: int = 64  # stored side in pixels
    num_users: int = 150
    tail_size: int = 20000  # distinct long-tail tags the Zipf draws come from (up to ~600k)
    tail_per_image: float = 2.0  # mean number of long-tail tags per photo (Poisson)
    tail_exponent: float = 1.05  # Zipf exponent of the tail; lower = flatter = more distinct tags
    p_missing: float = 0.25  # chance a present concept is not tagged at all
    p_wrong: float = 0.15  # chance of one random wrong content tag
    shard_size: int = 2000
    seed: int = 0
    generator: int = 3  # bump when the generating code changes, so caches are not reused

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


def _pseudo_word(i: int) -> str:
    s, out = i, []
    while True:
        out.append(SYLLABLES[s % 16])
        s //= 16
        if s == 0:
            return "".join(out) + str(i % 7)


class _Users:
    def __init__(self, rng: np.random.Generator, n: int, offset: int):
        self.lang = rng.choice(4, size=n, p=[0.55, 0.2, 0.15, 0.1])  # index into the name lists
        self.camera = rng.integers(len(CAMERAS), size=n)
        self.p_camera = rng.uniform(0.0, 0.9, size=n)
        self.scene = rng.integers(len(SCENES), size=n)  # a favourite scene...
        self.p_scene = rng.uniform(0.0, 0.35, size=n)  # ...shot this often (their tags then hint at it)
        self.names = [f"user{offset + u}" for u in range(n)]
        self.personal = [[f"{self.names[u]}_{w}" for w in ("photos", "gear", "trip")[: rng.integers(1, 4)]]
                         for u in range(n)]
        self.p_personal = rng.uniform(0.4, 1.0, size=n)


def _texture(rng: np.random.Generator, scene: str, s: int) -> np.ndarray:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    noise = rng.normal(0, 1, (s, s)).astype(np.float32)
    if scene == "water":
        f = rng.uniform(0.3, 0.6)
        wave = np.sin(y * f + 2 * np.sin(x * 0.15 + rng.uniform(0, 6)))[..., None]
        img = np.array([30, 90, 170]) + wave * np.array([20, 30, 35]) + noise[..., None] * 6
    elif scene == "grass":
        strokes = np.repeat(rng.normal(0, 1, (1, s)), s, 0) * 0.6 + noise
        img = np.array([50, 125, 40]) + strokes[..., None] * np.array([10, 25, 8])
    elif scene == "sand":
        img = np.array([215, 190, 140]) + noise[..., None] * np.array([18, 16, 14])
    elif scene == "snow":
        img = np.array([236, 238, 246]) + noise[..., None] * 5 - (y / s)[..., None] * 25
    elif scene == "brick":
        row = (y // 8).astype(int)
        mortar = ((y % 8) < 1.5) | (((x + (row % 2) * 8) % 16) < 1.5)
        img = np.where(mortar[..., None], np.array([190, 185, 175]), np.array([150, 60, 40])) + noise[..., None] * 8
    else:  # sky: a gradient with soft clouds
        clouds = np.clip(np.sin(x * 0.1 + rng.uniform(0, 6)) * np.sin(y * 0.13 + rng.uniform(0, 6)), 0, 1)
        img = (np.array([110, 170, 235]) + (y / s)[..., None] * np.array([60, 40, 10])
               + clouds[..., None] * np.array([100, 70, 20]))
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, shape: str, rgb, s: int) -> None:
    r = rng.uniform(0.14, 0.26) * s
    cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(2, int(r * 0.45)))
    elif shape == "square":
        draw.regular_polygon((cx, cy, r * 1.2), 4, rotation=rng.uniform(0, 90), fill=rgb)
    elif shape == "triangle":
        draw.regular_polygon((cx, cy, r * 1.15), 3, rotation=rng.uniform(0, 120), fill=rgb)
    elif shape == "star":
        a = rng.uniform(0, np.pi)
        pts = [(cx + (r * 1.2 if i % 2 == 0 else r * 0.5) * np.cos(a + i * np.pi / 5),
                cy + (r * 1.2 if i % 2 == 0 else r * 0.5) * np.sin(a + i * np.pi / 5)) for i in range(10)]
        draw.polygon(pts, fill=rgb)
    else:  # cross
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)


def _names(rng: np.random.Generator, names: list[str], lang: int) -> list[str]:
    """The tags a user writes for one concept: their language's name, sometimes English too."""
    out = [names[lang] if rng.random() < 0.8 else names[rng.integers(len(names))]]
    if rng.random() < 0.3:
        out.append(names[0])
    return out


def make_sample(rng: np.random.Generator, users: _Users, spec: CorpusSpec, idx: int, zipf_cdf: np.ndarray) -> dict:
    """One photo: a rendered JPEG plus observed (noisy) and clean tags."""
    u = int(rng.integers(len(users.names)))
    scene = list(SCENES)[users.scene[u]] if rng.random() < users.p_scene[u] else str(rng.choice(list(SCENES)))
    img = Image.fromarray(_texture(rng, scene, spec.image_size))
    draw = ImageDraw.Draw(img)
    concepts = [SCENES[scene]]
    for _ in range(1 if rng.random() < 0.7 else 2):
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(list(SHAPES)))
        _draw_object(draw, rng, shape, RGB[colour], spec.image_size)
        concepts += [COLOURS[colour], SHAPES[shape]]
    clean = sorted({n for names in concepts for n in names})
    tags = [t for names in concepts if rng.random() >= spec.p_missing for t in _names(rng, names, users.lang[u])]
    if rng.random() < spec.p_wrong:
        tags.append(str(rng.choice(content_tags())))
    # the noise: what the user always writes, their camera, dates, generic junk, the long tail
    tags += [t for t in users.personal[u] if rng.random() < users.p_personal[u]]
    if rng.random() < users.p_camera[u]:
        tags += CAMERAS[users.camera[u]]
    if rng.random() < 0.35:
        tags.append(str(2004 + min(int(rng.exponential(3)), 10)))
    if rng.random() < 0.15:
        tags.append(MONTHS[rng.integers(12)])
    tags += [t for t, p in JUNK.items() if rng.random() < p]
    n_tail = rng.poisson(spec.tail_per_image)
    tags += [_pseudo_word(int(i)) for i in np.searchsorted(zipf_cdf, rng.random(n_tail))]
    tags = list(dict.fromkeys(tags))  # de-duplicate, keep order
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    meta = {"tags": tags, "clean_tags": clean, "id": idx, "user": users.names[u], "title": f"photo {idx}"}
    return {"__key__": f"{idx:08d}", "jpg": buf.getvalue(), "json": json.dumps(meta).encode()}


def _write_split(out: Path, split: str, n: int, start: int, users: _Users, spec, rng, zipf_cdf) -> list[list[str]]:
    tag_lists = []
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=spec.shard_size, verbose=0) as sink:
        for i in range(start, start + n):
            sample = make_sample(rng, users, spec, i, zipf_cdf)
            tag_lists.append(json.loads(sample["json"])["tags"])
            sink.write(sample)
    return tag_lists


def ensure_corpus(cache_dir: str | os.PathLike, spec: CorpusSpec | None = None) -> Path:
    """Generate the corpus once into ``cache_dir/corpus-<key>`` and return that directory."""
    spec = spec or CorpusSpec()
    out = Path(cache_dir).expanduser() / f"corpus-{spec.key()}"
    if (out / "DONE").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(spec.seed)
    zipf = 1.0 / np.arange(11, spec.tail_size + 11) ** spec.tail_exponent  # from rank 11: below the real junk
    zipf_cdf = np.cumsum(zipf) / zipf.sum()
    # validation photos come from other users than training photos: generalisation to new uploaders
    train_users, val_users = _Users(rng, spec.num_users, 0), _Users(rng, max(1, spec.num_users // 5), spec.num_users)
    train_tags = _write_split(tmp, "train", spec.num_train, 0, train_users, spec, rng, zipf_cdf)
    _write_split(tmp, "val", spec.num_val, spec.num_train, val_users, spec, rng, zipf_cdf)
    if spec.num_test:  # drawn after the others: train and val are the same with or without a test split
        test_users = _Users(rng, max(1, spec.num_users // 5), spec.num_users + max(1, spec.num_users // 5))
        _write_split(tmp, "test", spec.num_test, spec.num_train + spec.num_val, test_users, spec, rng, zipf_cdf)
    Vocabulary.from_tag_lists(train_tags).save(tmp / "vocab.tsv")
    (tmp / "content_tags.txt").write_text("\n".join(content_tags()) + "\n")
    (tmp / "spec.json").write_text(json.dumps(asdict(spec), indent=1))
    (tmp / "DONE").touch()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def word_vectors(words: list[str], dim: int = 50, spread: float = 0.35, seed: int = 0) -> dict[str, np.ndarray]:
    """Generated word vectors for ``words`` (e.g. a vocabulary's tags) in which a concept's names in its four
    languages sit close: each colour, shape and scene has a random unit direction, and each of its names is
    that direction plus ``spread`` times a random one (cosine between synonyms about 1 / (1 + spread²)),
    normalized; every other word has a random unit vector of its own (stable: seeded by the word). What
    zero-shot tagging needs from pretrained vectors, without downloading any (``write_word_vectors``)."""
    rng = np.random.default_rng(seed)
    unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)  # noqa: E731
    out: dict[str, np.ndarray] = {}
    for group in (COLOURS, SHAPES, SCENES):
        for names in group.values():
            centre = unit(rng.standard_normal(dim))
            for name in names:
                out.setdefault(name, unit(centre + spread * unit(rng.standard_normal(dim))))
    for w in words:
        if w not in out:
            h = int.from_bytes(hashlib.sha1(f"{seed}:{w}".encode()).digest()[:8], "little")
            out[w] = unit(np.random.default_rng(h).standard_normal(dim))
    return out


def write_word_vectors(path: str | os.PathLike, words: list[str], dim: int = 50, spread: float = 0.35,
                       seed: int = 0) -> Path:
    """``word_vectors`` as a word2vec text file (header ``<count> <dim>``), written under a temporary name and
    renamed. Words containing whitespace are left out (the format has no room for them)."""
    vecs = {w: v for w, v in word_vectors(words, dim, spread, seed).items() if w and len(w.split()) == 1}
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # ranks or tests writing the same file at once
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{len(vecs)} {dim}\n")
        for w, v in vecs.items():
            f.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
    os.replace(tmp, path)
    return path


def ensure_word_vectors(root: str | os.PathLike, dim: int = 50) -> Path:
    """The corpus's word-vector file (``model.tag_vectors=corpus``): every tag of its vocabulary, the held-out
    ones included, and every content name, written once beside the shards."""
    path = Path(root) / f"word_vectors-{dim}.txt"
    if not path.is_file():
        words = [line.split("\t", 1)[0] for line in (Path(root) / "vocab.tsv").read_text(encoding="utf-8").splitlines()]
        write_word_vectors(path, list(dict.fromkeys(content_tags() + words)), dim)
    return path
