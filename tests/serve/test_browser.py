"""The web page in a real headless Chromium (Debian chromium + chromedriver via selenium).

Type a query -> result thumbnails load; upload an image -> label bars appear. Skips with a clear
reason when chromium/chromedriver/selenium are missing (CI installs them with .ci/browser-deps.sh).
A screenshot is saved (to $CLIPFORGE_SCREENSHOT_DIR when set, else the test's tmp dir).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]


def _driver(tmp_path: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; see .ci/browser-deps.sh)")
    if not CHROMIUM or not DRIVER:
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium-manager try to download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(f)
    return webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)


def _wait(cond, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_page_search_and_classify(server_factory, tmp_path, tiny_model_serve, tiny_index_dir, sample_jpeg):
    from selenium.webdriver.common.by import By

    img = tmp_path / "upload.jpg"
    img.write_bytes(sample_jpeg)
    shots = Path(os.environ.get("CLIPFORGE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with server_factory(tiny_model_serve, tiny_index_dir) as url:
        driver = _driver(tmp_path)
        try:
            driver.set_page_load_timeout(30)
            driver.get(url + "/")
            _wait(lambda: "images" in driver.find_element(By.ID, "info").text, what="health info")
            # search: type a query, submit, wait until every thumbnail has loaded real pixels
            box = driver.find_element(By.ID, "q")
            box.send_keys("a red square")
            driver.find_element(By.ID, "search-btn").click()
            _wait(
                lambda: len(driver.find_elements(By.CSS_SELECTOR, "#results .card")) == 24,
                what="result cards",
            )
            loaded = _wait(
                lambda: driver.execute_script(
                    "const ims=[...document.querySelectorAll('#results img')];"
                    "return ims.length && ims.every(i => i.complete && i.naturalWidth > 0) ? ims.length : 0;"
                ),
                what="thumbnails to load",
            )
            assert loaded == 24
            status = driver.find_element(By.ID, "search-status").text
            assert status.startswith("24 results"), status
            first_caption = driver.find_element(By.CSS_SELECTOR, "#results .card .cap").text
            assert "square" in first_caption
            # classify: upload an image with the cifar10 label set selected -> 10 bars
            driver.find_element(By.ID, "file").send_keys(str(img))
            driver.find_element(By.ID, "classify-btn").click()
            _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 10, what="label bars")
            labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#bars .bar .label")]
            cifar = {"airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"}
            assert set(labels) == cifar
            widths = driver.execute_script(
                "return [...document.querySelectorAll('#bars .fill')].map(e => parseFloat(e.style.width));"
            )
            assert widths == sorted(widths, reverse=True) and abs(sum(widths) - 100) < 2
            # custom labels too
            driver.find_element(By.ID, "labels").send_keys("red square, green square, blue square")
            driver.find_element(By.ID, "classify-btn").click()
            _wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 3, what="custom bars")
            assert "custom" in driver.find_element(By.ID, "classify-status").text
            driver.save_screenshot(str(shots / "clipforge-page.png"))
            # an error is shown on the page, not thrown: empty query
            driver.find_element(By.ID, "q").clear()
            driver.find_element(By.ID, "search-btn").click()
            _wait(lambda: "type something" in driver.find_element(By.ID, "search-status").text, what="error")
        finally:
            driver.quit()
    assert (shots / "clipforge-page.png").stat().st_size > 10_000


@pytest.mark.slow
def test_page_shows_the_caption_under_an_uploaded_image(
    tmp_path, tiny_model_serve, tiny_captioner, sample_jpeg, colour_jpeg, make_caption_server, server_factory
):
    """With --captioner, choosing an image shows its generated caption under the preview; a second
    image replaces it; without a captioner no caption line appears (and nothing fails)."""
    from selenium.webdriver.common.by import By

    red, blue = tmp_path / "red.jpg", tmp_path / "blue.jpg"
    red.write_bytes(sample_jpeg)  # the first sample of the b shard: a red square
    blue.write_bytes(colour_jpeg("blue", 5))
    shots = Path(os.environ.get("CLIPFORGE_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    driver = _driver(tmp_path)
    try:
        driver.set_page_load_timeout(30)
        with make_caption_server(tiny_model_serve, tiny_captioner) as url:
            driver.get(url + "/")
            _wait(lambda: "captions on" in driver.find_element(By.ID, "info").text, what="health info")
            driver.find_element(By.ID, "file").send_keys(str(red))
            cap = driver.find_element(By.ID, "caption")
            _wait(lambda: cap.text == "a red square", what="the red square's caption")
            assert driver.find_element(By.ID, "preview").is_displayed() and cap.is_displayed()
            below = driver.execute_script(
                "const p=$('preview').getBoundingClientRect(), c=$('caption').getBoundingClientRect();"
                "return c.top >= p.bottom - 1 && c.left < p.right;"
            )
            assert below, "the caption is not under the image"
            assert _wait(lambda: driver.execute_script("return $('preview').naturalWidth"), what="preview")
            driver.save_screenshot(str(shots / "clipforge-caption.png"))
            driver.find_element(By.ID, "file").send_keys(str(blue))
            _wait(lambda: cap.text == "a blue square", what="the blue square's caption")
        with server_factory(tiny_model_serve, None) as url:
            driver.get(url + "/")
            _wait(lambda: "no index" in driver.find_element(By.ID, "info").text, what="health info")
            assert "captions on" not in driver.find_element(By.ID, "info").text
            driver.find_element(By.ID, "file").send_keys(str(red))
            _wait(lambda: driver.find_element(By.ID, "preview").is_displayed(), what="preview")
            time.sleep(0.5)
            assert not driver.find_element(By.ID, "caption").is_displayed()
    finally:
        driver.quit()
    assert (shots / "clipforge-caption.png").stat().st_size > 5_000
