"""Ingest: YFCC100M metadata lines, a local mirror and user manifests -> split shards, skips counted by reason."""

import bz2
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
from conftest import png_bomb
from PIL import Image

from im2vec.data.ingest import (
    Settings,
    collection_samples,
    main,
    run,
    split_of,
)
from im2vec.data.ingest_shard import prepare_image
from im2vec.data.yfcc import (
    COLUMNS_25,
    Skip,
    image_path,
    normalize_tag,
    parse_line,
    url_decode,
)
from im2vec.errors import UserError

# the real line quoted in shared/DESIGN.md (empty fields kept)
REAL = ("6639\t6162540254\t4ccb23d8746b8d9d76ffd603fc7988\t15087210@N00\thenribergius\t2011-09-10 21:13:32.0\t"
        "1316432672\tNokia+N950\tAround+the+waterpipe\t\thelsinki,party,waterpipe\t\t\t\t\t"
        "http://www.flickr.com/photos/15087210@N00/6162540254/\t"
        "http://farm7.staticflickr.com/6167/6162540254_5d22abd711.jpg\tAttribution-ShareAlike License\t"
        "http://creativecommons.org/licenses/by-sa/2.0/\t6167\t7\t5d22abd711\t44e5acb0f2\tjpg\t0")


def test_the_real_yfcc_line_parses():
    assert len(REAL.split("\t")) == len(COLUMNS_25) == 25
    rec = parse_line(REAL.encode())
    assert rec["id"] == "6162540254"
    assert rec["tags"] == ["helsinki", "party", "waterpipe"]
    assert rec["title"] == "Around the waterpipe"
    assert rec["user"] == "15087210@N00" and rec["hash"] == "4ccb23d8746b8d9d76ffd603fc7988"
    assert image_path(rec, "/m").as_posix() == "/m/images/4cc/b23/4ccb23d8746b8d9d76ffd603fc7988.jpg"


def test_the_23_column_parts_parse_and_need_a_template_without_hash():
    cols = REAL.split("\t")
    line = "\t".join(cols[1:2] + cols[3:])  # the original parts: no line number, no hash
    rec = parse_line(line)
    assert rec["id"] == "6162540254" and rec["hash"] is None
    assert rec["tags"] == ["helsinki", "party", "waterpipe"] and rec["title"] == "Around the waterpipe"
    with pytest.raises(ValueError, match="23-column"):
        image_path(rec, "/m")
    assert image_path(rec, "/m", "{farm}/{server}/{id}_{secret}.{ext}").as_posix() == "/m/7/6167/6162540254_5d22abd711.jpg"
    with pytest.raises(Skip, match="bad_field"):  # metadata cannot lead out of the mirror
        image_path({**rec, "ext": "../../etc/passwd"}, "/m", "{id}.{ext}")


def test_url_decoding_and_tag_normalization():
    assert url_decode("caf%C3%A9+au+lait") == "café au lait"
    for bad in ("100%", "%zz", "a%4", "%ff%fe"):  # cut escapes, non-hex, bytes that are not UTF-8
        with pytest.raises(Skip) as e:
            url_decode(bad)
        assert e.value.reason == "bad_escape"
    assert normalize_tag("  Helsinki ") == "helsinki"
    assert normalize_tag("ＴＯＫＹＯ\u3000 Tower") == "tokyo tower"  # NFKC: full-width letters and space
    assert normalize_tag("ﬁre") == "fire"  # NFKC: the ligature
    cols = REAL.split("\t")
    cols[10] = "Party,%20party%20,,PARTY,new+york,machine"
    cols[11] = "vision%3Aoutdoor%3D099"
    rec = parse_line("\t".join(cols))
    assert rec["tags"] == ["party", "new york", "machine"]  # one spelling, duplicates once, empties dropped
    assert parse_line("\t".join(cols), machine_tags=True)["tags"][-1] == "vision:outdoor=099"


