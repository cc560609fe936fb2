"""Open a local HTML file in a real headless Chromium (Debian's package, driven by Playwright)
and say what a reader would see broken: images that did not load, console errors, failed
requests. Playwright's own browser download is blocked here, so the system browser is used."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def chromium_path() -> str:
    """The system Chromium; in CI (`CI` set) its absence is a failure, elsewhere a skip."""
    for name in CANDIDATES:
        if (found := shutil.which(name)) is not None:
            return found
    if os.environ.get("CI"):
        pytest.fail("no Chromium on PATH: .ci/run installs Debian's chromium package")
    pytest.skip("no Chromium on PATH (apt-get install chromium) for the browser test")


@dataclass
class PageCheck:
    images: int = 0
    broken_images: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    external_requests: list[str] = field(default_factory=list)
    section_ids: list[str] = field(default_factory=list)
    page_height_px: int = 0


def check_page(html: Path, screenshot: Path | None = None, *, width: int = 1366, height: int = 900) -> PageCheck:
    """Load `html` from file:// at a laptop's viewport; optionally save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    out = PageCheck()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: out.console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: out.console_errors.append(str(e)))
            page.on("requestfailed", lambda r: out.failed_requests.append(r.url[:80]))
            page.on("request", lambda r: out.external_requests.append(r.url) if r.url.startswith(("http:", "https:")) else None)
            page.goto(html.resolve().as_uri(), wait_until="load")
            state = page.evaluate(
                "Array.from(document.images).map(i => [i.alt || i.src.slice(0, 40), i.complete && i.naturalWidth > 0])"
            )
            out.images = len(state)
            out.broken_images = [name for name, ok in state if not ok]
            out.section_ids = page.evaluate("Array.from(document.querySelectorAll('section[id]')).map(s => s.id)")
            out.page_height_px = int(page.evaluate("document.documentElement.scrollHeight"))
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return out
