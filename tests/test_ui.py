"""`clipsearch ui` end to end in headless Chromium (Debian's chromium + chromedriver,
driven by Selenium): type a query, see the right thumbnails; upload an image; move the
recency slider. A screenshot is kept in test-artifacts/.

Without a browser this test FAILS. Set CLIPSEARCH_NO_BROWSER=1 to skip it on a machine
where Chromium cannot be installed (CI installs it: see .ci/run)."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.cli import main
from clipsearch.datasets import write_generated

pytestmark = pytest.mark.integration

NO_BROWSER = "CLIPSEARCH_NO_BROWSER"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    if os.environ.get(NO_BROWSER) == "1":
        pytest.skip(f"{NO_BROWSER}=1: no browser on this machine")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail(
            "headless Chromium is required: apt-get install chromium chromium-driver "
            f"(or set {NO_BROWSER}=1 where no browser can be installed)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


@pytest.fixture
def page(stack, tmp_path: Path) -> Iterator[str]:
    """48 scenes published over 48 days, ingested with thumbnails; the UI on a free port."""
    from clipsearch.ui.server import make_server, start_in_thread

    source = write_generated(tmp_path / "data", 48, seed=20_007, layout="jsonl")
    now = time.time()
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    source.write_text(
        "".join(
            json.dumps({**r, "publish_time": now - i * 86_400}) + "\n" for i, r in enumerate(rows)
        )
    )
    thumbs = tmp_path / "thumbs"
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "ingest",
                str(source),
                "--server",
                stack.address,
                "--thumbnails",
                str(thumbs),
                "--no-progress",
                "--failures",
                str(tmp_path / "failures.jsonl"),
            ]
        )
    assert exit_.value.code == 0
    server = make_server(stack.address, port=0, thumbnails=thumbs)
    start_in_thread(server)
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _searched(browser) -> int:
    """How many searches the page has completed."""
    return int(browser.execute_script("return Number(document.body.dataset.searches || 0)"))


def _cards_after(browser, before: int) -> list:
    """The result cards once a search after the `before`-th has completed."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(lambda b: _searched(b) > before)
    return browser.find_elements(By.CSS_SELECTOR, ".hit")


def _red_share(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        pixels = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"), dtype=int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    return float(red.mean())


def test_search_page_shows_the_right_thumbnails(browser, page: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(page)
    box = browser.find_element(By.ID, "query")
    box.send_keys("a red circle", Keys.ENTER)
    cards = _cards_after(browser, 0)
    assert len(cards) == 12
    top = cards[:2]  # the corpus holds exactly two red circles (48 scenes, 24 kinds)
    for card in top:
        assert "red circle" in card.find_element(By.CLASS_NAME, "caption").text
        img = card.find_element(By.TAG_NAME, "img")
        loaded = browser.execute_script(
            "return arguments[0].complete && arguments[0].naturalWidth", img
        )
        assert loaded == 64  # the stored 64-px thumbnail, not the 160-px placeholder
        assert _red_share(img.get_attribute("src")) > 0.02  # a red shape is in the picture
        assert "score" in card.text and "decay 1.000" in card.text and "published" in card.text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "ui-text-search.png"))

    # The recency slider re-ranks: older documents decay.
    done = _searched(browser)
    browser.execute_script(
        "const s = document.getElementById('decay'); s.value = '0.1';"
        "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));"
    )
    cards = _cards_after(browser, done)
    assert "0.1 / day" in browser.find_element(By.ID, "decay-value").text
    assert any("decay 1.000" not in c.text for c in cards)

    # Search by an uploaded image: a stored picture finds itself first.
    stored = next(p for p in sorted((tmp_path / "data" / "images").glob("*.png")))
    browser.execute_script(
        "const s = document.getElementById('decay'); s.value = '0';"
        "s.dispatchEvent(new Event('input'));"
    )
    done = _searched(browser)
    browser.find_element(By.ID, "image").send_keys(str(stored))
    cards = _cards_after(browser, done)
    assert browser.find_element(By.ID, "query").get_attribute("value") == ""
    assert cards[0].get_attribute("data-id") == stored.stem
    score = re.search(r"score ([0-9.]+)", cards[0].text)
    assert score and float(score.group(1)) >= 0.999  # the same picture: cosine 1
    browser.save_screenshot(str(ARTIFACTS / "ui-image-search.png"))