def _jpeg(seed, w=48, h=36) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _line(n: int, photo_id: str, hash_: str, tags: str, user: str = "u@N00", marker: str = "0") -> str:
    cols = REAL.split("\t")
    cols[0], cols[1], cols[2], cols[3], cols[10], cols[24] = str(n), photo_id, hash_, user, tags, marker
    return "\t".join(cols)


def _mirror(tmp_path, n_good=12):
    """A metadata file with n_good good photos and one of each kind of bad line or bad image."""
    lines, expected = [], {}
    mirror = tmp_path / "mirror"

    def put(hash_: str, data: bytes):
        p = mirror / "images" / hash_[:3] / hash_[3:6] / f"{hash_}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    for i in range(n_good):
        h = f"{i:04d}aa{i:026x}"
        put(h, _jpeg(i))
        lines.append(_line(i, str(1000 + i), h, f"tag{i % 3},common", user=f"user{i % 8}@N00"))
        expected[str(1000 + i)] = [f"tag{i % 3}", "common"]
    big = io.BytesIO()
    Image.new("RGB", (400, 300), "red").save(big, "JPEG")
    put("bad001", b"\xff\xd8\xff\xe0 this is not a jpeg")
    put("bad002", _jpeg(99)[:300])  # truncated in the middle of the scan
    put("bad003", big.getvalue())  # 120,000 pixels, over the test's max_pixels
    lines += [
        "only\tthree\tcolumns",                                    # bad_columns
        _line(90, "2001", "aaaaaa", "ok,%zz"),                     # bad_escape
        _line(91, "2002", "aaaaaa", "caf\udcff"),                  # bad_utf8: written as the raw byte 0xff
        _line(92, "2003", "aaaaaa", "a,b", marker="1"),            # video
        _line(93, "2004", "aaaaaa", ""),                           # no_tags
        _line(94, "2005", "0badbeef", "lost"),                     # missing_image
        _line(95, "2006", "bad001", "broken"),                     # corrupt_image
        _line(96, "2007", "bad002", "broken"),                     # corrupt_image (truncated)
        _line(97, "2008", "bad003", "huge"),                       # too_large
        _line(98, "notanid", "aaaaaa", "a"),                       # bad_field
        _line(99, "2009", "../../../etc/passwd", "a"),             # bad_field: a hash must be hex
        _line(100, "２０１０", "aaaaaa", "a"),                       # bad_field: full-width digits
    ]
    data = "\n".join(lines).encode("utf-8", "surrogateescape") + b"\n"
    return data, mirror, expected


SKIPS = {"bad_columns": 1, "bad_escape": 1, "bad_utf8": 1, "video": 1, "no_tags": 1, "missing_image": 1,
         "corrupt_image": 2, "too_large": 1, "bad_field": 3}


def _read_shards(folder):
    out = {}
    for shard in sorted(folder.glob("*/shard-*.tar")):
        with tarfile.open(shard) as tar:
            names = tar.getnames()
            for name in names:
                if name.endswith(".json"):
                    meta = json.loads(tar.extractfile(name).read())
                    key = name[: -len(".json")]
                    assert "." not in key and f"{key}.jpg" in names
                    Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read())).load()
                    out[meta["id"]] = (shard.parent.name, meta)
    return out


@pytest.mark.parametrize("compress", [False, True])
def test_yfcc_ingest_writes_the_good_samples_and_counts_each_skip(tmp_path, compress):
    data, mirror, expected = _mirror(tmp_path)
    meta = tmp_path / ("meta.tsv.bz2" if compress else "meta.tsv")
    meta.write_bytes(bz2.compress(data) if compress else data)
    out = tmp_path / "out"
    summary = main(["yfcc", str(meta), "--images", str(mirror), "--out", str(out), "--shard-size", "4",
                    "--workers", "2", "--max-pixels", "100000", "--val-fraction", "0.3", "--quiet"])
    assert summary["skipped"] == SKIPS
    assert sum(summary["written"].values()) == len(expected)
    got = _read_shards(out)
    assert {k: m["tags"] for k, (_, m) in got.items()} == expected
    assert got["1000"][1]["title"] == "Around the waterpipe" and got["1003"][1]["user"] == "user3@N00"
    for photo_id, (split, _) in got.items():  # each photo in the split its id's hash gives it
        assert split == split_of(photo_id, 0.3, 0.01)
    assert json.loads((out / "summary.json").read_text())["skipped"] == SKIPS


