"""Screenshots of the page of ``twotower serve`` for the README (``docs/img/page-*.png``).

    .venv/bin/python benchmarks/page_screenshots.py --run runs/ml100k --user 1

Starts ``twotower serve RUN`` on a free port, opens the page in headless Chromium (Debian's
``chromium`` and ``chromium-driver`` through Selenium, as tests/test_page.py does), and saves three
states: a known user at alpha 0, the same user with alpha raised and similar items open, a new
user (alpha 0) built from three clicked titles. The PNGs are reduced to a 256-colour palette (each well under
300 KB).
"""
from __future__ import annotations

import argparse
import base64
import io
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--force-device-scale-factor=1"]


def _serve(run: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", run, "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            if proc.poll() is not None:
                raise SystemExit(f"twotower serve failed: {proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("twotower serve did not start in 120 s")


def _settled(d, list_id: str, before: int) -> bool:
    return (d.execute_script("return document.body.dataset.pending") == "0"
            and int(d.find_element("id", list_id).get_attribute("data-version")) > before)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained run directory")
    ap.add_argument("--user", default="1", help="the known user to show")
    ap.add_argument("--alpha-steps", type=int, default=8, help="right-arrow presses on the slider (0.05 each)")
    ap.add_argument("--similar-rank", type=int, default=1, help="which recommendation to open similar items for (1 = first)")
    ap.add_argument("--titles", default="star wars,toy story,fargo", help="comma-separated searches for the new user")
    ap.add_argument("--width", type=int, default=1360)
    ap.add_argument("--height", type=int, default=1100)
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args(argv)

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = _serve(args.run, port)
    profile = tempfile.mkdtemp(prefix="twotower-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for f in FLAGS + [f"--user-data-dir={profile}", f"--window-size={args.width},{args.height}"]:
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wait = WebDriverWait(d, 60)

    def shot(name: str) -> None:
        png = base64.b64decode(d.get_screenshot_as_base64())
        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        path = out / f"page-{name}.png"
        img.save(path, optimize=True)
        print(f"{path}: {path.stat().st_size / 1024:.0f} KB")

    def version(list_id: str) -> int:
        return int(d.find_element("id", list_id).get_attribute("data-version"))

    try:
        d.get(f"http://127.0.0.1:{port}/#user={args.user}")
        wait.until(lambda d: _settled(d, "recommendations", 0))
        shot("user")

        before = version("recommendations")
        slider = d.find_element("id", "alpha")
        for _ in range(args.alpha_steps):
            slider.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: _settled(d, "recommendations", before))
        before = version("similar")
        d.find_elements("css selector", "#recommendations li[data-item]")[args.similar_rank - 1].click()
        wait.until(lambda d: _settled(d, "similar", before))
        shot("alpha-similar")

        slider.send_keys(Keys.HOME)  # back to alpha 0 (the slider starts at -0.5)
        for _ in range(10):
            slider.send_keys(Keys.ARROW_RIGHT)
        d.find_element("id", "mode-new").click()
        wait.until(lambda d: d.find_elements("css selector", "#item-results li[data-item]"))
        for q in args.titles.split(","):
            box = d.find_element("id", "item-search")
            box.clear()
            before = version("item-results")
            box.send_keys(q)
            wait.until(lambda d: _settled(d, "item-results", before))
            before = version("recommendations")
            d.find_element("css selector", "#item-results li[data-item]").click()
            wait.until(lambda d: _settled(d, "recommendations", before))
        shot("new-user")
    finally:
        d.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.terminate()
        server.wait(timeout=20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
