"""The try-it page (`--http-ui`) in Debian's headless Chromium, against a real gateway.

A person's path through the page: pick a photo from the file input, see the cut-out, download it;
a file that is no image, whose refusal the page shows as the API words it; a missing key and a key
over its rate (403, then 429 with Retry-After); labels, keyboard order and the page's strict CSP.
The gateways here serve HTTP and reuse the session gateway's embedded Triton: the model work is real.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from PIL import Image
from selenium import webdriver
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from bgremove_gateway.access.keys import KeyLimits, new_key, write_keys
from service_harness import GatewayProcess, free_port

UI = Path(__file__).resolve().parents[2] / "server" / "bgremove_gateway" / "http" / "ui"
PHOTO = "anime-girl-1.jpg"
# Generous: two shared cores, a cold browser and a model run on the CPU.
WAIT_S = 180.0


def _http_ready(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _ui_gateway(triton: GatewayProcess, *args: str) -> Iterator[str]:
    """A gateway with --http-ui sharing `triton`'s embedded Triton; yields the page's base URL."""
    port = free_port()
    gw = GatewayProcess(
        args=[
            "--http-listen",
            f"127.0.0.1:{port}",
            "--http-ui",
            "--triton-url",
            f"127.0.0.1:{triton.triton_grpc_port}",
            *args,
        ]
    )
    with gw.serving():
        base = f"http://127.0.0.1:{port}/"
        _http_ready(base)
        yield base


@pytest.fixture(scope="module")
def site(gateway: GatewayProcess) -> Iterator[str]:
    with _ui_gateway(gateway) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_site(
    gateway: GatewayProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A page on a gateway that requires keys; its one key may make one call per 1000 s."""
    path = tmp_path_factory.mktemp("ui-keys") / "keys.json"
    record, key = new_key("ui", KeyLimits(rate=0.001, burst=1, max_streams=0))
    write_keys(path, [record])
    with _ui_gateway(gateway, "--api-keys-file", str(path)) as base:
        yield base, key


@pytest.fixture
def downloads(tmp_path: Path) -> Path:
    path = tmp_path / "downloads"
    path.mkdir()
    return path


@pytest.fixture
def browser(downloads: Path) -> Iterator[Chrome]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail(
            "this test needs Debian's chromium and chromium-driver (/usr/bin/chromium,"
            " /usr/bin/chromedriver): `make tools` installs them"
        )
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver path given: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
        )
        yield driver
    finally:
        driver.quit()


def _finished(driver: Chrome) -> str:
    """Waits until the page says done or error; returns which."""

    def settled(d: Chrome) -> str | None:
        state = d.find_element(By.ID, "status").get_attribute("data-state")
        return state if state in ("done", "error") else None

    state = WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(settled)
    assert state is not None
    return state


def _text(driver: Chrome, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _csp_violations(driver: Chrome) -> list[str]:
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [e["message"] for e in entries if "Content Security Policy" in e.get("message", "")]


def _alpha(data: bytes) -> np.ndarray[Any, np.dtype[np.uint8]]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG" and image.mode == "RGBA", (image.format, image.mode)
        return np.asarray(image.getchannel("A"))


def test_a_photo_becomes_a_downloadable_cutout_matching_the_api(
    site: str, browser: Chrome, downloads: Path, peer_fixtures: Path
) -> None:
    photo = peer_fixtures / PHOTO
    with Image.open(photo) as image:
        size = image.size
    browser.get(site)
    assert browser.title.startswith("bgremove")
    browser.find_element(By.ID, "file").send_keys(str(photo))

    state = _finished(browser)
    assert state == "done", f"{_text(browser, 'status')}: {_text(browser, 'error')}"
    shown = browser.execute_script(
        "const i = document.getElementById('result'); return [i.complete, i.naturalWidth, i.naturalHeight];"
    )
    assert shown == [True, *size], "the cut-out is shown at the photo's size"
    link = browser.find_element(By.ID, "download")
    href = link.get_attribute("href") or ""
    assert href.startswith("blob:"), "the result never leaves the tab: a blob: URL"
    assert link.get_attribute("download") == "anime-girl-1-cutout.png"

    link.click()
    target = downloads / "anime-girl-1-cutout.png"
    WebDriverWait(browser, WAIT_S, poll_frequency=0.25).until(
        lambda _: target.exists() and not list(downloads.glob("*.crdownload"))
    )
    downloaded = target.read_bytes()
    with Image.open(io.BytesIO(downloaded)) as image:
        assert image.size == size
    mask = _alpha(downloaded)

    # The same photo and options straight to the API: the page adds nothing and loses nothing.
    direct = requests.post(
        site + "v1.0/removebg",
        files={"image_file": ("image", photo.read_bytes())},
        data={"format": "png", "channels": "rgba", "size": "auto"},
        timeout=WAIT_S,
    )
    assert direct.status_code == 200, direct.text
    expected = _alpha(direct.content)
    assert mask.shape == expected.shape
    diff = np.abs(mask.astype(np.int16) - expected.astype(np.int16))
    assert int(diff.max()) <= 2, f"mask differs from the API's by up to {int(diff.max())}"
    assert 0 < int((mask > 127).sum()) < mask.size, "a real cut-out: some subject, some background"
    assert _csp_violations(browser) == []


def test_a_photo_dropped_on_the_page_is_processed_like_a_picked_one(
    site: str, browser: Chrome, peer_fixtures: Path
) -> None:
    photo = peer_fixtures / "car-1.jpg"
    browser.get(site)
    # WebDriver cannot drag from the desktop: the page gets the drop event a real drag would give it.
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const dt = new DataTransfer();"
        "dt.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));"
        "document.getElementById('dropzone').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        base64.b64encode(photo.read_bytes()).decode(),
        photo.name,
    )
    assert _finished(browser) == "done", _text(browser, "error")
    assert browser.find_element(By.ID, "download").get_attribute("download") == "car-1-cutout.png"
    assert "480 \u00d7 360 px" in _text(browser, "result-info")


