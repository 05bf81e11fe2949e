"""The look-up endpoints behind the page, through real HTTP (uvicorn on a free loopback port):
item search and details, user search and draws, a user's history and held-out items (checked
against the dataset itself), the training curves, the page's files; a 4xx that says what to fix
for each mistake. The page in a browser: test_page.py."""
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from _trained import tiny_run

PAGE = Path(__file__).resolve().parents[1] / "src" / "twotower" / "serving" / "page"


def _serve(recommender):
    import uvicorn

    from twotower.serving.server import ServerSettings, uvicorn_config  # the stack `twotower serve` runs
    from twotower.serving.service import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn_config(create_app(recommender), ServerSettings(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    return srv, thread, sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    return tiny_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def recommender(run_dir):
    from twotower.serving.query import Recommender

    return Recommender.load(run_dir)


@pytest.fixture(scope="module")
def client(recommender):
    srv, thread, sock, url = _serve(recommender)
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def run(recommender):
    return recommender.run


def _ok(r):
    assert r.status_code == 200, r.text
    return r.json()


def _error(r, status: int, *needles: str) -> str:
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    for n in needles:
        assert n in detail, detail
    return detail


# ---- items --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_item_search_matches_id_or_title_most_popular_first(client, run):
    items = _ok(client.get("/items", params={"q": "StAr", "limit": 100}))["items"]
    titles = np.asarray(run.titles, dtype=object)
    expected = [i for i in np.argsort(-run.item_counts, kind="stable")
                if "star" in f"{run.items.ids[i]}\t{titles[i]}".lower()]
    assert [x["item"] for x in items] == run.items.decode(expected[:100]).tolist() and len(items) > 5
    assert all("star" in (x["title"] + str(x["item"])).lower() for x in items)
    assert [x["count"] for x in items] == sorted((x["count"] for x in items), reverse=True)
    # a bounded answer however many match
    assert len(_ok(client.get("/items", params={"q": "(19", "limit": 7}))["items"]) == 7
    assert _ok(client.get("/items", params={"q": "no such title anywhere"}))["items"] == []


def test_an_exact_id_comes_first_and_an_empty_query_lists_the_most_popular(client, run):
    items = _ok(client.get("/items", params={"q": "50", "limit": 5}))["items"]
    assert items[0]["item"] == 50 and items[0]["title"] == "Star Wars (1977)"
    top = _ok(client.get("/items", params={"limit": 10}))["items"]
    assert [x["item"] for x in top] == run.items.decode(np.argsort(-run.item_counts, kind="stable")[:10]).tolist()
    assert [x["rank"] for x in top] == list(range(1, 11))


def test_item_details_categories_counts_and_buckets_come_from_the_run(client, run):
    from twotower.evaluation.metrics import popularity_buckets

    rec = _ok(client.get("/items/1"))
    assert rec["title"] == "Toy Story (1995)"
    assert rec["categories"] == {"genre": ["Animation", "Children's", "Comedy"]}
    i = int(run.items.encode([1])[0])
    assert rec["count"] == int(run.item_counts[i])
    buckets = popularity_buckets(torch.from_numpy(run.item_counts.astype(np.int64)), run.config.eval.popularity_buckets).numpy()
    ids = run.items.ids[:300].tolist()
    got = _ok(client.post("/items/lookup", json={"items": ids}))["items"]
    assert [x["item"] for x in got] == ids
    assert [x["bucket"] for x in got] == [["head", "torso", "tail"][b] for b in buckets[:300]]
    # every genre an item shows is one whose item set holds it, and the other way round
    for genre in ("Comedy", "Film-Noir"):
        members = set(run.items.decode(run.item_category_items("genre", genre)).tolist())
        assert {x["item"] for x in got if genre in x["categories"]["genre"]} == members & set(ids)


def test_item_lookup_keeps_order_and_reports_unknown_ids(client):
    body = _ok(client.post("/items/lookup", json={"items": [50, "nope", "1", 99999999999999999999]}))
    assert [x["item"] for x in body["items"]] == [50, 1]
    assert body["unknown_items"] == ["nope", 99999999999999999999]
    assert _ok(client.post("/items/lookup", json={"items": []})) == {"items": [], "unknown_items": []}


@pytest.mark.parametrize("body,status,needles", [
    (b'{"items": [1, 2', 400, ["malformed JSON", 'send {"items": [raw item ids]}']),
    (b'[1, 2]', 422, ["the body must be a JSON object"]),
    (b'{"item": [1]}', 422, ["items: Field required", "unknown field 'item'; the only field is items"]),
    (b'{"items": "50"}', 422, ["items: Input should be a valid array", 'e.g. {"items": [50, 181, 1]}']),
    (b'{"items": [1.5]}', 422, ["items.0"]),
    (json.dumps({"items": list(range(1001))}).encode(), 422, ["items: List should have at most 1000 items", "at most 1000 ids"]),
])
def test_item_lookup_mistakes_say_what_to_send(client, body, status, needles):
    _error(client.post("/items/lookup", content=body, headers={"content-type": "application/json"}), status, *needles)


@pytest.mark.parametrize("params,needles", [
    ({"limit": 0}, ["query.limit", "greater than or equal to 1", "send limit"]),
    ({"limit": 101}, ["query.limit", "less than or equal to 100"]),
    ({"limit": "ten"}, ["query.limit", "valid integer"]),
    ({"q": "x" * 201}, ["query.q", "at most 200 characters", "send q"]),
    ({"q": "star", "lmit": 5}, ["unknown query parameter 'lmit'", "the parameters are: q, limit"]),
])
def test_item_search_mistakes_are_422_with_what_to_fix(client, params, needles):
    _error(client.get("/items", params=params), 422, *needles)


def test_an_unknown_item_is_404_with_how_to_find_one(client):
    _error(client.get("/items/no-such-item"), 404, "'no-such-item' is not known", "GET /items?q=")


# ---- users --------------------------------------------------------------------------------------
def test_user_search_and_random_draws(client, run):
    lens = run.known.lengths()
    users = _ok(client.get("/users", params={"q": "19", "limit": 100}))["users"]
    assert users[0]["user"] == 19  # the exact id first
    rest = users[1:]
    assert all("19" in str(u["user"]) for u in rest) and len(users) == sum("19" in str(u) for u in run.users.ids.tolist())
    assert [u["interactions"] for u in rest] == sorted((u["interactions"] for u in rest), reverse=True)
    assert all(u["interactions"] == int(lens[run.users.encode([u["user"]])[0]]) for u in users)
    a = _ok(client.get("/users", params={"random": "true", "limit": 5, "seed": 7}))["users"]
    b = _ok(client.get("/users", params={"random": "true", "limit": 5, "seed": 7}))["users"]
    c = _ok(client.get("/users", params={"random": "true", "limit": 5, "seed": 8}))["users"]
    assert a == b and a != c and len({u["user"] for u in a}) == 5
    _error(client.get("/users", params={"random": "true", "q": "1"}), 422, "either q (search) or random=true")
    _error(client.get("/users", params={"random": "maybe"}), 422, "query.random", "send random as true or false")
    _error(client.get("/users/no-such-user"), 404, "not known", "GET /users?random=true")
    _error(client.get("/users/196", params={"limit": 1001}), 422, "query.limit")
    _error(client.get("/users/196", params={"k": 5}), 422, "unknown query parameter 'k'", "the parameters are: limit")
    _error(client.get("/run/curves", params={"epoch": 1}), 422, "unknown query parameter 'epoch'", "takes none")


def test_a_users_history_is_newest_first_and_held_out_items_are_the_datasets(client, run, data_dir):
    from twotower.data.sources import load_dataset

    ds = load_dataset(run.config.data, data_dir)
    for raw in run.users.ids[:25].tolist():
        body = _ok(client.get(f"/users/{raw}", params={"limit": 1000}))
        u = int(ds.users.encode([raw])[0])
        # newest first: the reverse of train + validation in time order, and the timestamps agree
        both_items = np.r_[ds.train.items[ds.train.users == u], ds.valid.items[ds.valid.users == u]]
        both_ts = np.r_[ds.train.timestamps[ds.train.users == u], ds.valid.timestamps[ds.valid.users == u]]
        hist = ds.items.encode([x["item"] for x in body["history"]])
        assert sorted(hist.tolist()) == sorted(both_items.tolist())
        ts_of = dict(zip(both_items.tolist(), both_ts.tolist()))
        ts = [ts_of[i] for i in hist.tolist()]
        assert ts == sorted(ts, reverse=True)
        valid = ds.items.decode(ds.valid.items[ds.valid.users == u]).tolist()
        test = ds.items.decode(ds.test.items[ds.test.users == u]).tolist()
        assert sorted(body["valid"]) == sorted(valid) and body["valid_total"] == len(valid)
        assert sorted(body["test"]) == sorted(test) and body["test_total"] == len(test)
        assert {x["item"] for x in body["history"] if x["split"] == "valid"} == set(valid)
        assert body["interactions"] == len(both_items) and body["timestamps"] is True
    short = _ok(client.get("/users/196", params={"limit": 3}))
    assert len(short["history"]) == 3 and short["interactions"] > 3


def test_a_run_without_heldout_file_gives_no_marks(synthetic_run, tmp_path):
    from twotower.run_dir import RunDir
    from twotower.serving.catalog import Catalog
    from twotower.serving.query import Recommender

    old = tmp_path / "old-run"
    shutil.copytree(synthetic_run, old)
    (old / "heldout.safetensors").unlink()
    RunDir(old).write_manifest()  # a run trained before the file existed
    rec = Recommender.load(old)
    assert rec.run.heldout() is None
    user = Catalog(rec).user(rec.run.users.ids[0])
    assert user["valid"] is None and user["test"] is None and user["history"]


# ---- curves -------------------------------------------------------------------------------------
def test_curves_are_the_runs_epoch_records_and_bucket_recall(client, run):
    body = _ok(client.get("/run/curves"))
    lines = [json.loads(x) for x in (run.path / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert [e["epoch"] for e in body["epochs"]] == [r["epoch"] for r in lines]
    assert [e["loss"] for e in body["epochs"]] == [r["loss"] for r in lines]
    assert [e["valid"]["recall@20"] for e in body["epochs"]] == [r["valid/recall@20"] for r in lines]
    final = json.loads((run.path / "metrics.json").read_text())
    assert body["monitor"] == "recall@20" and body["best_epoch"] == final["best_epoch"]
    for split in ("valid", "test"):
        for k in (10, 20):
            got = body["buckets"][split][f"recall@{k}"]
            assert got == {"all": final[split][f"recall@{k}"], **{b: final[split][f"recall@{k}/{b}"] for b in ("head", "torso", "tail")}}
    assert body["bucket_names"] == ["head", "torso", "tail"] and body["bucket_cuts"] == [0.2, 0.5]


def test_curves_write_a_metric_that_could_not_be_computed_as_null(synthetic_run, tmp_path):
    from twotower.serving.catalog import Catalog
    from twotower.serving.query import Recommender

    d = tmp_path / "nan-run"
    shutil.copytree(synthetic_run, d)
    m = json.loads((d / "metrics.json").read_text())
    m["test"]["recall@10/tail"] = float("nan")  # a bucket without held-out items
    (d / "metrics.json").write_text(json.dumps(m))
    from twotower.run import Run

    curves = Catalog(Recommender(Run(d, verify=False), Recommender.load(synthetic_run).index)).curves()
    assert curves["buckets"]["test"]["recall@10"]["tail"] is None
    json.dumps(curves, allow_nan=False)  # valid JSON for a browser


# ---- the page's files ---------------------------------------------------------------------------
def test_the_page_and_its_files_are_served_with_a_self_only_policy(client):
    for path in ("/", "/ui"):
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert 'src="ui/page.js"' in r.text and 'href="ui/page.css"' in r.text
    assert client.get("/ui/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/page.css").headers["content-type"].startswith("text/css")
    _error(client.get("/ui/secrets.txt"), 404, "the page is at /ui")
    _error(client.get("/ui/..%2F..%2Fquery.py"), 404)
    # the page's routes are not part of the API spec
    paths = _ok(client.get("/openapi.json"))["paths"]
    assert "/" not in paths and "/ui" not in paths
    assert {"/items", "/items/lookup", "/items/{item}", "/users", "/users/{user}", "/run/curves"} <= set(paths)


def test_the_page_fetches_nothing_from_the_internet():
    """No URL in the page's files other than the SVG namespace (a name, never fetched)."""
    for name in ("index.html", "page.js", "page.css"):
        text = (PAGE / name).read_text(encoding="utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.\w+[^\s'\"`)]*", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name}: {urls}"
        assert "@import" not in text and "import(" not in text


def test_the_page_files_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    cfg = tomllib.loads((PAGE.parents[3] / "pyproject.toml").read_text())
    patterns = cfg["tool"]["setuptools"]["package-data"]["twotower.serving"]
    files = {p.name for p in PAGE.iterdir() if p.is_file()}
    assert files == {"index.html", "page.js", "page.css"}
    assert all(any(Path("page", f).match(p) for p in patterns) for f in files)
    from importlib import resources

    assert resources.files("twotower.serving").joinpath("page", "page.js").read_bytes() == (PAGE / "page.js").read_bytes()


def test_text_search_maps_matches_to_lines_when_lowercasing_changes_lengths():
    from twotower.serving.catalog import TextIndex

    # "İ".lower() is two characters: offsets measured before lowering would land on the wrong line
    idx = TextIndex(["İ" * 10 + " a", "b", "İstanbul c", "target d", "e"], np.array([10, 11, 12, 13, 14]))
    assert idx.find("target", 5).tolist() == [13]
    assert idx.find("E", 5).tolist() == [13, 14]
    assert idx.find("istanbul", 5).tolist() == []  # "İ" lowers to "i̇", not "i"
    assert idx.find("i̇stanbul", 5).tolist() == [12]
    assert idx.find(" ", 2).tolist() == [10, 12]  # one match per line, in order, stopped at the limit
