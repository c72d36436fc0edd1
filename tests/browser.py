"""Headless Chromium (Debian's ``chromium``) for tests of web pages: what the browser renders (``--dump-dom``)
and a screenshot. Without a browser a test skips, except under ``CI``, where it fails: pages must be checked in
a browser there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI is set and no Chromium is installed: the operator page must be checked in a browser "
                        "(apt-get install -y chromium)")
        pytest.skip("no Chromium installed (apt-get install -y chromium)")
    return found


def render(url: str, workdir: Path, shot_name: str = "page.png") -> tuple[str, Path]:
    """The DOM a headless Chromium builds from ``url`` and the path of its screenshot (in ``workdir``). A browser
    cannot send a bearer header from its command line: ``url`` must answer without a token."""
    browser = chromium()
    flags = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={workdir / 'browser-profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    shot = workdir / shot_name
    subprocess.run([browser, *flags, "--window-size=1000,1100", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 1000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "a PNG screenshot"
    print(f"screenshot of {url}: {shot}")
    return dom, shot
