"""The web page in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) opens the page,
types a prompt, presses Generate, watches the progress bar move and a preview appear, and gets the image the API
draws for the same request; a screenshot is kept (LDM_TEST_ARTIFACTS, default the test's folder)."""

import base64
import io
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# without the background-networking flags Chromium keeps reaching for Google's hosts, refused on a closed network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
PROMPT = "a large red circle in the top left"


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("LDM_BROWSER_TESTS") == "required":
            pytest.fail(f"no Chromium at {CHROMIUM}: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield browser
        browser.close()


def test_the_page_draws_from_a_prompt_with_live_progress(serve, browser, tmp_path):
    url, _ = serve(max_queue=4)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_selector("#model option[value='ldm-shapes']", state="attached")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "60")
    page.fill("#seed", "7")
    page.select_option("#sampler", "DPM++ 2M")
    page.click("#generate")
    page.wait_for_selector("#preview:not([hidden])", timeout=60_000)
    page.wait_for_selector("#gallery figure img", timeout=60_000)
    page.wait_for_function("document.querySelector('#gallery img').naturalWidth > 0")
    size = page.evaluate("[document.querySelector('#gallery img').naturalWidth, "
                         "document.querySelector('#gallery img').naturalHeight]")
    moves = int(page.get_attribute("#progress", "data-moves"))
    assert size == [64, 64] and moves >= 1 and page.eval_on_selector("#progress", "p => p.value") == 1
    assert "Seed: 7" in page.inner_text("#gallery figcaption") and page.get_attribute("#gallery a", "download")
    page.wait_for_selector("#generate:enabled")
    assert not page.is_enabled("#stop") and not errors
    artifacts = Path(os.environ.get("LDM_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "serve-page.png"), full_page=True)

    drawn = page.get_attribute("#gallery img", "src").split(",", 1)[1]
    api = httpx.post(f"{url}/api/v1/generate", timeout=60, json={"prompt": PROMPT, "steps": 60, "seed": 7,
                                                                 "sampler": "DPM++ 2M"}).json()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(drawn)))),
                          np.asarray(Image.open(io.BytesIO(base64.b64decode(api["images"][0]["png"])))))


def test_the_page_shows_a_bad_request_in_one_line(serve, browser):
    url, _ = serve(max_queue=4)
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#model option[value='ldm-shapes']", state="attached")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "1000")  # the form takes it; DPM-Solver's grid does not
    page.select_option("#sampler", "DPM++ 2M")
    page.click("#generate")
    page.wait_for_selector("#status.error")
    assert "422" in page.inner_text("#status") and "steps = 1000" in page.inner_text("#status")
    page.wait_for_selector("#generate:enabled")
