"""The console in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a real
daemon on a real Redis: sign in, live feed of frames streamed through Redis, false alarm -> new reference and a new
version + threshold on screen, confirmed defect -> the eval folder, undo, and a write without the session's token
refused. ``INSPECTD_SCREENSHOTS=1`` writes the README's screenshots (docs/console-*.png) from the shared images."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inspectd.detectors.data.datasets import open_dataset
from tests.console_helpers import DEFECTS, GOODS, TOKEN, console_config, send, start

pytestmark = pytest.mark.redis

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium + ChromeDriver: apt-get install chromium chromium-driver (.ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e '.[dev]' installs selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, timeout: float = 30.0) -> Any:
    """Until ``condition`` holds; an element the live page re-rendered meanwhile (stale) just means: look again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


def _click(driver: Any, find: Any) -> None:
    """Click what ``find(driver)`` returns, finding it again if the live page replaced it before the click."""

    def attempt(d: Any) -> bool:
        find(d).click()
        return True

    _wait(driver, attempt)


def _sign_in(driver: Any) -> None:
    """Give the token in the sign-in dialog (open, or opening) and wait until the page is signed in."""
    from selenium.webdriver.common.by import By

    _wait(driver, lambda d: d.find_element(By.ID, "login").get_attribute("open") is not None)
    driver.find_element(By.ID, "login-token").send_keys(TOKEN)
    driver.find_element(By.ID, "login-submit").click()
    _wait(driver, lambda d: "signed-in" in d.find_element(By.TAG_NAME, "body").get_attribute("class"))


async def in_browser(fn: Any, *args: Any) -> Any:
    """Selenium blocks: run it on a thread so the daemon on this event loop keeps serving."""
    return await asyncio.to_thread(fn, *args)


async def wait_until_true(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _shot(driver: Any, name: str, tmp: Path) -> Path:
    target = (DOCS if os.environ.get("INSPECTD_SCREENSHOTS") == "1" else tmp) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(target))
    return target


