"""Headless Chromium for the page tests: Debian's `chromium`, installed here when missing.

Under CI (``CI=true``) a page test never skips: when Chromium or Playwright cannot be had it fails. On a
developer's machine without root it skips with the command that would install it.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

NAMES = ("chromium", "chromium-browser")


def _found() -> str | None:
    return next((path for path in map(shutil.which, NAMES) if path), None)


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"page tests need headless Chromium under CI: {reason}")
    pytest.skip(reason)


def chromium() -> str:
    """The path of a Chromium executable, installing Debian's package first where it is missing."""
    path = _found()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                _unavailable(f"{' '.join(command)} failed: {done.stderr[-500:]}")
        path = _found()
    if path is None:
        _unavailable("Chromium is not installed (as root: apt-get install chromium)")
    return path


def open_page(url: str, screenshot: str) -> dict:
    """Load ``url`` in headless Chromium and screenshot the whole page; returns the page's console messages
    and errors, its images (``complete``, natural width) and its text."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[test]')")
    executable = chromium()
    messages: list[tuple[str, str]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: messages.append((m.type, m.text)))
            page.on("pageerror", lambda e: messages.append(("pageerror", str(e))))
            page.on("requestfailed", lambda r: messages.append(("requestfailed", r.url[:200])))
            page.goto(url, wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, alt: i.alt}))"
            )
            text = page.inner_text("body")
            page.screenshot(path=screenshot, full_page=True)
        finally:
            browser.close()
    return {"messages": messages, "images": images, "text": text}