@pytest.mark.parametrize("workers", ["0", "2"])
def test_ingest_resumes_without_redoing_finished_shards(tmp_path, workers):
    data, mirror, expected = _mirror(tmp_path)
    (tmp_path / "meta.tsv").write_bytes(data)
    args = ["yfcc", str(tmp_path / "meta.tsv"), "--images", str(mirror), "--out", str(tmp_path / "out"),
            "--shard-size", "3", "--workers", workers, "--max-pixels", "100000", "--val-fraction", "0", "--quiet",
            "--shuffle-window", "0"]  # the input's order: the bad images come last (test_ingest_shuffles_… below)
    first = main(args)
    shards = sorted((tmp_path / "out" / "train").glob("shard-*.tar"))
    # 12 good photos, then 4 with bad images: shards 4 and 5 hold only bad ones and keep no tar
    assert len(shards) == 4 and not (tmp_path / "out" / "train" / "shard-000004.tar").exists()
    stamps = {p: p.stat().st_mtime_ns for p in shards}
    shards[1].unlink()  # as if the run was killed while writing shard 1 ...
    shards[1].with_name("shard-000001.stats.json").unlink()
    (shards[1].parent / "shard-000001.tar.tmp").write_bytes(b"half a tar")  # ... leaving a partial file
    second = main(args)
    assert second["written"] == first["written"] and second["skipped"] == first["skipped"]
    assert shards[1].exists() and not (shards[1].parent / "shard-000001.tar.tmp").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != shards[1])  # not rewritten
    assert {k: m["tags"] for k, (_, m) in _read_shards(tmp_path / "out").items()} == expected
    with pytest.raises(UserError, match="other settings.*shard_size"):
        main([a if a != "3" else "5" for a in args])  # --shard-size 5
    elsewhere = tmp_path / "elsewhere"
    mirror.rename(elsewhere)
    with pytest.raises(UserError, match="other settings.*root"):  # another mirror: its shards would differ
        main([a if a != str(mirror) else str(elsewhere) for a in args])


def test_split_is_deterministic_by_hash_and_can_group_users():
    ids = [str(i) for i in range(20000)]
    splits = Counter(split_of(i, 0.05, 0.02) for i in ids)
    # binomial: 5% of 20,000 is 1,000 ± 31 (1σ); 2% is 400 ± 20
    assert abs(splits["val"] - 1000) < 5 * 31 and abs(splits["test"] - 400) < 5 * 20
    assert [split_of(i, 0.05, 0.02) for i in ids[:500]] == [split_of(i, 0.05, 0.02) for i in ids[:500]]
    assert Counter(split_of(i, 0.05, 0.02, salt="other") for i in ids) != splits  # the salt re-draws
    # pinned: a change of the hash would silently re-split every collection already ingested
    assert {i: split_of(str(i), 0.05, 0.02) for i in range(60) if split_of(str(i), 0.05, 0.02) != "train"} == \
        {25: "val", 53: "test", 55: "val", 56: "val"}
    assert split_of("15087210@N00", 0.5, 0.2) == "test"


def test_split_by_user_keeps_each_uploader_in_one_split(tmp_path):
    data, mirror, _ = _mirror(tmp_path, n_good=40)
    (tmp_path / "meta.tsv").write_bytes(data)
    main(["yfcc", str(tmp_path / "meta.tsv"), "--images", str(mirror), "--out", str(tmp_path / "out"),
          "--split-by", "user", "--val-fraction", "0.4", "--test-fraction", "0.2", "--workers", "0", "--quiet"])
    by_user = {}
    for split, meta in _read_shards(tmp_path / "out").values():
        if meta["user"].startswith("user"):
            by_user.setdefault(meta["user"], set()).add(split)
    assert len(by_user) == 8 and all(len(s) == 1 for s in by_user.values())  # 5 photos each, one split
    assert {u: s.pop() for u, s in by_user.items()} == {u: split_of(u, 0.4, 0.2) for u in by_user}
    assert len({split_of(u, 0.4, 0.2) for u in by_user}) > 1  # and the users do fall in different splits


