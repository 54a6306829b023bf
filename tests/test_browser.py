"""The demo page as a person uses it, in headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; nothing downloaded): upload an image and see its tags as bars, move the γ slider and see them
change, search a tag and see the images load, get "did you mean" for an unknown tag, take a screenshot;
name the uploader (suggested from the prior's names) and hide the non-visual tags, or find both controls
absent without their files.
The page talks to the real server (uvicorn on a free loopback port) and to nothing else."""

import io
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

pytestmark = pytest.mark.browser
CHROMIUM_PATH = "/usr/bin/chromium"
if not Path(CHROMIUM_PATH).is_file():
    pytest.skip(f"no Chromium at {CHROMIUM_PATH}: apt-get install chromium (.ci/run does)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")
pytest.importorskip("starlette", reason="the demo needs the serve extra: pip install -e '.[serve]'")

from test_demo_user import LAM, setup  # noqa: E402,F401 -- the prior and visual tags file of test_demo_user
from test_serve import trained  # noqa: E402,F401 -- the fixture: one tiny training run for this module too

from im2vec.bench.serve_load import Client, Job, multipart, search_job, tag_job  # noqa: E402
from im2vec.use.browser import ALL_LOADED, CHROMIUM_ARGS, wait_until  # noqa: E402
from im2vec.use.predict import Tagger, load_index  # noqa: E402
from im2vec.use.predict import main as predict_main  # noqa: E402
from im2vec.use.serve import create_app, running  # noqa: E402

VIEWPORT = {"width": 1200, "height": 800}


@pytest.fixture(scope="module")
def photos(trained, tmp_path_factory):  # noqa: F811 -- pytest passes the fixture imported above
    """An indexed folder of held-out photos, every one of them servable."""
    root = tmp_path_factory.mktemp("browser-photos")
    for i, data in enumerate(trained.jpegs[:10]):
        (root / f"{i:02d}.jpg").write_bytes(data)
    Image.open(io.BytesIO(trained.jpegs[10])).save(root / "10.png")
    assert predict_main(["index", str(trained.ckpt), str(root), "--out", str(root.parent / "index.pt")]) == 0
    return SimpleNamespace(root=root, index=load_index(root.parent / "index.pt", trained.tagger))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM_PATH, args=CHROMIUM_ARGS)
        yield b
        b.close()