async def test_console_in_a_real_browser(browser, redis_url, key_prefix, tmp_path, tiny_backbone,
                                         redis_client) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By

    daemon = await start(console_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver = browser
    try:
        # --- the page loads and asks for the token once (a token is configured: nothing is readable without it)
        await in_browser(driver.get, f"{base}/console/")
        await in_browser(_wait, driver, lambda d: d.find_element(By.ID, "login").get_attribute("open") is not None)

        def sign_in() -> None:
            driver.find_element(By.ID, "login-token").send_keys(TOKEN)
            driver.find_element(By.ID, "login-submit").click()
            _wait(driver, lambda d: "signed-in" in d.find_element(By.TAG_NAME, "body").get_attribute("class"))
            _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#product-nut .version"))
        await in_browser(sign_in)
        assert TOKEN not in driver.current_url and TOKEN not in driver.page_source
        assert driver.get_cookie("inspectd_console")["httpOnly"] is True

        # --- the live feed shows frames streamed through Redis as they are scored (no reload)
        ids = await send(redis_client, key_prefix, DEFECTS[:4] + GOODS[:2], size=240)
        await in_browser(_wait, driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feed-ng .frame-card")) == 6)
        shown = {c.get_attribute("data-frame-id") for c in driver.find_elements(By.CSS_SELECTOR, ".frame-card")}
        assert shown == set(ids)
        assert driver.find_element(By.CSS_SELECTOR, "#product-nut .version").text == "1"
        await in_browser(_wait, driver, lambda d: d.find_element(By.CSS_SELECTOR, "#product-nut .ng-rate").text
                         == "100.0 %")
        _shot(driver, "console-feed.png", tmp_path)

        # --- false alarm -> the frame becomes a reference, the product's version goes up, the new threshold shows
        before = daemon.registry.get("nut")
        target_id = ids[4]  # a good hazelnut scored NG by the low threshold: a false alarm

        def false_alarm() -> None:
            _click(driver, lambda d: d.find_element(
                By.CSS_SELECTOR, f'.frame-card[data-frame-id="{target_id}"] .btn-false-alarm'))
            _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#product-nut .version").text == "2")
        await in_browser(false_alarm)
        after = daemon.registry.get("nut")
        assert after.version == before.version + 1 and len(after.references) == len(before.references) + 1
        assert driver.find_element(By.CSS_SELECTOR, "#product-nut .threshold").text == f"{after.threshold:.4f}"
        assert driver.find_element(By.CSS_SELECTOR, "#product-nut .shots").text == "3"
        assert after.threshold != before.threshold

        # --- confirmed defect from the detail view -> image + mask in the folder eval layout
        defect_id = ids[0]

        def confirm_defect() -> None:
            _click(driver, lambda d: d.find_element(By.CSS_SELECTOR, f'.frame-card[data-frame-id="{defect_id}"] img'))
            _wait(driver, lambda d: d.find_element(By.ID, "detail").get_attribute("open") is not None)
            _wait(driver, lambda d: d.execute_script("return document.getElementById('detail-overlay').complete "
                                                     "&& document.getElementById('detail-overlay').naturalWidth > 0"))
            _shot(driver, "console-detail.png", tmp_path)
            label = driver.find_element(By.ID, "detail-label")
            label.clear()
            label.send_keys("colour")
            driver.find_element(By.ID, "detail-defect").click()
            _wait(driver, lambda d: d.find_element(By.ID, "detail-status").text.startswith("saved"))
            _click(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#detail form button"))
        await in_browser(confirm_defect)
        (category,) = open_dataset(daemon.feedback.root, "folder")
        defects = [s for s in category.test if s.label == 1]
        assert [s.defect_type for s in defects] == ["colour"] and defects[0].mask_path is not None
        assert defect_id.replace("-", "_") in defects[0].image_path.name.replace("-", "_")

        # --- a write without the session's CSRF token (what another page or a replayed cookie could send) is refused
        fetch = ("const done = arguments[arguments.length - 1];"
                 "fetch('/console/api/frames/' + arguments[0] + '/feedback', {method: 'POST',"
                 " credentials: 'same-origin', headers: {'Content-Type': 'application/json'},"
                 " body: JSON.stringify({action: 'defect'})})"
                 ".then(r => done(r.status));")
        card_id = next(i.id for i in daemon.review.items() if i.result["frame_id"] == ids[1])
        status = await in_browser(driver.execute_async_script, fetch, card_id)
        assert status == 401
        assert len([s for s in open_dataset(daemon.feedback.root, "folder")[0].test if s.label == 1]) == 1

        # --- undo the false alarm from the feedback list: the reference goes, the version moves on
        def undo() -> None:
            _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#feedback li")) == 2)
            _click(driver, lambda d: next(li for li in d.find_elements(By.CSS_SELECTOR, "#feedback li")
                                          if "false alarm" in li.text).find_element(By.CSS_SELECTOR, ".btn-undo"))
            _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#product-nut .version").text == "3")
        await in_browser(undo)
        assert daemon.registry.get("nut").references == before.references

        # --- where a product's false alarms go is chosen on the page, for every operator (kept by the daemon)
        def choose_holdout() -> None:
            from selenium.webdriver.support.ui import Select

            _wait(driver, lambda d: Select(d.find_element(By.CSS_SELECTOR, "#product-nut select.target"))
                  .select_by_value("holdout") or True)
            _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#product-nut select.target")
                  .get_attribute("value") == "holdout")
        await in_browser(choose_holdout)
        await wait_until_true(lambda: daemon.feedback.target_for("nut") == "holdout")

        # --- a phone-sized screen
        await in_browser(driver.set_window_size, 390, 844)
        await in_browser(driver.execute_script, "window.scrollTo(0, 0)")
        width = await in_browser(driver.execute_script, "return document.documentElement.scrollWidth")
        assert width <= 390 + 1  # nothing wider than the phone: no sideways scrolling
        _shot(driver, "console-phone.png", tmp_path)
    finally:
        await in_browser(driver.set_window_size, 1280, 900)
        await daemon.shutdown()


async def test_a_refused_live_view_says_so_and_goes_live_once_a_slot_frees(browser, redis_url, key_prefix, tmp_path,
                                                                           tiny_backbone, redis_client) -> None:
    """This address already holds its 4 live views (other tabs): the page says the live view was refused instead
    of "reconnecting" for ever (a browser never retries a 429), and goes live by itself when one of them closes."""
    import aiohttp
    from selenium.webdriver.common.by import By

    from inspectd.daemon.console import MAX_LIVE_STREAMS_PER_CLIENT

    daemon = await start(console_config(redis_url, key_prefix, tmp_path), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver = browser
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    http = aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0, force_close=True))
    streams = []
    try:
        for _ in range(MAX_LIVE_STREAMS_PER_CLIENT):  # the other tabs
            streams.append(response := await http.get("/console/api/events", headers=bearer))
            assert response.status == 200 and await asyncio.wait_for(response.content.readline(), 10)
        await in_browser(driver.delete_all_cookies)
        await in_browser(driver.get, f"{base}/console/")

        await in_browser(_sign_in, driver)
        await in_browser(_wait, driver, lambda d: "refused" in d.find_element(By.ID, "live").text)
        streams.pop().close()  # one tab closed
        await in_browser(_wait, driver, lambda d: d.find_element(By.ID, "live").text == "live")
        ids = await send(redis_client, key_prefix, DEFECTS[:1], size=240, tag="after-refusal")
        await in_browser(_wait, driver, lambda d: {c.get_attribute("data-frame-id")
                                                   for c in d.find_elements(By.CSS_SELECTOR, ".frame-card")}
                         >= set(ids))
    finally:
        for response in streams:
            response.close()
        await http.close()
        await daemon.shutdown()


async def test_a_session_that_ends_asks_to_sign_in_again_and_the_feed_comes_back(browser, redis_url, key_prefix,
                                                                                tmp_path, tiny_backbone,
                                                                                redis_client) -> None:
    """The session expires: the live stream ends and its reconnection is a 401, which a browser never retries.
    The page asks for the token again (it said "live view refused" and retried for ever) and, signed in, is live
    with the frames it missed."""
    from selenium.webdriver.common.by import By

    daemon = await start(console_config(redis_url, key_prefix, tmp_path, session_ttl_s=3.0), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver = browser

    try:
        await in_browser(driver.delete_all_cookies)
        await in_browser(driver.get, f"{base}/console/")
        await in_browser(_sign_in, driver)
        await in_browser(_wait, driver, lambda d: d.find_element(By.ID, "live").text == "live")
        await asyncio.sleep(3.5)  # the session expires
        await send(redis_client, key_prefix, DEFECTS[:1], size=240, tag="expired")  # the stream sees it and ends
        await in_browser(_wait, driver, lambda d: d.find_element(By.ID, "live").text == "signed out")
        await in_browser(_sign_in, driver)  # the sign-in dialog is open again
        ids = await send(redis_client, key_prefix, DEFECTS[1:2], size=240, tag="after")
        await in_browser(_wait, driver, lambda d: d.find_element(By.ID, "live").text == "live")

        def shown(d: Any) -> set[str]:
            return {c.get_attribute("data-frame-id") for c in d.find_elements(By.CSS_SELECTOR, ".frame-card")}

        await in_browser(_wait, driver, lambda d: set(ids) <= shown(d))
    finally:
        await daemon.shutdown()


async def test_a_frame_another_console_is_acting_on_says_so(browser, redis_url, key_prefix, tmp_path,
                                                            tiny_backbone, redis_client) -> None:
    """With console.review: redis, a frame an operator at another instance is giving feedback on carries a
    pending claim; its card said "confirmed defect (undefined)"."""
    from selenium.webdriver.common.by import By

    daemon = await start(console_config(redis_url, key_prefix, tmp_path, review="redis"), tiny_backbone)
    base = f"http://127.0.0.1:{daemon.http_port}"
    driver = browser
    try:
        [claimed] = await send(redis_client, key_prefix, DEFECTS[:1], size=160, tag="claim")
        store = daemon.review.store
        for _ in range(200):
            found = [s["id"] for s in await store.summaries(50) if s["frame_id"] == claimed]
            if found:
                break
            await asyncio.sleep(0.05)
        assert found and await store.claim(found[0])  # as another instance's operator would
        await in_browser(driver.delete_all_cookies)
        await in_browser(driver.get, f"{base}/console/")

        def done(d: Any) -> list[Any]:
            return d.find_element(By.CSS_SELECTOR, f'.frame-card[data-frame-id="{claimed}"]').find_elements(
                By.CSS_SELECTOR, ".done")

        await in_browser(_sign_in, driver)
        await in_browser(_wait, driver, done)
        assert done(driver)[0].text == "feedback under way…"
    finally:
        await daemon.shutdown()