def test_prepare_image_keeps_good_bytes_refuses_bombs_and_shrinks_on_request(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(_jpeg(1, 300, 200))
    assert prepare_image(good) == ("jpg", good.read_bytes())  # stored as it is
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bomb(40000, 40000))  # 1.6 billion pixels claimed, 100 bytes on disk
    with pytest.raises(Skip) as e:
        prepare_image(bomb)
    assert e.value.reason == "too_large"
    ext, small = prepare_image(good, max_side=64)
    assert ext == "jpg" and Image.open(io.BytesIO(small)).size == (64, 43)
    gif = tmp_path / "a.gif"
    Image.new("P", (20, 10)).save(gif)
    ext, data = prepare_image(gif)  # not JPEG/PNG/WebP: stored as JPEG
    assert ext == "jpg" and Image.open(io.BytesIO(data)).format == "JPEG"


def test_prepare_image_odd_but_good_images(tmp_path):
    tiny = tmp_path / "tiny.jpg"
    tiny.write_bytes(_jpeg(2, 4, 3))  # smaller than the 1/8-scale check
    assert prepare_image(tiny) == ("jpg", tiny.read_bytes())
    assert prepare_image(tiny, max_side=64) == ("jpg", tiny.read_bytes())
    mpo = tmp_path / "camera.jpg"
    Image.fromarray(np.full((120, 160, 3), 90, np.uint8)).save(mpo, "MPO", save_all=True,
                                                               append_images=[Image.new("RGB", (160, 120))])
    assert Image.open(mpo).format == "MPO"
    assert prepare_image(mpo) == ("jpg", mpo.read_bytes())  # a camera's JPEG: kept whole, full size
    deep = tmp_path / "deep.png"
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    ext, data = prepare_image(deep, max_side=32)  # 16-bit: scaled to 8 bits, not clipped to white
    pixels = np.asarray(Image.open(io.BytesIO(data)))
    assert pixels.shape == (32, 32, 3) and 100 < pixels.mean() < 155
    rotated = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.new("RGB", (80, 40), "blue").save(rotated, exif=exif)
    ext, data = prepare_image(rotated)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).size == (40, 80)  # stored upright
    for name, content in (("empty.jpg", b""), ("dir.jpg", None)):
        p = tmp_path / name
        p.mkdir() if content is None else p.write_bytes(content)
        with pytest.raises(Skip) as e:
            prepare_image(p)
        assert e.value.reason in ("corrupt_image", "unreadable_image")


def _collection(tmp_path):
    root = tmp_path / "photos"
    (root / "trip").mkdir(parents=True)
    for i in range(6):
        (root / "trip" / f"{i}.jpg").write_bytes(_jpeg(i, 200, 120))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(_jpeg(50))
    (root / "link.jpg").symlink_to(secret)  # inside the folder by name, outside by target
    return root, secret


