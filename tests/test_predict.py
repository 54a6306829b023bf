"""Prediction from a checkpoint: Tagger against the trained module and brute force, weights-only
loading, and the tag / index / search commands on a folder with bad files in it."""

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, png_bomb
from PIL import Image

from im2vec.data.images import open_image
from im2vec.data.samples import eval_view, normalize, to_uint8_tensor
from im2vec.errors import UserError
from im2vec.train.checkpoint import load_model
from im2vec.use.image_files import BadImage
from im2vec.use.predict import Tagger, main


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny training run (conftest.tiny_run): its checkpoint, the module it returned (in eval mode
    here, put back as it was after), held-out JPEGs, a Tagger of this module's own."""
    module, was_training = tiny_run.module, tiny_run.module.training
    module.eval()
    yield SimpleNamespace(ckpt=tiny_run.ckpt, module=module, jpegs=tiny_run.jpegs[:10],
                          tagger=Tagger.from_checkpoint(tiny_run.ckpt))
    module.train(was_training)


@pytest.fixture(scope="module")
def photos(trained, tmp_path_factory):
    """A folder of held-out photos (nested, three formats) with bad files among them."""
    root = tmp_path_factory.mktemp("photos")
    (root / "trip" / "day2").mkdir(parents=True)
    good = []
    for i, data in enumerate(trained.jpegs[:6]):
        name = ["a.jpg", "trip/b.jpg", "trip/day2/c.JPEG", "d.png", "trip/e.png", "f.bmp"][i]
        if name.endswith((".png", ".bmp")):
            Image.open(io.BytesIO(data)).save(root / name)
        else:
            (root / name).write_bytes(data)
        good.append(name)
    (root / "trip" / "cut.jpg").write_bytes(trained.jpegs[6][:300])  # a truncated JPEG
    (root / "text.png").write_text("not an image")
    (root / "bomb.png").write_bytes(png_bomb(30000, 30000))  # refused before decoding
    (root / "notes.txt").write_text("no image suffix: not looked at")
    return SimpleNamespace(root=root, good=sorted(good))


def _eval_batch(jpegs: list[bytes], size: int) -> torch.Tensor:
    """What the evaluation loader makes of these JPEGs: (N, 3, S, S) uint8."""
    return torch.stack([to_uint8_tensor(eval_view(open_image(b), size)) for b in jpegs])


def _brute_tags(module, u: torch.Tensor, gamma: float, k: int) -> list[list[tuple[str, float]]]:
    s = u @ module.table.weight.detach().t() + gamma * module.table.log_counts  # (N, V), the whole vocabulary
    order = s.argsort(dim=1, descending=True)[:, :k]
    return [[(module.tags[j], s[i, j].item()) for j in row] for i, row in enumerate(order.tolist())]


def _same_tags(got, want):
    for g, w in zip(got, want, strict=True):
        assert [t for t, _ in g] == [t for t, _ in w]
        assert [s for _, s in g] == pytest.approx([s for _, s in w], abs=1e-5)


def test_embed_matches_the_trained_encoder(trained, tmp_path):
    tagger, size = trained.tagger, trained.tagger.image_size
    pixels = _eval_batch(trained.jpegs, size)  # (N, 3, S, S) uint8
    with torch.no_grad():
        want = trained.module.encoder(normalize(pixels))  # (N, d)
    paths = []
    for i, data in enumerate(trained.jpegs):
        paths.append(tmp_path / f"{i}.jpg")
        paths[-1].write_bytes(data)
    for images in (pixels, normalize(pixels), paths, [str(p) for p in paths], [Image.open(p) for p in paths]):
        got = tagger.embed(images, batch_size=3)
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert tagger.embed(paths[0]).shape == (1, tagger.dim)
    # raw pixels of another size are center-cropped and resized to the training size
    big = torch.nn.functional.interpolate(pixels[:2].float(), scale_factor=2, mode="nearest").to(torch.uint8)
    assert tagger.embed(big[..., :, 8:]).shape == (2, tagger.dim)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(BadImage, match="bad.jpg: not a readable image"):
        tagger.embed([paths[0], bad])


def test_checkpoint_without_image_size_needs_one(trained, tmp_path):
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    del ckpt["im2vec"]["image_size"]  # as checkpoints written before it was recorded
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="does not record the image size"):
        Tagger.from_checkpoint(tmp_path / "old.ckpt")
    tagger = Tagger.from_checkpoint(tmp_path / "old.ckpt", image_size=trained.tagger.image_size)
    pixels = _eval_batch(trained.jpegs[:2], tagger.image_size)
    torch.testing.assert_close(tagger.embed(pixels), trained.tagger.embed(pixels))


def test_tag_scores_match_brute_force(trained):
    tagger, module = trained.tagger, trained.module
    assert tagger.tags == module.tags and tagger.gamma == module.sampler_cfg.gamma
    u = tagger.embed(_eval_batch(trained.jpegs, tagger.image_size))
    _same_tags(tagger.tag(_eval_batch(trained.jpegs, tagger.image_size), k=5),
               _brute_tags(module, u, module.sampler_cfg.gamma, 5))
    chunked = Tagger.from_checkpoint(trained.ckpt)
    chunked.chunk = 50  # several chunks of the 300-odd tags, merged
    for gamma in (0.0, 2.0):
        _same_tags(chunked.tag_vectors(u, k=7, gamma=gamma), _brute_tags(module, u, gamma, 7))


