"""Regenerate docs/app.png: the app as `make demo` starts it, answering a question about a picture.

    python docs/screenshot.py [--question "What shape is the blue object?"] [--image path.png] [--expect square]

A headless Chromium (Debian's chromium + chromium-driver, as the browser tests use) opens the page, attaches
the picture, asks the question, waits for the streamed answer to contain `--expect`, and saves the page.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmadapter.app.serve import add_serve_args, launch  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser():
    import shutil

    from selenium import webdriver

    binary, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver):
        sys.exit("chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--question", default="What color is this shape?")
    parser.add_argument("--image", default=str(ROOT / "mmadapter" / "app" / "examples" / "red_circle.png"))
    parser.add_argument("--expect", default="red", help="wait until the answer contains this")
    parser.add_argument("--out", default=str(ROOT / "docs" / "app.png"))
    args = parser.parse_args()

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    demo, url = launch(serve.parse_args(["--port", str(free_port())]), block=False)
    page = browser()
    try:
        page.get(url)
        wait = WebDriverWait(page, 300)
        picker = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "input[type=file]")))
        picker.send_keys(str(Path(args.image).resolve()))
        time.sleep(2)  # the upload reaches the server
        box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
        box.send_keys(args.question)
        box.send_keys(Keys.ENTER)
        bubbles = (By.CSS_SELECTOR, ".bot .message-content, .bot")
        wait.until(lambda b: any(args.expect in e.text.lower() for e in b.find_elements(*bubbles)))
        time.sleep(2)  # the last streamed state reaches the page
        page.save_screenshot(args.out)
        print(f"saved {args.out}")
    finally:
        page.quit()
        demo.close()


if __name__ == "__main__":
    main()
