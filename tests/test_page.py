"""The page of ``twotower serve`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium; nothing downloaded) against a real ``twotower serve``
subprocess on a small MovieLens 100K run with an IVF index.

Each test loads the page, acts as a person would (types, clicks, drags the slider with the
keyboard, picks from a select) and checks what the page shows against the run itself (the Run's
arrays, the HTTP API), then that the browser logged no error. Screenshots of each state go to
``reports/screenshots/`` (ignored by git; the path is printed).

Without a browser (not installed, and this machine cannot install it: ``scripts/setup.sh`` does so
as root with apt-get) the tests are skipped with the reason, never passed.
"""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from _trained import tiny_run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "reports" / "screenshots"
# elsewhere (another distribution, a browser in another place): TWOTOWER_CHROMIUM, TWOTOWER_CHROMEDRIVER
CHROMIUM = os.environ.get("TWOTOWER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("TWOTOWER_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--window-size=1440,1000",
         "--hide-scrollbars", "--force-device-scale-factor=1"]
WAIT_S = 30


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return (f"no {' or '.join(missing)}: install Debian's chromium and chromium-driver "
                "(scripts/setup.sh does, as root with apt-get)")
    return None


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    return tiny_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def index_dir(run_dir):
    from twotower.index.index import IndexParams
    from twotower.index.run_index import build_run_index
    from twotower.run import Run

    folder = run_dir.parent / "page-ivf-index"  # beside the shared run, not in it: other modules serve it without one
    if not (folder / "index.json").is_file():
        build_run_index(Run(run_dir), IndexParams(kind="ivf", nlist=16), folder, sample=200, progress=False, log=lambda m: None)
    return folder


@pytest.fixture(scope="module")
def run(run_dir):
    from twotower.run import Run

    return Run(run_dir)


@pytest.fixture(scope="module")
def base_url(run_dir, index_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", str(run_dir), "--index", str(index_dir),
                             "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"twotower serve did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def api(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def driver():
    reason = _browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="twotower-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for f in FLAGS + [f"--user-data-dir={profile}"]:
        opts.add_argument(f)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(driver, base_url):
    """The page loaded (``#fragment`` from the test's ``page_at`` marker, else a random user) and
    settled; afterwards, the browser's log must hold no error."""
    driver.get_log("browser")  # drop what earlier tests left
    yield driver
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, f"the browser logged errors: {severe}"
    assert not driver.find_element("id", "error").is_displayed(), driver.find_element("id", "error").text


def _open(driver, base_url, fragment: str = "") -> None:
    driver.get("about:blank")  # a new URL that differs only in its #fragment would not reload the page
    driver.get(f"{base_url}/{fragment}")
    _settle(driver)
    _settle_until(driver, lambda d: d.find_elements("css selector", "#recommendations li[data-item]"))


def _settle(driver) -> None:
    """Wait until no request is in flight or scheduled (the page counts them in body[data-pending])."""
    from selenium.webdriver.support.ui import WebDriverWait

    time.sleep(0.05)
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.pending") == "0")


def _settle_until(driver, cond) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script("return document.body.dataset.pending") == "0" and cond(d))


def _version(driver, list_id: str) -> int:
    return int(driver.find_element("id", list_id).get_attribute("data-version"))


def _after_change(driver, list_id: str, before: int) -> None:
    _settle_until(driver, lambda d: _version(d, list_id) > before)


def _rows(driver, list_id: str) -> list[dict]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#' + arguments[0] + ' li[data-item]')].map(li => ({"
        "item: li.dataset.item, count: Number(li.dataset.count), categories: JSON.parse(li.dataset.categories),"
        "marks: [...li.querySelectorAll('.mark')].map(m => m.classList[1]), text: li.innerText}))", list_id)