def test_similar_tags_and_search_match_brute_force(trained):
    tagger, module = trained.tagger, trained.module
    table = torch.nn.functional.normalize(module.table.weight.detach(), dim=1)  # (V, d)
    tag = module.tags[5]
    cos = table @ table[5]  # (V,)
    cos[5] = -2
    order = cos.argsort(descending=True)[:8].tolist()
    got = tagger.similar_tags(tag, k=8)
    assert [t for t, _ in got] == [module.tags[j] for j in order]
    assert [s for _, s in got] == pytest.approx(cos[order].tolist(), abs=1e-5)
    with pytest.raises(KeyError, match="unknown tag 'no such tag'"):
        tagger.similar_tags("no such tag")

    u = tagger.embed(_eval_batch(trained.jpegs, tagger.image_size))  # (N, d)
    scores = u @ module.table.weight.detach()[5]  # (N,)
    want = scores.argsort(descending=True)[:4].tolist()
    got = tagger.search(u, tag, k=4)
    assert [i for i, _ in got] == want and [s for _, s in got] == pytest.approx(scores[want].tolist(), abs=1e-5)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickled_objects_are_refused(trained, photos, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    ckpt["extra"] = _Payload(marker)  # an otherwise valid checkpoint
    torch.save(ckpt, tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="refused by weights-only loading"):
        load_model(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refused by weights-only loading: .*Unsupported global"):
        Tagger.from_checkpoint(tmp_path / "evil.ckpt")
    assert main(["tag", str(tmp_path / "evil.ckpt"), str(photos.root), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert "refused by weights-only loading" in capsys.readouterr().err
    # an index is loaded weights-only too
    torch.save({"format": "im2vec-index-1", "paths": [], "evil": _Payload(marker)}, tmp_path / "evil.pt")
    assert main(["search", str(trained.ckpt), str(tmp_path / "evil.pt"), trained.module.tags[0]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("im2vec: error: ") and "refused by weights-only loading" in err
    assert not marker.exists()
    torch.load(tmp_path / "evil.ckpt", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()


def test_tag_command_writes_good_images_and_counts_bad_ones(trained, photos, tmp_path, capsys):
    out = tmp_path / "tags.jsonl"
    assert main(["tag", str(trained.ckpt), str(photos.root), "--out", str(out), "--k", "4", "--batch-size", "4"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in lines] == photos.good
    u = trained.tagger.embed([photos.root / name for name in photos.good])
    _same_tags([[tuple(p) for p in r["tags"]] for r in lines],
               _brute_tags(trained.module, u, trained.module.sampler_cfg.gamma, 4))
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "6 images" in err and "3 skipped (bad_image: 2, too_large: 1)" in err
    assert "1 other file " in err


def test_index_and_search_commands(trained, photos, tmp_path, capsys):
    index, tag = tmp_path / "index.pt", trained.module.tags[5]
    assert main(["index", str(trained.ckpt), str(photos.root), "--out", str(index)]) == 0
    saved = torch.load(index, weights_only=True)
    assert saved["paths"] == photos.good and saved["vectors"].dtype == torch.float32
    assert saved["fingerprint"] == trained.tagger.fingerprint and saved["checkpoint"] == str(trained.ckpt.resolve())
    capsys.readouterr()

    assert main(["search", str(trained.ckpt), str(index), tag, "--k", "4"]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    u = trained.tagger.embed([photos.root / name for name in photos.good])  # (N, d)
    scores = u @ trained.module.table.weight.detach()[5]  # (N,)
    want = scores.argsort(descending=True)[:4].tolist()
    assert [p for p, _ in printed] == [photos.good[i] for i in want]
    assert [float(s) for _, s in printed] == pytest.approx(scores[want].tolist(), abs=1e-5)

    # the same command through `python -m`
    run = subprocess.run([sys.executable, "-m", "im2vec.use.predict", "search", str(trained.ckpt), str(index), tag,
                          "--k", "4"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert [line.split("\t") for line in run.stdout.splitlines()] == printed

    # an index from another vocabulary, or from other weights of the same vocabulary, is refused
    torch.save({**saved, "fingerprint": "0123456789abcdef"}, tmp_path / "other-vocab.pt")
    assert main(["search", str(trained.ckpt), str(tmp_path / "other-vocab.pt"), tag]) == 2
    assert "another vocabulary" in capsys.readouterr().err
    ckpt = torch.load(trained.ckpt, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["encoder.proj.weight"] += 0.01  # a later epoch's last.ckpt, say
    torch.save(ckpt, tmp_path / "later.ckpt")
    assert main(["search", str(tmp_path / "later.ckpt"), str(index), tag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other weights" in err
    assert main(["search", str(trained.ckpt), str(index), "no such tag"]) == 2
    assert "unknown tag 'no such tag'" in capsys.readouterr().err


def test_import_im2vec_stays_light():
    code = ("import sys, im2vec; assert 'torch' not in sys.modules, 'import im2vec pulled in torch'; "
            "from im2vec.use.predict import Tagger; assert im2vec.Tagger is Tagger")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