def test_collection_jsonl_refuses_paths_outside_its_folder(tmp_path):
    root, secret = _collection(tmp_path)
    rows = [{"image": f"trip/{i}.jpg", "tags": ["Beach", "sea"], "user": f"u{i % 2}"} for i in range(5)]
    rows += [
        {"image": "../secret.jpg", "tags": ["x"]},          # outside_root
        {"image": str(secret), "tags": ["x"]},              # outside_root (absolute)
        {"image": "link.jpg", "tags": ["x"]},               # outside_root (a symlink leading out)
        {"image": "trip/0.jpg", "tags": ["again"]},         # duplicate
        {"image": "trip/5.jpg", "tags": []},                # no_tags
        {"image": "trip/missing.jpg", "tags": ["x"]},       # missing_image
        {"tags": ["no image field"]},                       # bad_line
        {"image": "trip/1\u0000.jpg", "tags": ["x"]},        # bad_line: NUL in the path
        {"image": "trip/2.jpg", "tags": ["caf\udcff"]},      # bad_line: a lone surrogate cannot be UTF-8
    ]
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")  # json.dumps escapes: valid JSON
    summary = main(["collection", str(manifest), "--out", str(tmp_path / "out"), "--val-fraction", "0",
                    "--test-fraction", "0", "--max-side", "100", "--workers", "0", "--quiet"])
    assert summary["skipped"] == {"outside_root": 3, "duplicate": 1, "no_tags": 1, "missing_image": 1, "bad_line": 4}
    got = _read_shards(tmp_path / "out")
    assert sorted(got) == [f"trip/{i}.jpg" for i in range(5)]
    assert got["trip/1.jpg"][1] == {"id": "trip/1.jpg", "user": "u1", "tags": ["beach", "sea"]}
    with tarfile.open(next((tmp_path / "out" / "train").glob("*.tar"))) as tar:
        jpg = next(n for n in tar.getnames() if n.endswith(".jpg"))
        assert Image.open(io.BytesIO(tar.extractfile(jpg).read())).size == (100, 60)  # shrunk on ingest


def test_collection_tsv_manifest(tmp_path):
    root, _ = _collection(tmp_path)
    (root / "list.tsv").write_text("# path<TAB>tags\ntrip/0.jpg\tdog, Park\ntrip/1.jpg\ttoo\tmany\n"
                                   "../../etc/passwd\tx\ntrip/2.jpg\t\n")
    s = Settings(source="collection", inputs=[str(root / "list.tsv")], val_fraction=0, test_fraction=0)
    items = list(collection_samples(s))
    assert [i.reason for i in items if isinstance(i, Skip)] == ["bad_line", "outside_root", "no_tags"]
    (key, path, meta, split_key), = [i for i in items if not isinstance(i, Skip)]
    assert meta == {"id": "trip/0.jpg", "tags": ["dog", "park"]} and path == str(root / "trip" / "0.jpg")
    assert split_key == "trip/0.jpg" and "." not in key
    summary = run(s, items, tmp_path / "out", verbose=False)
    assert summary["written"]["train"] == 1


def test_vocabulary_from_metadata_and_from_shards_match_a_brute_force_count(tmp_path):
    from im2vec.data.vocab import Vocabulary
    from im2vec.data.vocab import main as vocab_main

    data, mirror, expected = _mirror(tmp_path, n_good=30)
    (tmp_path / "meta.tsv").write_bytes(data)
    out = tmp_path / "out"
    main(["yfcc", str(tmp_path / "meta.tsv"), "--images", str(mirror), "--out", str(out), "--val-fraction", "0.3",
          "--shard-size", "7", "--max-pixels", "100000", "--workers", "0", "--quiet"])
    train_ids = [i for i in expected if split_of(i, 0.3, 0.01) == "train"]
    brute = Counter(t for i in train_ids for t in expected[i])
    v1 = vocab_main([str(tmp_path / "v1.tsv"), "--shards", str(out / "train" / "*.tar"), "--workers", "2", "--quiet"])
    assert dict(zip(v1.tags, v1.counts.tolist())) == brute
    assert v1.counts.tolist() == sorted(v1.counts.tolist(), reverse=True)
    # from the metadata, the train split as the ingest drew it (the bad images are still counted there:
    # they are only found bad when read)
    v2 = vocab_main([str(tmp_path / "v2.tsv"), "--yfcc", str(tmp_path / "meta.tsv"), "--like", str(out),
                     "--split", "train", "--quiet"])
    bad_train = Counter(t for pid, t in (("2005", "lost"), ("2006", "broken"), ("2007", "broken"), ("2008", "huge"))
                        if split_of(pid, 0.3, 0.01) == "train")
    assert dict(zip(v2.tags, v2.counts.tolist())) == brute + bad_train
    v3 = vocab_main([str(tmp_path / "v3.tsv"), "--shards", str(out / "train" / "*.tar"), "--min-count", "2",
                     "--max-size", "2", "--workers", "0", "--quiet"])
    assert v3.tags == [t for t, _ in sorted(brute.items(), key=lambda tc: (-tc[1], tc[0]))][:2]
    assert Vocabulary.load(tmp_path / "v3.tsv").tags == v3.tags
    # a truncated shard: what was read is counted, the error too
    shard = sorted((out / "train").glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:1500])
    from im2vec.data.vocab import count_shard_tags
    counts, n, errors = count_shard_tags(str(shard))
    assert errors == 1 and n < 7