def test_a_file_that_is_no_image_shows_the_apis_message(site: str, browser: Chrome, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"shopping list: eggs, flour, milk\n" * 20)
    direct = requests.post(
        site + "v1.0/removebg", files={"image_file": ("image", notes.read_bytes())}, timeout=WAIT_S
    )
    assert direct.status_code == 400, direct.text
    error = direct.json()["errors"][0]

    browser.get(site)
    browser.find_element(By.ID, "file").send_keys(str(notes))
    assert _finished(browser) == "error"
    alert = browser.find_element(By.ID, "error")
    assert alert.is_displayed() and alert.get_attribute("role") == "alert"
    assert _text(browser, "error-title") == error["title"]
    assert _text(browser, "error-detail") == error.get("detail", "")
    assert "HTTP 400" in _text(browser, "error-meta")
    assert not browser.find_element(By.ID, "download-row").is_displayed(), "nothing to download"
    assert _csp_violations(browser) == []


def test_the_key_field_is_sent_and_refusals_say_why_and_when_to_retry(
    keyed_site: tuple[str, str], browser: Chrome, peer_fixtures: Path
) -> None:
    base, key = keyed_site
    browser.get(base)
    browser.find_element(By.ID, "file").send_keys(str(peer_fixtures / "car-1.jpg"))
    assert _finished(browser) == "error", "no key, and this gateway requires one"
    assert "HTTP 403" in _text(browser, "error-meta")
    assert _text(browser, "error-detail"), "the API's reason is shown"

    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "submit").click()
    assert _finished(browser) == "done", _text(browser, "error")

    browser.find_element(By.ID, "submit").click()
    assert _finished(browser) == "error", "the key's one call per 1000 s is spent"
    meta = _text(browser, "error-meta")
    assert "HTTP 429" in meta
    retry = re.search(r"retry after (\d+) s", meta)
    assert retry is not None and 0 < int(retry.group(1)) <= 1000, meta
    assert key not in browser.page_source, "the key is never written into the page"


def test_every_control_is_labelled_and_reachable_by_keyboard(site: str, browser: Chrome) -> None:
    browser.get(site)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, button')]"
        ".filter(e => e.tagName !== 'BUTTON' && !(e.id && document.querySelector(`label[for='${e.id}']`)))"
        ".map(e => e.id || e.outerHTML);"
    )
    assert unlabelled == []
    assert browser.execute_script("return [...document.images].every(i => i.alt.trim().length > 0);")
    # Tab from the top reaches the file input first, then every option, then the button.
    order = []
    for _ in range(12):
        ActionChains(browser).send_keys(Keys.TAB).perform()
        order.append(browser.switch_to.active_element.get_attribute("id"))
    assert order[0] == "file"
    for control in ("format", "channels", "size", "crop", "use-bg", "api-key", "submit"):
        assert control in order, (control, order)


def test_the_page_enforces_a_strict_csp(site: str, browser: Chrome) -> None:
    browser.get(site)
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "status").text != "")
    assert _csp_violations(browser) == [], "the page's own code and styles pass its policy"
    ran = browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.inlineRan = true;';"
        "document.head.appendChild(s); return window.inlineRan === true;"
    )
    assert ran is False, "an inline script is blocked: the policy is in force"
    assert _csp_violations(browser), "and the browser reports the blocked inline script"


def test_the_page_has_no_inline_code_and_nothing_from_elsewhere() -> None:
    """No inline script or style, no inline handlers, nothing fetched from another origin."""
    html = (UI / "index.html").read_text()
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all("src=" in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"<style\b|\sstyle=|\son[a-z]+=", html, re.I)
    for name in ("index.html", "app.js", "style.css"):
        text = (UI / name).read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), (
            f"{name} names another origin"
        )
        for store in ("localStorage", "sessionStorage", "indexedDB", "document.cookie"):
            assert store not in text, f"{name} stores something in {store}"
