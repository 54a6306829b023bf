"""The web demo's page in headless Chromium (Debian's /usr/bin/chromium through Playwright, nothing downloaded):
``screenshot`` tags an image and searches a tag, then saves the picture (``python -m im2vec.use.serve
--screenshot``; docs/demo.png); tests/test_browser.py drives the page the same way."""

from __future__ import annotations

import os
import time

CHROMIUM = "/usr/bin/chromium"  # Debian's: Playwright drives it, nothing downloaded (no `playwright install`)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ALL_LOADED = "() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"


def wait_until(page, js: str, timeout: float = 10.0) -> None:
    """Poll ``js`` (a function) in the page until it is true. Not ``page.wait_for_function``: that evaluates
    a string inside the page, which the page's Content-Security-Policy (no 'unsafe-eval') refuses."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(js):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page never made this true: {js}")
        time.sleep(0.05)


def screenshot(url: str, out: str | os.PathLike, image: str | os.PathLike, tag: str | None = None,
               size: tuple[int, int] = (1200, 800)) -> None:
    """Open the page at ``url``, upload ``image``, search ``tag`` (default: the image's top tag), save a PNG."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": size[0], "height": size[1]})
            page.goto(url)
            page.wait_for_selector("body[data-ready]")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#tags li")
            page.fill("#tag", tag or page.get_attribute("#tags li", "data-tag"))
            page.press("#tag", "Enter")
            page.wait_for_selector("#grid img, #noindex:not([hidden]), #suggest:not([hidden])")
            wait_until(page, ALL_LOADED)
            page.screenshot(path=str(out))
        finally:
            browser.close()