def test_a_truncated_bz2_keeps_the_lines_before_the_damage(tmp_path):
    _, mirror, _ = _mirror(tmp_path, n_good=1)
    lines = [_line(i, str(10**6 + i), f"0000aa{0:026x}", "tag") for i in range(3000)]  # one image, many ids
    packed = bz2.compress(("\n".join(lines) + "\n").encode(), compresslevel=1)  # 100 kB blocks: several
    (tmp_path / "cut.bz2").write_bytes(packed[: len(packed) * 2 // 3])
    summary = main(["yfcc", str(tmp_path / "cut.bz2"), "--images", str(mirror), "--out", str(tmp_path / "out"),
                    "--workers", "0", "--shard-size", "1000", "--quiet"])
    assert summary["skipped"] == {"truncated_input": 1}
    assert 0 < sum(summary["written"].values()) < 3000


def test_vocabulary_load_refuses_an_unsorted_file_instead_of_cutting_it_short(tmp_path):
    from im2vec.data.vocab import Vocabulary

    ok = tmp_path / "ok.tsv"
    ok.write_text("sea\t9\nsky\t9\nred\t4\ncanon\t1\n", encoding="utf-8")
    v = Vocabulary.load(ok, min_count=2)
    assert v.tags == ["sea", "sky", "red"]  # the cut at min_count, ties kept in file order
    assert Vocabulary.load(ok, max_size=2).tags == ["sea", "sky"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("sea\t9\ncanon\t1\nred\t4\n", encoding="utf-8")  # unsorted: red would be lost after the cut
    with pytest.raises(ValueError, match=r"bad.tsv:3: count 4 after 1: a vocabulary is sorted by count"):
        Vocabulary.load(bad, min_count=2)


def test_max_pixels_above_pils_own_limit_is_honoured(monkeypatch):
    from PIL import Image as PILImage

    from im2vec.data.images import MAX_PIXELS, TooLarge, open_image

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", MAX_PIXELS)  # PIL refuses twice this itself: 190M pixels
    img = open_image(png_bomb(19000, 10000), max_pixels=200_000_000)  # the header only: nothing is decoded
    assert img.size == (19000, 10000)
    with pytest.raises(TooLarge, match="max_pixels=89478485"):
        open_image(png_bomb(19000, 10000))  # the default refuses it, by im2vec's check
    with pytest.raises(TooLarge, match="max_pixels=200000000"):
        open_image(png_bomb(25000, 10000), max_pixels=200_000_000)


def test_vocabulary_load_refuses_a_tag_listed_twice(tmp_path):
    from im2vec.data.vocab import Vocabulary
    from im2vec.errors import BadValue

    (tmp_path / "v.tsv").write_text("sea\t5\nsky\t4\nsea\t3\n")
    with pytest.raises(BadValue, match=r"v.tsv:3: the tag 'sea' again \(first on line 1\)"):
        Vocabulary.load(tmp_path / "v.tsv")


def test_a_compressed_jsonl_manifest_is_read_as_jsonl(tmp_path):
    root, _ = _collection(tmp_path)
    manifest = root / "m.jsonl.bz2"
    manifest.write_bytes(bz2.compress(json.dumps({"image": "trip/0.jpg", "tags": ["sea"]}).encode() + b"\n"))
    items = list(collection_samples(Settings(source="collection", inputs=[str(manifest)]), None))
    assert len(items) == 1 and not isinstance(items[0], Skip) and items[0][2]["tags"] == ["sea"]


def _uploader_mix(tmp_path, window: int) -> tuple[list[Counter], list[Counter]]:
    """A manifest sorted by uploader (4 uploaders × 50 images, as a folder per uploader gives), ingested into
    shards of 100 with --shuffle-window ``window``: each shard's uploaders, and those of the training batches
    the streaming loader makes of them (batches of 10, a shuffle buffer of 20: far smaller than a shard)."""
    from im2vec.data.loader import train_loader
    from im2vec.data.vocab import Vocabulary

    photos = tmp_path / f"photos{window}"
    photos.mkdir()
    rows = []
    for u in range(4):
        for i in range(50):
            Image.new("RGB", (8, 8), (u * 60, i * 5, 0)).save(photos / f"u{u}_{i}.jpg")
            rows.append({"image": f"u{u}_{i}.jpg", "tags": ["x"], "user": f"u{u}"})
    (photos / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / f"out{window}"
    main(["collection", str(photos / "m.jsonl"), "--out", str(out), "--shard-size", "100", "--val-fraction", "0",
          "--test-fraction", "0", "--workers", "0", "--shuffle-window", str(window), "--quiet"])
    shards = sorted(str(p) for p in (out / "train").glob("shard-*.tar"))
    users = [_shard_users(s) for s in shards]  # key -> uploader, per shard
    per_shard = [Counter(u.values()) for u in users]
    user = {k: v for u in users for k, v in u.items()}
    loader = train_loader(shards, Vocabulary(["x"], [200]), 8, 10, 40, 0, seed=1, shuffle_buffer=20, rank=0,
                          world_size=1)
    return per_shard, [Counter(user[k] for k in b["keys"]) for b in loader]


def _shard_users(path: str) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name[: -len(".json")]: json.loads(tar.extractfile(m).read())["user"]
                for m in tar if m.name.endswith(".json")}


def _tv(c: Counter) -> float:
    """Total variation distance of a batch's uploader shares from the collection's (a quarter each)."""
    n = sum(c.values())
    return 0.5 * sum(abs(c.get(f"u{u}", 0) / n - 0.25) for u in range(4))


def test_ingest_shuffles_a_sorted_manifest_so_shards_and_batches_mix_uploaders(tmp_path):
    shards, batches = _uploader_mix(tmp_path, 200_000)
    assert len(shards) == 2 and all(len(c) == 4 and max(c.values()) < 40 for c in shards)  # 25 each, ± chance
    # random batches of 10 from four equal uploaders sit about 0.2 from the collection's shares
    assert sum(map(_tv, batches)) / len(batches) < 0.3
    # the input's order (what the ingest did before): each shard two uploaders, batches of one or two
    shards, batches = _uploader_mix(tmp_path, 0)
    assert all(len(c) == 2 for c in shards)
    assert sum(map(_tv, batches)) / len(batches) > 0.4


def test_the_shuffled_order_is_seeded_and_resumes_to_the_same_shards(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for i in range(30):
        Image.new("RGB", (8, 8), (i * 8, 0, 0)).save(photos / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "tags": ["x"], "user": f"u{i // 10}"})
    (photos / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def ingest(out, *extra):
        main(["collection", str(photos / "m.jsonl"), "--out", str(out), "--shard-size", "7", "--val-fraction", "0",
              "--test-fraction", "0", "--workers", "0", "--quiet", *extra])
        return {p.name: p.read_bytes() for p in sorted((out / "train").glob("shard-*"))}

    first = ingest(tmp_path / "a")
    assert ingest(tmp_path / "b") == first  # the same seed: the same order, byte for byte
    assert json.loads((tmp_path / "a" / "ingest.json").read_text())["shuffle_seed"] == 0
    (tmp_path / "a" / "train" / "shard-000002.tar").unlink()  # as if killed before shard 2 was finished
    (tmp_path / "a" / "train" / "shard-000002.stats.json").unlink()
    assert ingest(tmp_path / "a") == first
    assert ingest(tmp_path / "c", "--shuffle-seed", "1") != first
    ids = list(_read_shards(tmp_path / "a"))  # in the shards' order
    assert sorted(ids) != ids and sorted(ids, key=lambda i: int(i.split(".")[0])) != ids
