"""The embedded corpus: YFCC-like noise beside known clean tags, generated once and cached."""

import json

import webdataset as wds

from im2vec.data.corpus import CorpusSpec, content_tags, ensure_corpus
from im2vec.data.vocab import Vocabulary

SPEC = CorpusSpec(num_train=300, num_val=50, num_users=10, tail_size=400, shard_size=100)


def _samples(root, split):
    shards = sorted(str(p) for p in root.glob(f"{split}-*.tar"))
    return [(s["jpg"], json.loads(s["json"])) for s in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples())]


def test_corpus_has_clean_tags_and_yfcc_noise(tmp_path):
    root = ensure_corpus(tmp_path, SPEC)
    train, val = _samples(root, "train"), _samples(root, "val")
    assert len(train) == 300 and len(val) == 50 and len(list(root.glob("train-*.tar"))) == 3
    content = set(content_tags())
    noise = clean_hits = total = 0
    for jpg, meta in train + val:
        assert jpg[:2] == b"\xff\xd8"  # a JPEG
        assert meta["clean_tags"] and set(meta["clean_tags"]) <= content
        assert {"id", "user", "title", "tags"} <= set(meta)
        noise += sum(t not in content for t in meta["tags"])
        clean_hits += sum(t in meta["clean_tags"] for t in meta["tags"])
        total += len(meta["tags"])
    assert noise / total > 0.4  # most observed tags are noise, as on Flickr
    assert clean_hits / total > 0.2  # ...but the content is there too
    assert any(t.startswith("user") for _, m in train for t in m["tags"])  # user's own tags
    assert any(t in ("canon", "nikon", "sony", "iphone") for _, m in train for t in m["tags"])  # camera brands
    # the val photos come from other uploaders
    assert not {m["user"] for _, m in train} & {m["user"] for _, m in val}


def test_vocabulary_sorted_and_counted_from_train_split(tmp_path):
    root = ensure_corpus(tmp_path, SPEC)
    vocab = Vocabulary.load(root / "vocab.tsv")
    counts = vocab.counts.tolist()
    assert counts == sorted(counts, reverse=True)
    brute = {}
    for _, meta in _samples(root, "train"):
        for t in set(meta["tags"]):
            brute[t] = brute.get(t, 0) + 1
    assert dict(zip(vocab.tags, counts)) == brute


def test_generated_once_and_keyed_by_spec(tmp_path):
    root = ensure_corpus(tmp_path, SPEC)
    stamp = (root / "vocab.tsv").stat().st_mtime_ns
    assert ensure_corpus(tmp_path, SPEC) == root and (root / "vocab.tsv").stat().st_mtime_ns == stamp
    other = ensure_corpus(tmp_path, CorpusSpec(num_train=100, num_val=10, num_users=5, tail_size=50, seed=1))
    assert other != root and (other / "DONE").exists()