def _shot(driver, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    import base64

    # the whole page, not only the window (Chromium's DevTools screenshot beyond the viewport)
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")


def _ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [str(x["item"]) for x in resp.json()["items"]]


@pytest.fixture(scope="module")
def user_with_hits(api, run):
    """A user whose top 20 holds some of the user's test items (so the page has marks to show)."""
    for u in run.users.ids[:200].tolist():
        test = set(map(str, api.get(f"/users/{u}").json()["test"]))
        hits = test & set(_ids(api.post("/recommend", json={"user": u, "k": 20})))
        if len(hits) >= 2:
            return u
    pytest.fail("no user among the first 200 has two test items in the top 20: the model did not train")


def test_the_page_shows_the_run_curves_bucket_recall_and_index(page, base_url, api, run):
    _open(page, base_url)
    meta = api.get("/metadata").json()
    header = page.find_element("id", "run-info").text
    assert "ml-100k" in header and f"{len(run.items):,} items" in header
    recall10 = meta["index"]["measured"]["recall@10"]
    assert page.find_element("id", "index-info").text == f"index ivf · recall@10 {recall10:.3f}"
    assert f"recall@10 {recall10:.3f}" in page.find_element("id", "index-box").text
    epochs = run.epoch_records()
    # one point per epoch on both curves, the best epoch drawn apart
    assert len(page.find_elements("css selector", "#loss-chart circle")) == len(epochs) == 2
    assert len(page.find_elements("css selector", "#metric-chart circle.best")) == 1
    tips = [e.get_attribute("textContent") for e in page.find_elements("css selector", "#loss-chart circle title")]
    assert [t.split(":")[0] for t in tips] == [f"epoch {r['epoch']}" for r in epochs]
    losses = [float(t.split(": ")[1]) for t in tips]
    assert np.allclose(losses, [r["loss"] for r in epochs], rtol=1e-3)
    # recall by bucket: a bar per split and group, each labelled with metrics.json's figure
    test = run.metrics()["test"]
    bars = {e.find_element("css selector", "title").get_attribute("textContent")
            for e in page.find_elements("css selector", "#bucket-chart rect.bar-test, #bucket-chart rect.bar-valid")
            if e.find_elements("css selector", "title")}
    for b in ("head", "torso", "tail"):
        assert f"test {b}: {test[f'recall@20/{b}']:.4f}" in bars
    assert f"test all: {test['recall@20']:.4f}" in bars and len(bars) == 8
    _shot(page, "01-start")


def test_pick_a_user_history_newest_first_and_marks_on_held_out_items(page, base_url, api, run, user_with_hits):
    from selenium.webdriver.common.keys import Keys

    _open(page, base_url)
    before = _version(page, "recommendations")
    box = page.find_element("id", "user-search")
    box.clear()
    box.send_keys(str(user_with_hits), Keys.ENTER)
    _settle_until(page, lambda d: _version(d, "recommendations") > before
                  and d.find_element("id", "recs-title").text.endswith(f"user {user_with_hits}"))
    u = int(run.users.encode([user_with_hits])[0])
    newest_first = run.items.decode(run.known.row(u)[::-1][:50]).astype(str).tolist()
    assert [r["item"] for r in _rows(page, "history")] == newest_first
    shown = [r["item"] for r in _rows(page, "recommendations")]
    assert shown == _ids(api.post("/recommend", json={"user": user_with_hits, "k": 20}))
    valid, test = run.heldout()
    test_ids = set(run.items.decode(test.row(u)).astype(str).tolist())
    marked = {r["item"] for r in _rows(page, "recommendations") if "test" in r["marks"]}
    assert marked == set(shown) & test_ids and len(marked) >= 2
    assert f"{len(marked)} of the user's {len(test_ids)} test items" in page.find_element("id", "rec-summary").text
    _shot(page, "02-user")


def test_the_alpha_slider_moves_the_list_to_less_popular_items(page, base_url, run, user_with_hits):
    from selenium.webdriver.common.keys import Keys

    _open(page, base_url, f"#user={user_with_hits}")
    rows0 = _rows(page, "recommendations")
    before = _version(page, "recommendations")
    slider = page.find_element("id", "alpha")
    slider.send_keys(Keys.END)  # the keyboard moves a range input to its maximum, firing input events
    _after_change(page, "recommendations", before)
    assert page.find_element("id", "alpha-value").text == "2.00"
    rows1 = _rows(page, "recommendations")
    assert [r["item"] for r in rows1] != [r["item"] for r in rows0]
    counts = lambda rows: run.item_counts[run.items.encode([int(r["item"]) for r in rows])]  # noqa: E731
    assert [r["count"] for r in rows1] == counts(rows1).tolist()  # the page shows the run's counts
    assert counts(rows1).mean() < 0.7 * counts(rows0).mean()
    _shot(page, "03-alpha")


def test_the_category_filter_keeps_only_items_of_the_category(page, base_url, api, run, user_with_hits):
    from selenium.webdriver.support.ui import Select

    _open(page, base_url, f"#user={user_with_hits}")
    before = _version(page, "recommendations")
    Select(page.find_element("id", "category")).select_by_visible_text("Comedy")
    _after_change(page, "recommendations", before)
    rows = _rows(page, "recommendations")
    comedies = set(run.items.decode(run.item_category_items("genre", "Comedy")).astype(str).tolist())
    assert len(rows) == 20 and all("Comedy" in r["categories"] for r in rows)
    assert {r["item"] for r in rows} <= comedies
    assert [r["item"] for r in rows] == _ids(api.post("/recommend", json={"user": user_with_hits, "k": 20, "category": "Comedy"}))
    _shot(page, "04-category")


def test_clicking_an_item_shows_its_similar_items(page, base_url, api, user_with_hits):
    _open(page, base_url, f"#user={user_with_hits}")
    first = page.find_element("css selector", "#recommendations li[data-item]")
    item, title = first.get_attribute("data-item"), first.find_element("css selector", ".title").text
    before = _version(page, "similar")
    first.click()
    _after_change(page, "similar", before)
    similar = [r["item"] for r in _rows(page, "similar")]
    assert len(similar) == 10 and item not in similar
    assert similar == _ids(api.get(f"/items/{item}/similar", params={"k": 10, "alpha": 0}))
    assert title.split("#")[0].strip() in page.find_element("id", "similar-title").text
    assert "selected" in first.get_attribute("class")
    _shot(page, "05-similar")


def test_a_new_user_built_by_clicking_items(page, base_url, api):
    _open(page, base_url)
    page.find_element("id", "mode-new").click()
    _settle_until(page, lambda d: d.find_elements("css selector", "#item-results li[data-item]"))
    fallback = [r["item"] for r in _rows(page, "recommendations")]
    assert "the most popular items" in page.find_element("id", "rec-summary").text  # an empty history

    clicked = []
    for q in ("star wars", "toy story", "fargo"):
        box = page.find_element("id", "item-search")
        box.clear()
        before = _version(page, "item-results")
        box.send_keys(q)
        _after_change(page, "item-results", before)
        results = page.find_elements("css selector", "#item-results li[data-item]")
        assert results and q in results[0].text.lower()
        clicked.append(results[0].get_attribute("data-item"))
        before = _version(page, "recommendations")
        results[0].click()
        _after_change(page, "recommendations", before)
        history = [r["item"] for r in _rows(page, "new-history")]
        assert history == clicked  # oldest first, in click order
        shown = [r["item"] for r in _rows(page, "recommendations")]
        expected = _ids(api.post("/recommend", json={"history": [int(i) for i in clicked], "k": 20}))
        assert shown == expected and not set(clicked) & set(shown)
    assert shown != fallback
    assert page.find_element("id", "recs-title").text == "Recommendations for a new user (3 items)"
    # the place for user features: this model's user tower takes none, and the page says so
    assert "takes no user features" in page.find_element("id", "user-features").text
    _shot(page, "06-new-user")

    # removing an item from the history updates the list too
    before = _version(page, "recommendations")
    page.find_element("css selector", "#new-history li[data-item] .remove").click()
    _after_change(page, "recommendations", before)
    assert [r["item"] for r in _rows(page, "new-history")] == clicked[1:]
    assert [r["item"] for r in _rows(page, "recommendations")] == _ids(
        api.post("/recommend", json={"history": [int(i) for i in clicked[1:]], "k": 20}))


def test_the_page_loads_nothing_from_elsewhere(page, base_url):
    """Every resource the browser fetched came from the service itself."""
    _open(page, base_url)
    urls = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(base_url + "/") for u in urls), urls
    kinds = {u[len(base_url):].split("?")[0].split("/")[1] for u in urls}
    assert {"ui", "metadata", "run", "users", "recommend", "items"} >= kinds
