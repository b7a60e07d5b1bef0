"""Headless Chromium for the web console's browser tests (issue 19), driven by Selenium through
Debian's chromedriver: one browser per operator, explicit waits only (WebDriverWait, never a
sleep), every failed wait reported with the page's URL, its text and the browser's console (a
script refused by the Content-Security-Policy shows there), and screenshots kept as artifacts.

Screenshots go to `$TM_ARTIFACTS/console/` when TM_ARTIFACTS is set, else to a directory the
test gives (its tmp_path); with TM_SCREENSHOTS=1 each is also written to `docs/console/<name>.png`
in the repository: that is how the README's screenshots are refreshed."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "console"
WAIT = 15.0  # seconds any one thing may take to show; a loaded CI machine included
WIDTH, HEIGHT = 1280, 800
# Debian's binaries (packages chromium and chromium-driver, installed by scripts/test); given to
# Selenium by path, so it never looks for (or tries to download) a browser or driver of its own.
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARGS = (
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={WIDTH},{HEIGHT}",
    # No connection anywhere but the console: this machine's network is closed, and Chromium's
    # own background traffic (updates, sync, safe browsing) would only fail and slow it down.
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--lang=en-US",
)
T = TypeVar("T")


def browser_missing() -> str | None:
    """Why the browser tests cannot run on this machine, or None when they can."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not os.access(path, os.X_OK):
            return f"{name} is not installed (scripts/test installs Debian's chromium and chromium-driver)"
    return None


def require_browser() -> None:
    """Skip when Chromium or its driver is missing; in CI (where scripts/test installs both), fail."""
    reason = browser_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must have it")
    pytest.skip(reason)


def artifacts_dir(fallback: Path) -> Path:
    """Where screenshots and browser logs go: $TM_ARTIFACTS/console/, else `fallback`."""
    base = os.environ.get("TM_ARTIFACTS")
    path = Path(base) / "console" if base else fallback
    path.mkdir(parents=True, exist_ok=True)
    return path


