"""The page of ``twotower serve`` on a 1M-item catalog: what one visit transfers and how long it waits.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/page_big_catalog.py

Writes the synthetic run of ``synthetic_catalog.write_run`` (1M items, 10k users, ids only, no
titles or categories; kept in ``--run``), serves it (exact search), and in headless Chromium: loads
the page (a random user and the top 20), switches to the new-user mode (the most popular items),
searches an id and clicks the first match. Prints every request the browser made with its size and
duration, the total, and the browser's errors (none expected); writes
``benchmarks/results/page-1m.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1360,1000"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(ROOT / "runs" / "synthetic-1m"), help="where the synthetic run is (written if missing)")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--search", default="99999", help="what the new user searches for")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "page-1m.json"))
    args = ap.parse_args(argv)

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    run = Path(args.run)
    if not (run / "manifest.json").is_file():
        from synthetic_catalog import write_run

        write_run(run, n_items=args.items, n_users=10_000)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(run), "--port", str(port), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    profile = tempfile.mkdtemp(prefix="twotower-chromium-")
    d = None
    try:
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit("twotower serve exited")
                time.sleep(0.3)
        opts = webdriver.ChromeOptions()
        opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for f in FLAGS + [f"--user-data-dir={profile}"]:
            opts.add_argument(f)
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        d = webdriver.Chrome(service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"), options=opts)
        wait = WebDriverWait(d, 120)
        settled = lambda d: d.execute_script("return document.body.dataset.pending") == "0"  # noqa: E731

        t0 = time.perf_counter()
        d.get(f"{base}/")
        wait.until(lambda d: settled(d) and d.find_elements("css selector", "#recommendations li[data-item]"))
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        d.find_element("id", "mode-new").click()
        wait.until(lambda d: settled(d) and d.find_elements("css selector", "#item-results li[data-item]"))
        before = int(d.find_element("id", "item-results").get_attribute("data-version"))
        d.find_element("id", "item-search").send_keys(args.search)
        wait.until(lambda d: settled(d) and int(d.find_element("id", "item-results").get_attribute("data-version")) > before)
        before = int(d.find_element("id", "recommendations").get_attribute("data-version"))
        d.find_element("css selector", "#item-results li[data-item]").click()
        wait.until(lambda d: settled(d) and int(d.find_element("id", "recommendations").get_attribute("data-version")) > before)
        new_user_s = time.perf_counter() - t0
        res = d.execute_script("return performance.getEntriesByType('resource').map(e => [e.name, e.transferSize, e.duration])")
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    finally:
        if d is not None:
            d.quit()
        shutil.rmtree(profile, ignore_errors=True)
        server.terminate()
        server.wait(timeout=30)
    requests = [{"path": name[len(base):], "kb": size / 1024, "ms": ms} for name, size, ms in res]
    for r in requests:
        print(f"  {r['path'][:60]:<60} {r['kb']:7.1f} KB {r['ms']:8.0f} ms")
    total = sum(r["kb"] for r in requests)
    print(f"{args.items:,} items: page with a user's top 20 in {load_s:.2f} s; new user (search, click, top 20) in "
          f"{new_user_s:.2f} s; {len(requests)} requests, {total:.0f} KB in all; browser errors: {len(errors)}")
    Path(args.out).write_text(json.dumps({"items": args.items, "page_load_s": load_s, "new_user_s": new_user_s, "requests": requests,
                                          "total_kb": total, "browser_errors": errors}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