def open_page(browser, url: str):
    """The page, loaded and ready; the list of every URL it requested, for checking it stays on ``url``."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(15_000)
    requested, errors = [], []
    page.on("request", lambda r: requested.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready]")
    return page, requested, errors


def shown_tags(page) -> list[tuple[str, float]]:
    rows = page.eval_on_selector_all(
        "#tags li", "lis => lis.map(li => [li.dataset.tag, li.querySelector('.score').textContent])")
    return [(tag, float(score)) for tag, score in rows]


def same_tags(shown: list[tuple[str, float]], want: list) -> bool:
    """The same tags in the same order, the scores as the page rounds them (2 decimals)."""
    return [t for t, _ in shown] == [t for t, _ in want] and all(
        abs(a - b) <= 0.005 + 1e-9 for (_, a), (_, b) in zip(shown, want))


def test_the_page_in_chromium(browser, trained, photos, tmp_path):  # noqa: F811
    tagger, upload = trained.tagger, photos.root / "03.jpg"
    with running(create_app(tagger, photos.index)) as url:
        api = Client(url)
        page, requested, errors = open_page(browser, url)
        assert float(page.input_value("#gamma")) == tagger.gamma  # the slider starts at the checkpoint's γ

        # upload -> the tags as bars, the same as the API's
        page.set_input_files("#file", str(upload))
        page.wait_for_selector("#tags li")
        want = api.send(tag_job(upload.read_bytes(), k=10)).body["tags"]
        assert same_tags(shown_tags(page), want)
        assert page.eval_on_selector("#tags li .bar span", "e => e.getBoundingClientRect().width") > 0

        # the γ slider re-tags the image with the chosen γ
        page.fill("#gamma", "3")
        page.wait_for_selector('#tags[data-gamma="3"]')
        want3 = api.send(tag_job(upload.read_bytes(), k=10, gamma=3.0)).body["tags"]
        assert same_tags(shown_tags(page), want3) and not same_tags(shown_tags(page), want)
        assert page.text_content("#gamma-value") == "3.00"

        # a tag -> the grid of the index's best images, every one loaded; its similar tags
        tag = want[0][0]
        page.fill("#tag", tag)
        page.press("#tag", "Enter")
        page.wait_for_selector("#grid img")
        wait_until(page, ALL_LOADED)
        hits = api.send(search_job(tag, k=24)).body["images"]
        widths = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == len(hits) == len(photos.index["paths"]) and min(widths) > 0  # every image loaded
        shown = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.getAttribute('src'))")
        assert shown == [h["url"] for h in hits]
        similar = page.eval_on_selector_all("#similar button", "bs => bs.map(b => b.firstChild.textContent)")
        assert similar == [t for t, _ in tagger.similar_tags(tag, 10)]

        # an unknown tag -> "did you mean", whose link searches the known tag
        known = next(t for t in tagger.tags if len(t) >= 6 and t.isalpha())
        page.fill("#tag", known[:2] + known[3:])
        page.press("#tag", "Enter")
        page.wait_for_selector("#suggest a")
        assert "Did you mean" in page.text_content("#suggest")
        assert page.query_selector("#grid img") is None
        page.click(f"#suggest a:text-is('{known}')")
        page.wait_for_selector("#grid img")
        assert page.input_value("#tag") == known

        # clicking a tag of the left column searches it
        page.click("#tags li .tagname")
        wait_until(page, f"() => document.getElementById('tag').value === {want3[0][0]!r}")

        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot))
        assert struct.unpack(">II", shot.read_bytes()[16:24]) == (VIEWPORT["width"], VIEWPORT["height"])
        assert errors == []
        assert all(u.startswith((url + "/", "blob:", "data:")) for u in requested), requested
        page.close()
        api.close()

    with running(create_app(tagger)) as url:  # no index: the page says so, similar tags still work
        page, _, errors = open_page(browser, url)
        assert page.is_visible("#noindex") and "No index is loaded" in page.text_content("#noindex")
        page.fill("#tag", tagger.tags[0])
        page.press("#tag", "Enter")
        page.wait_for_selector("#similar button")
        assert page.query_selector("#grid img") is None and errors == []
        page.close()


def tag_answer(api, data: bytes, **fields) -> list:
    body, content_type = multipart(data, fields={key: str(v) for key, v in fields.items()})
    return api.send(Job("tag", "POST", "/api/tag?k=10", body, content_type)).body["tags"]


def test_the_page_takes_an_uploader_and_hides_nonvisual_tags(browser, setup):  # noqa: F811
    tagger = Tagger.from_checkpoint(setup.ckpt)
    tagger.use_user_prior(setup.prior_path, lam=LAM)
    tagger.use_visual_tags(setup.visual)
    photo, data = setup.photos[0], setup.photos[0].read_bytes()
    with running(create_app(tagger)) as url:
        api = Client(url)
        page, requested, errors = open_page(browser, url)
        assert page.is_visible("#user") and page.is_visible("#hide") and page.is_checked("#hide")

        # an upload: the non-visual tags hidden (the default), and the page says how many
        page.set_input_files("#file", str(photo))
        page.wait_for_selector('#tags[data-hide="1"] li')
        want = tag_answer(api, data, hide=1)
        assert same_tags(shown_tags(page), want) and not {t for t, _ in shown_tags(page)} & setup.nonvisual
        assert page.is_visible("#tag-notes") and "describe nothing in the picture" in page.inner_text("#tag-notes")

        # the uploader field suggests the prior's names by prefix
        prefix = setup.known[:2]
        page.fill("#user", prefix)
        wait_until(page, "() => document.querySelectorAll('#user-list option').length > 0")
        options = page.eval_on_selector_all("#user-list option", "os => os.map(o => o.value)")
        assert setup.known in options or len(options) == 20
        assert all(o.startswith(prefix) for o in options) and len(options) <= 20

        # a known uploader: their habits re-rank, as the API says
        page.fill("#user", setup.known)
        page.press("#user", "Enter")
        page.wait_for_selector(f'#tags[data-user="{setup.known}"] li')
        want_user = tag_answer(api, data, hide=1, user=setup.known)
        assert same_tags(shown_tags(page), want_user) and page.is_visible("#user-term")

        # an unknown one: the plain tags, and the page says why
        page.fill("#user", "nobody-ever")
        page.press("#user", "Enter")
        page.wait_for_selector('#tags[data-user="nobody-ever"] li')
        assert same_tags(shown_tags(page), want) and "not seen in training" in page.inner_text("#tag-notes")

        # the toggle off: the non-visual tags are back
        page.uncheck("#hide")
        page.wait_for_selector('#tags[data-hide="0"] li')
        assert same_tags(shown_tags(page), tag_answer(api, data, hide=0))
        assert errors == [] and all(u.startswith((url + "/", "blob:", "data:")) for u in requested), requested
        page.close()
        api.close()

    with running(create_app(Tagger.from_checkpoint(setup.ckpt))) as url:  # neither file: neither control
        page, _, errors = open_page(browser, url)
        assert not page.is_visible("#user") and not page.is_visible("#hide") and page.is_disabled("#user")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector("#tags li")
        assert page.is_hidden("#tag-notes") and errors == []
        page.close()