def css_string(text: str) -> str:
    """`text` as a quoted CSS string, for attribute selectors on SPIFFE IDs and the like."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\a ") + '"'


@dataclass
class Browser:
    """One headless Chromium (one operator's), at `base` (https://localhost:PORT)."""

    driver: webdriver.Chrome
    base: str
    artifacts: Path
    label: str
    logged_in_as: str = ""
    console: list[dict[str, Any]] = field(default_factory=list)

    # --- navigation and waiting -------------------------------------------------------------

    def open(self, path: str, *ready: str) -> None:
        """Load `path` and wait until every CSS selector in `ready` is displayed."""
        self.driver.get(self.base + path)
        for selector in ready:
            self.visible(selector)

    def wait(self, condition: Callable[[webdriver.Chrome], T], what: str, timeout: float = WAIT) -> T:
        """Poll `condition` until it returns something truthy; on time-out an AssertionError naming
        `what`, with the page and the browser's console."""
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(StaleElementReferenceException,)).until(condition)
        except TimeoutException:
            raise AssertionError(f"[{self.label}] timed out after {timeout:.0f}s waiting for {what}\n"
                                 f"{self.diagnosis()}") from None

    def find(self, selector: str) -> WebElement | None:
        found = self.driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found else None

    def present(self, selector: str, timeout: float = WAIT) -> WebElement:
        return self.wait(lambda d: self.find(selector), f"{selector} to be on {self.path()}", timeout)

    def visible(self, selector: str, timeout: float = WAIT) -> WebElement:
        def shown(_: webdriver.Chrome) -> WebElement | None:
            element = self.find(selector)
            return element if element is not None and element.is_displayed() else None
        return self.wait(shown, f"{selector} to be displayed on {self.path()}", timeout)

    def gone(self, selector: str, timeout: float = WAIT) -> None:
        self.wait(lambda d: not d.find_elements(By.CSS_SELECTOR, selector), f"{selector} to go away", timeout)

    def text_of(self, selector: str, predicate: Callable[[str], bool], what: str, timeout: float = WAIT) -> str:
        """Wait until the text of `selector` satisfies `predicate`; return that text."""
        def check(_: webdriver.Chrome) -> str | None:
            element = self.find(selector)
            text = element.text if element is not None else None
            return text if text is not None and predicate(text) else None
        return self.wait(check, f"{selector} {what}", timeout)

    def path(self) -> str:
        url: str = self.driver.current_url
        return url[len(self.base):] if url.startswith(self.base) else url

    def js(self, script: str, *args: object) -> Any:
        return self.driver.execute_script(script, *args)

    def fetch(self, path: str, method: str = "GET", headers: dict[str, str] | None = None,
              body: object = None) -> dict[str, Any]:
        """`fetch()` from the page itself (its cookies, its origin): {"status", "body"}."""
        script = """
            const [path, method, headers, body, done] = arguments;
            const init = {method, headers, credentials: 'same-origin'};
            if (body !== null) init.body = JSON.stringify(body);
            fetch(path, init)
              .then(async (r) => done({status: r.status, body: await r.text()}))
              .catch((e) => done({status: -1, body: String(e)}));
        """
        result: dict[str, Any] = self.driver.execute_async_script(script, path, method, headers or {}, body)
        return result

    # --- evidence ---------------------------------------------------------------------------

    def screenshot(self, name: str, top: bool = True, docs: bool = True) -> Path:
        """`name`.png in the artifacts directory, and (unless `docs` is False) in docs/console/ when
        TM_SCREENSHOTS=1; of the top of the page unless `top` is False (a click may have scrolled it)."""
        path = self.artifacts / f"{name}.png"
        if top:
            self.js("window.scrollTo(0, 0)")
        png = self.driver.get_screenshot_as_png()
        path.write_bytes(png)
        if docs and os.environ.get("TM_SCREENSHOTS") == "1":
            DOCS.mkdir(parents=True, exist_ok=True)
            (DOCS / f"{name}.png").write_bytes(png)
        return path

    def console_log(self) -> list[dict[str, Any]]:
        """Everything the browser's console said so far (kept: reading it empties Chrome's)."""
        try:
            self.console.extend(self.driver.get_log("browser"))
        except WebDriverException:
            pass
        return self.console

    def diagnosis(self) -> str:
        try:
            body = self.driver.find_element(By.TAG_NAME, "body").text
        except WebDriverException:
            body = "<no body>"
        logs = "\n".join(f"  {e.get('level')}: {e.get('message')}" for e in self.console_log()[-15:])
        shot = ""
        try:
            shot = f"screenshot: {self.screenshot(f'failure-{self.label}', top=False, docs=False)}\n"
        except WebDriverException:
            pass
        return (f"url: {self.driver.current_url}\ntitle: {self.driver.title!r}\n{shot}"
                f"page text:\n  {body[:1500]!r}\nbrowser console (last 15):\n{logs or '  <empty>'}")

    def overflow(self) -> dict[str, Any]:
        """Horizontal overflow of the page: the document's scroll width against the viewport's,
        and the first elements sticking out past the viewport that no scroll container holds."""
        result: dict[str, Any] = self.js("""
            const root = document.documentElement, width = root.clientWidth;
            const held = (el) => {
              for (let p = el.parentElement; p && p !== document.body; p = p.parentElement) {
                const o = getComputedStyle(p).overflowX;
                if (o === 'auto' || o === 'scroll' || o === 'hidden' || o === 'clip') return true;
              }
              return false;
            };
            const culprits = [];
            for (const el of document.body.querySelectorAll('*')) {
              const r = el.getBoundingClientRect();
              if (r.width && r.right > width + 1 && !held(el)) {
                culprits.push(el.tagName.toLowerCase() + (el.id ? '#' + el.id : '') +
                              (el.className && typeof el.className === 'string' ?
                               '.' + el.className.trim().split(/\\s+/).join('.') : '') +
                              ' right=' + Math.round(r.right));
                if (culprits.length >= 8) break;
              }
            }
            return {scroll_width: Math.max(root.scrollWidth, document.body.scrollWidth),
                    viewport_width: width, inner_width: window.innerWidth, culprits};
        """)
        return result

    def in_view(self, selector: str) -> bool:
        """Displayed, with some size, and starting inside the viewport horizontally."""
        element = self.find(selector)
        if element is None or not element.is_displayed():
            return False
        box: dict[str, float] = self.js("const r = arguments[0].getBoundingClientRect();"
                                        "return {left: r.left, right: r.right, width: r.width, height: r.height,"
                                        " viewport: document.documentElement.clientWidth};", element)
        return box["width"] > 0 and box["height"] > 0 and 0 <= box["left"] < box["viewport"]

    # --- zoom -------------------------------------------------------------------------------

    def zoom(self, factor: float) -> None:
        """Show pages as a person zooming the 1280x800 window to `factor` sees them: a CSS
        viewport of 1280/factor x 800/factor at factor device pixels each (DevTools' device
        metrics, which survive navigation, as zoom does); 1 returns to normal."""
        if factor == 1:
            self.driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
            return
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": int(WIDTH / factor), "height": int(HEIGHT / factor), "deviceScaleFactor": factor,
            "mobile": False})

    def quit(self) -> None:
        try:
            self.console_log()
            if self.console:
                (self.artifacts / f"console-{self.label}.log").write_text(
                    "\n".join(f"{e.get('level')}: {e.get('message')}" for e in self.console) + "\n")
        finally:
            self.driver.quit()


def start_browser(base: str, artifacts: Path, label: str) -> Browser:
    """A fresh headless Chromium (its own empty profile, so its own cookies) for `base`."""
    artifacts.mkdir(parents=True, exist_ok=True)
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ARGS:
        options.add_argument(arg)
    # The console serves the server's own certificate (its SVID, from the trust domain's CA),
    # which Chromium does not know.
    options.set_capability("acceptInsecureCerts", True)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER,
                      service_args=[f"--log-path={artifacts / f'chromedriver-{label}.log'}"])
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(WAIT)
    return Browser(driver, base, artifacts, label)


@dataclass
class Browsers:
    """Starts browsers on demand and quits them all at the end."""

    base: str
    artifacts: Path
    started: list[Browser] = field(default_factory=list)

    def start(self, label: str) -> Browser:
        browser = start_browser(self.base, self.artifacts, label)
        self.started.append(browser)
        return browser

    def close(self) -> None:
        for browser in self.started:
            try:
                browser.quit()
            except WebDriverException:
                pass


def browsers(base: str, artifacts: Path) -> Iterator[Browsers]:
    """For a fixture: `yield from browsers(...)`."""
    pool = Browsers(base, artifacts)
    try:
        yield pool
    finally:
        pool.close()
