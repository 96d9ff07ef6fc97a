"""Helpers the app tests share: a free local port, waiting for a released upload to go, a headless browser."""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(path: str | Path, timeout_s: float = 10.0) -> bool:
    """Whether the file is deleted within the timeout (a released upload goes after the app's grace)."""
    path = Path(path)
    deadline = time.monotonic() + timeout_s
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not path.exists()


def chromium_driver():
    """Debian's headless chromium through selenium; the test is skipped where they are not installed."""
    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        pytest.skip("headless browser test skipped: Debian's chromium and chromium-driver are not installed "
                    "(`make test` installs them where apt-get is available)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
