"""Feature kinds end to end (docs/features.md): each declared feature reaches the score (another
value, another vector) and its fitted state comes back from the run directory; the encoders' maths
by hand; malformed feature input refused with one message and exit code 2 at training, and with a
422 that names the field at serving; the synthetic data's features place items no id was trained on."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower.cli import main

N_USERS, N_ITEMS, VEC = 40, 30, 4

FEATURES_TOML = """
[[features.item]]
name = "cat"
kind = "categorical"

[[features.item]]
name = "tags"
kind = "multi_categorical"

[[features.item]]
name = "price"
kind = "numeric"
transform = "log1p"

[[features.item]]
name = "rank"
kind = "numeric"
column = "price"
transform = "quantile"
buckets = 4

[[features.item]]
name = "emb"
kind = "vector"

[[features.item]]
name = "img"
kind = "vector"
file = "{img}"
freeze = true

[[features.item]]
name = "title"
kind = "text"
hash_buckets = 512

[[features.user]]
name = "age"
kind = "numeric"

[[features.user]]
name = "country"
kind = "categorical"
hash_buckets = 16
seed = 3

[[features.context]]
name = "hour"
kind = "categorical"
derive = "hour"

[[features.context]]
name = "device"
kind = "categorical"

[[features.context]]
name = "battery"
kind = "numeric"
"""


def _files(root):
    """Interactions (CSV: user, item, time, device, battery), an item table (Parquet: a category, a
    list of tags, a price with a null, a list-of-floats vector with a null, a title with a null), a
    .npy of item vectors keyed by id (some ids without one) and a user table (CSV)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(N_USERS):
        for t, i in enumerate(rng.choice(N_ITEMS, size=12, replace=False)):
            rows.append((u, int(i), 1_600_000_000 + 3_700 * (u + 7 * t), ["phone", "desktop", "tv"][(u + t) % 3],
                         "" if (u + t) % 5 == 0 else f"{(u * t) % 100}"))
    pd.DataFrame(rows, columns=["user", "item", "time", "device", "battery"]).to_csv(root / "inter.csv", index=False)
    items = pa.table({
        "item": list(range(N_ITEMS)),
        "cat": [f"c{i % 3}" for i in range(N_ITEMS)],
        "tags": [[f"t{i % 4}", f"t{(i // 4) % 3}"] if i % 7 else [] for i in range(N_ITEMS)],
        "price": [None if i == 5 else float(1 + i * 3) for i in range(N_ITEMS)],
        "emb": [None if i == 3 else [float(np.sin(i + k)) for k in range(VEC)] for i in range(N_ITEMS)],
        "title": [None if i == 4 else f"The {['red', 'blue', 'green'][i % 3]} movie number {i}" for i in range(N_ITEMS)],
    })
    pq.write_table(items, root / "items.parquet")
    rec = np.zeros(N_ITEMS - 5, dtype=[("id", np.int64), ("vector", np.float32, (3,))])
    rec["id"] = np.arange(5, N_ITEMS)
    rec["vector"] = rng.standard_normal((N_ITEMS - 5, 3))
    np.save(root / "img.npy", rec)
    users = pd.DataFrame({"user": range(N_USERS), "age": [18 + (u * 7) % 50 for u in range(N_USERS)],
                          "country": [["fr", "de", "jp", "br", "us"][u % 5] for u in range(N_USERS)]})
    users.loc[3, "age"] = np.nan
    users.to_csv(root / "users.csv", index=False)


def _config(root, features: str = FEATURES_TOML, model: str = "", extra: str = "") -> object:
    p = root / "cfg.toml"
    p.write_text(f'[data]\ndataset = "files"\ninteractions = "{(root / "inter.csv").as_posix()}"\ntime_col = "time"\n'
                 f'item_features = "{(root / "items.parquet").as_posix()}"\n'
                 f'user_features = "{(root / "users.csv").as_posix()}"\nseed = 0\n{extra}'
                 f'[model]\ndim = 8\nuser_history = true\n{model}'
                 '[train]\nepochs = 2\nbatch_size = 64\nlr = 0.01\n[eval]\nks = [5]\n'
                 + features.replace("{img}", (root / "img.npy").as_posix()))
    return p


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run with every kind, trained through the CLI; the trainer's model beside it."""
    from twotower.api import train
    from twotower.config import RunConfig

    root = tmp_path_factory.mktemp("kinds")
    _files(root)
    cfg = RunConfig.load(_config(root))
    result = train(cfg, root / "run", quiet=True, log=lambda m: None)
    return root, result


def _run(trained):
    from twotower.run import Run

    root, _ = trained
    return Run(root / "run")


ITEM = {"cat": "c1", "tags": ["t1", "t2"], "price": 10.0, "rank": 10.0, "emb": [0.1, 0.2, 0.3, 0.4],
        "img": [1.0, 0.0, -1.0], "title": "The blue movie"}
OTHER_ITEM = {"cat": "c2", "tags": ["t3"], "price": 70.0, "rank": 70.0, "emb": [-0.4, 0.0, 0.9, 0.1],
              "img": [0.0, 2.0, 0.5], "title": "A green film"}
USER = {"age": 30.0, "country": "jp"}
OTHER_USER = {"age": 61.0, "country": "br"}
CONTEXT = {"hour": "9", "device": "phone", "battery": 80.0}
OTHER_CONTEXT = {"hour": "22", "device": "tv", "battery": 5.0}

KINDS = [("item", "cat"), ("item", "tags"), ("item", "price"), ("item", "rank"), ("item", "emb"), ("item", "img"),
         ("item", "title"), ("user", "age"), ("user", "country"), ("context", "hour"), ("context", "device"),
         ("context", "battery")]


def _vectors(model, tower: str, values: dict) -> torch.Tensor:
    """The tower's vector of a new item or user (id -1) with ``values`` (context: a known user's)."""
    with torch.no_grad():
        if tower == "item":
            return model.item_vectors(model.item_inputs(np.array([-1]), [values]))[0]
        if tower == "user":
            return model.user_vectors(model.user_inputs(np.array([-1]), [np.array([1, 2])], [values]))[0]
        return model.user_vectors(model.user_inputs(np.array([0]), model_known(model), context=[values]))[0]


def model_known(model):
    from twotower.data.dataset import CSR

    return CSR.from_pairs(np.array([0, 0]), np.array([1, 2]), model.n_users)


@pytest.mark.parametrize("tower,name", KINDS, ids=[f"{t}.{n}" for t, n in KINDS])
def test_each_kind_reaches_the_score_and_comes_back_from_the_run_directory(trained, tower, name):
    """Changing one feature's value changes the tower's vector (and so the score); the run read back
    has the same fitted state for the feature and gives the same vectors as the trained model."""
    _, result = trained
    model = result.model.eval()
    run = _run(trained)
    base = {"item": ITEM, "user": USER, "context": CONTEXT}[tower]
    other = {"item": OTHER_ITEM, "user": OTHER_USER, "context": OTHER_CONTEXT}[tower]
    changed = {**base, name: other[name]}
    a, b = _vectors(run.model, tower, base), _vectors(run.model, tower, changed)
    assert not torch.allclose(a, b), f"{tower}.{name} does not reach the vector"
    scores_a, scores_b = a @ run.item_vectors.T, b @ run.item_vectors.T
    assert not torch.allclose(scores_a, scores_b)
    # restored: the same fitted state, and the same vectors as the model that trained
    state, back = model.feature_state(), run.model.feature_state()
    k = [e["name"] for e in state.meta[tower]].index(name)
    assert back.meta[tower][k] == json.loads(json.dumps(state.meta[tower][k]))
    for key, t in state.arrays.items():
        if key.startswith(f"{tower}.{k}."):
            torch.testing.assert_close(back.arrays[key], t.cpu(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_vectors(model, tower, changed), b)


def test_known_entities_and_held_out_context_come_back_from_the_run_directory(trained):
    from twotower.data.sources import load_dataset
    from twotower.evaluation.evaluator import heldout_context
    from twotower.model.towers import embed_items, embed_users

    root, result = trained
    run = _run(trained)
    torch.testing.assert_close(embed_items(run.model), embed_items(result.model))
    ds = load_dataset(run.config)
    ctx = heldout_context(run.model, ds.test, ds.n_users)
    users = np.unique(ds.test.users)
    torch.testing.assert_close(embed_users(run.model, users, ds.history("valid"), context=ctx),
                               embed_users(result.model, users, ds.history("valid"), context=result.model.context_table(
                                   {k: v for k, v in _first_context(ds.test, ds.n_users).items()})))
    # the context of evaluation is each user's first held-out interaction's: not the defaults
    assert not torch.allclose(embed_users(run.model, users, ds.history("valid"), context=ctx),
                              embed_users(run.model, users, ds.history("valid")))


def _first_context(split, n_users):
    """By hand: per user the context of the earliest held-out interaction."""
    out = {}
    for name, col in split.context.items():
        vals = np.full(n_users, None if col.dtype == object else np.nan, dtype=col.dtype)
        for u in np.unique(split.users):
            rows = np.flatnonzero(split.users == u)
            vals[u] = col[rows[np.argmin(split.timestamps[rows])]]
        out[name] = vals
    return out


def test_feature_state_is_fitted_on_training_rows_only(trained):
    """Statistics and vocabularies come from the entities and interactions of the training split."""
    from twotower.data.sources import load_dataset

    _, result = trained
    ds = load_dataset(_run(trained).config)
    state = {(t, e["name"]): e for t in ("item", "user", "context") for e in result.model.feature_state().meta[t]}
    train_items = np.unique(ds.train.items)
    price = ds.item_features.dense["price"][train_items]
    logp = np.log1p(price[np.isfinite(price)])
    assert state["item", "price"]["mean"] == pytest.approx(logp.mean()) and state["item", "price"]["std"] == pytest.approx(logp.std())
    train_users = np.unique(ds.train.users)
    age = ds.user_features.dense["age"][train_users]
    assert state["user", "age"]["mean"] == pytest.approx(np.nanmean(age))
    devices, counts = np.unique(ds.train.context["device"].astype(str), return_counts=True)
    assert state["context", "device"]["values"] == devices.tolist()
    assert state["context", "device"]["default"] == devices[np.argmax(counts)]
    battery = ds.train.context["battery"]
    assert state["context", "battery"]["mean"] == pytest.approx(np.nanmean(battery))
    # the hashed feature keeps its buckets and seed, not values
    assert state["user", "country"]["hash_buckets"] == 16 and state["user", "country"]["seed"] == 3
    assert "values" not in state["user", "country"]


def test_missing_values_are_a_learned_value_of_their_own(trained):
    """An item whose price, vector and title are missing gets the missing embeddings (not zero, not
    a crash), and they differ from a present value's."""
    run = _run(trained)
    feats = run.model.item_tower.features
    with torch.no_grad():
        x, _ = feats.encode([{"price": None, "emb": None, "title": None}, {"price": 10.0, "emb": ITEM["emb"], "title": "x"}])
        for name in ("price", "emb", "title"):
            out = feats[name](x[name])
            assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1])
    # item 5 has no price in the table, item 3 no vector, item 4 no title: stored as missing
    price = feats["price"].lookup(torch.tensor([5, 6]))
    assert torch.isnan(price[0]) and not torch.isnan(price[1])
    assert torch.isnan(feats["emb"].lookup(torch.tensor([3]))).all()
    assert feats["title"].lookup(torch.tensor([4])).codes.tolist() == [feats["title"].missing]


# ---- the encoders' maths by hand -------------------------------------------------------------------
def _fit(kind, column, fit_rows=None, **options):
    from twotower.config import FeatureSpec
    from twotower.features.encoders import KINDS

    spec = FeatureSpec(name="f", kind=kind, **options)
    fitted = KINDS[kind].fit("f", column, fit_rows, spec)
    torch.manual_seed(0)
    return KINDS[kind](fitted, 4, 0.1)


def test_numeric_standardisation_by_hand():
    # training rows 1, 2, 3 (row 3: not a training row; row 4 missing): mean 2, std sqrt(2/3)
    enc = _fit("numeric", np.array([1.0, 2.0, 3.0, 100.0, np.nan]), np.array([1, 1, 1, 0, 0], dtype=bool))
    assert enc.meta["mean"] == pytest.approx(2.0) and enc.meta["std"] == pytest.approx(np.sqrt(2 / 3))
    z = enc.lookup(torch.arange(5))
    np.testing.assert_allclose(z[:3].numpy(), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert z[3] == pytest.approx(5.0) and torch.isnan(z[4])  # clipped to +-5; missing stays missing
    with torch.no_grad():
        out = enc(z)
        torch.testing.assert_close(out[1], enc.bias)  # z = 0: the offset alone
        torch.testing.assert_close(out[0], -1.2247449 * enc.weight + enc.bias)
        torch.testing.assert_close(out[4], enc.missing)
    assert torch.equal(enc.missing, torch.zeros(4))  # zero until training sees a missing value


def test_numeric_quantile_buckets_and_log1p_by_hand():
    enc = _fit("numeric", np.arange(1.0, 9.0), transform="quantile", buckets=4)
    assert enc.meta["edges"] == [2.75, 4.5, 6.25]  # numpy's linear quantiles of 1..8 at 1/4, 1/2, 3/4
    x, _ = enc.encode([1.0, 3.0, 6.25, 100.0, None])
    assert x.tolist() == [0, 1, 3, 3, 4]  # bucket 4: missing
    enc = _fit("numeric", np.array([0.0, np.e - 1]), transform="log1p")
    assert enc.meta["mean"] == pytest.approx(0.5) and enc.meta["std"] == pytest.approx(0.5)


def test_categorical_vocabulary_oov_missing_and_min_count_by_hand():
    from twotower.features.encoders import labels_column

    col = labels_column(np.array(["a", "b", "a", None, "z"], dtype=object))
    enc = _fit("categorical", col, np.array([1, 1, 1, 1, 0], dtype=bool), min_count=2)
    # "b" is seen once and "z" only on a row that is not a training row: both out of vocabulary
    assert enc.values == ["a"] and enc.meta["default"] == "a"
    assert enc.lookup(torch.arange(5)).codes.tolist() == [0, 1, 0, 2, 1]  # a, oov, a, missing, oov
    x, unknown = enc.encode(["b", "a", None])
    assert x.codes.tolist() == [1, 0, 2] and unknown == [["b"], [], []]
    with torch.no_grad():
        assert torch.equal(enc.bag.weight[1:], torch.zeros(2, 4))  # oov and missing start at zero


def test_hashing_is_seeded_and_the_same_in_every_call():
    from twotower.features.encoders import labels_column, stable_hash

    words = np.array(["90210", "10001", "90210"], dtype=object)
    a, b = stable_hash(words, 0, 1000), stable_hash(words, 0, 1000)
    assert a.tolist() == b.tolist() and a[0] == a[2]
    assert stable_hash(words, 1, 1000).tolist() != a.tolist()  # another seed, other buckets
    enc = _fit("categorical", labels_column(words), hash_buckets=1000)
    assert enc.lookup(torch.arange(3)).codes.tolist() == a.tolist()
    x, unknown = enc.encode(["never seen"])  # hashed: no value is out of vocabulary
    assert x.codes.tolist() == stable_hash(np.array(["never seen"], dtype=object), 0, 1000).tolist() and unknown == [[]]


def test_text_tokens_by_hand():
    from twotower.features.encoders import tokens

    assert tokens("Toy Story!", 2, [3], 10, True) == [
        "w1:toy", "w1:story", "w2:toy story", "c:<to", "c:toy", "c:oy>", "c:<st", "c:sto", "c:tor", "c:ory", "c:ry>"]
    assert tokens("a b c", 1, [], 2, True) == ["w1:a", "w1:b"]  # max_tokens words
    enc = _fit("text", np.array(["Toy Story", None, ""], dtype=object), hash_buckets=64)
    bag = enc.lookup(torch.arange(3))
    # "Toy Story": 3 word n-grams, and the 3- and 4-grams of <toy> (3 + 2) and <story> (5 + 4)
    assert bag.offsets.tolist() == [0, 17, 18] and bag.codes[17:].tolist() == [64, 64]  # two missing texts
    with torch.no_grad():
        out = enc(bag)
        torch.testing.assert_close(out[0], enc.bag.weight[bag.codes[:17]].mean(0))


def test_context_defaults_when_absent_and_missing_when_null():
    from twotower.config import FeatureSpec
    from twotower.features.encoders import FeatureSet, fit_context

    specs = [FeatureSpec(name="device", kind="categorical"), FeatureSpec(name="battery", kind="numeric")]
    fitted = fit_context(specs, {"device": np.array(["tv", "phone", "tv", None], dtype=object),
                                 "battery": np.array([10.0, 20.0, np.nan, 60.0])})
    torch.manual_seed(0)
    ctx = FeatureSet(fitted, 4, 0.1)
    x, _ = ctx.encode([{}, {"device": None, "battery": None}], absent_default=True)
    dev = ctx["device"]
    assert x["device"].codes.tolist() == [dev.values.index("tv"), dev.missing]  # absent: the most common value
    assert x["battery"][0] == pytest.approx(0.0) and torch.isnan(x["battery"][1])  # absent: the mean; null: missing
    d = ctx.defaults(3)
    assert d["device"].codes.tolist() == [dev.values.index("tv")] * 3 and d["device"].offsets.tolist() == [0, 1, 2]


# ---- malformed feature input at training: one message, exit code 2, nothing written ----------------
def _train_fails(root, capsys, features: str, needles: list[str], model: str = "", one_line: bool = True):
    cfg = _config(root, features, model)
    out = root / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twotower train: error: ") and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 or not one_line, err  # a config's message lists each bad key on a line
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert not out.exists()


@pytest.fixture
def files(tmp_path):
    _files(tmp_path)
    return tmp_path


def test_numeric_feature_on_a_text_column_is_refused(files, capsys):
    _train_fails(files, capsys, '[[features.item]]\nname = "title"\nkind = "numeric"\n',
                 ["items.parquet", "row index 0", "is not a number", "declared numeric", "features.item 'title'"])


def test_categorical_feature_on_list_cells_is_refused(files, capsys):
    _train_fails(files, capsys, '[[features.item]]\nname = "tags"\nkind = "categorical"\n',
                 ["items.parquet", "row index 1", "2 values in one row", "multi_categorical"])


def test_missing_value_where_refused_names_the_row(files, capsys):
    _train_fails(files, capsys, '[[features.item]]\nname = "price"\nkind = "numeric"\nmissing = "error"\n',
                 ["items.parquet", "row index 5", "missing in column 'price'", "missing = \"learn\""])
    _train_fails(files, capsys, '[[features.user]]\nname = "age"\nkind = "numeric"\nmissing = "error"\n',
                 ["users.csv", "line 5", "missing"])


def test_unknown_column_is_refused(files, capsys):
    _train_fails(files, capsys, '[[features.item]]\nname = "colour"\nkind = "categorical"\n',
                 ["items.parquet", "'colour' is missing", "found columns", "features.item"])
    _train_fails(files, capsys, '[[features.context]]\nname = "os"\nkind = "categorical"\n',
                 ["inter.csv", "'os' is missing", "features.context"])


def test_vector_of_the_wrong_length_names_file_row_and_length(files, capsys):
    table = pq.read_table(files / "items.parquet").to_pandas()
    table.at[7, "emb"] = [1.0, 2.0]
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), files / "items.parquet")
    _train_fails(files, capsys, '[[features.item]]\nname = "emb"\nkind = "vector"\n',
                 ["items.parquet", "row index 7", "length 2", "expected 4"])
    _train_fails(files, capsys, f'[[features.item]]\nname = "img"\nkind = "vector"\nfile = "{(files / "img.npy").as_posix()}"\nlength = 5\n',
                 ["img.npy", "length 3, expected 5"])


def test_vector_file_in_another_layout_is_refused(files, capsys):
    np.save(files / "plain.npy", np.zeros((3, 4), dtype=np.float32))
    _train_fails(files, capsys, f'[[features.item]]\nname = "img"\nkind = "vector"\nfile = "{(files / "plain.npy").as_posix()}"\n',
                 ["plain.npy", "not records with fields 'id' and 'vector'", "np.save"])


def test_text_with_undecodable_bytes_is_refused(files, capsys):
    table = pq.read_table(files / "items.parquet")
    titles = [t.encode("utf-8") if t is not None else None for t in table.column("title").to_pylist()]
    titles[2] = b"caf\xe9"
    pq.write_table(table.set_column(table.column_names.index("title"), "title", pa.array(titles, pa.binary())),
                   files / "items.parquet")
    _train_fails(files, capsys, '[[features.item]]\nname = "title"\nkind = "text"\n',
                 ["items.parquet", "row index 2", "not UTF-8", "0xe9"])


def test_declarations_are_checked_when_the_config_loads(files, capsys):
    _train_fails(files, capsys, '[[features.item]]\nname = "cat"\nkind = "categorical"\ntransform = "log1p"\n',
                 ["features.item.0", "transform", "do not apply to categorical"], one_line=False)
    _train_fails(files, capsys, '[[features.item]]\nname = "cat"\nkind = "categorical"\n', ["declared once", "model.item_features"],
                 model='item_features = ["cat"]\n', one_line=False)
    _train_fails(files, capsys, '[[features.context]]\nname = "t"\nkind = "text"\n', ["context features are categorical or numeric"],
                 one_line=False)


# ---- serving: 422 naming the field and the fix ---------------------------------------------------------
@pytest.fixture(scope="module")
def client(trained):
    """The service over real HTTP (uvicorn on a free loopback port), called with httpx."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from twotower.serving.query import Recommender
    from twotower.serving.server import ServerSettings, uvicorn_config  # the stack `twotower serve` runs
    from twotower.serving.service import create_app

    rec = Recommender.load(_run(trained), category_feature="cat")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn_config(create_app(rec), ServerSettings(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as c:
        yield c
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.mark.parametrize("body,needles", [
    ({"history": [1], "features": {"age": "old"}}, ["features.age", "numeric feature got str", "send a number"]),
    ({"history": [1], "features": {"shoe": 42}}, ["unknown user feature", "shoe", "age"]),
    ({"history": [1], "features": {"country": {"a": 1}}}, ["features.country", "send a value as a string"]),
    ({"user": 0, "context": {"battery": "full"}}, ["context.battery", "numeric feature got str"]),
    ({"user": 0, "context": {"weather": "rain"}}, ["unknown context feature", "weather", "hour"]),
    ({"user": 0, "context": ["hour"]}, ["context", "expected a JSON object"]),
    ({"user": 0, "category": "c1", "category_feature": "price"}, ["category_feature 'price'", "cat"]),
    ({"user": 0, "category": "nope"}, ["category 'nope' is not a value of item feature 'cat'"]),
])
def test_bad_feature_values_get_a_422_naming_the_field(client, body, needles):
    r = client.post("/recommend", json=body)
    assert r.status_code == 422, r.text
    for needle in needles:
        assert needle in r.json()["detail"], r.json()["detail"]


def test_nan_where_missing_values_are_refused_gets_a_422(tmp_path):
    """A feature declared missing = "error" refuses null and NaN at serving too; vectors check their
    length and texts their type (the item tower's encoders, as a new item would be sent)."""
    from twotower.errors import FeatureInputError
    from twotower.features.encoders import FeatureSet

    enc = _fit("numeric", np.array([1.0, 2.0]), missing="error")
    with pytest.raises(FeatureInputError, match="refuses missing values"):
        enc.encode([float("nan")])
    with pytest.raises(FeatureInputError, match="refuses missing values"):
        enc.encode([None])
    vec = _fit("vector", np.ones((2, 3), dtype=np.float32))
    with pytest.raises(FeatureInputError, match="vector of length 2, expected 3"):
        vec.encode([[1.0, 2.0]])
    text = _fit("text", np.array(["a b"], dtype=object))
    with pytest.raises(FeatureInputError, match="text feature got int"):
        text.encode([12])
    assert isinstance(FeatureSet([], 4, 0.1).names, list)


def test_requests_with_features_and_context_are_answered(client, trained):
    r = client.post("/recommend", json={"history": [1, 2], "features": {"age": 30, "country": "jp"},
                                        "context": {"hour": "9", "device": "tv"}, "k": 5})
    assert r.status_code == 200, r.text
    a = [x["item"] for x in r.json()["items"]]
    b = [x["item"] for x in client.post("/recommend", json={"history": [1, 2], "features": {"age": 80, "country": "fr"},
                                                              "context": {"hour": "23", "device": "phone"}, "k": 5}).json()["items"]]
    assert len(a) == 5 and a != b
    r = client.post("/recommend", json={"user": 0, "k": 5, "category": "c1"})
    assert r.status_code == 200 and r.json()["category_feature"] == "cat"
    cats = _run(trained).model.item_tower.features["cat"].values_of(np.array([x["item"] for x in r.json()["items"]]))
    assert all(c == ["c1"] for c in cats)
    meta = client.get("/metadata").json()
    assert {f["name"]: f["kind"] for f in meta["features"]["context"]} == {"hour": "categorical", "device": "categorical",
                                                                           "battery": "numeric"}
    assert meta["category_features"]["cat"] == ["c0", "c1", "c2"]


def test_the_category_filter_is_chosen_by_name(trained):
    """With several categorical item features none is taken as the filter's by position: the
    request (or serve --category-feature) names it."""
    from twotower.serving.query import Query, Recommender, RequestError

    rec = Recommender.load(_run(trained))
    assert rec.category_feature is None
    with pytest.raises(RequestError, match="several categorical item features"):
        rec.recommend(Query(user=0, category="c1"))
    r = rec.recommend(Query(user=0, category="t1", category_feature="tags", k=5))
    tags = _run(trained).model.item_tower.features["tags"].values_of(np.array(r.items))
    assert all("t1" in t for t in tags)


def test_recommend_cli_takes_features_and_context(trained, capsys):
    root, _ = trained
    assert main(["recommend", str(root / "run"), "--history", "1,2", "--features", "age=31,country=jp",
                 "--context", "hour=9,device=tv", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "new user" in out and len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 3
    assert main(["recommend", str(root / "run"), "--user", "0", "--context", "battery=high"]) == 2
    assert "--context: feature 'battery': 'high' is not a number" in capsys.readouterr().err
    assert main(["recommend", str(root / "run"), "--user", "0", "--context", "weather=rain"]) == 2
    assert "unknown context feature" in capsys.readouterr().err


# ---- the synthetic data: features place items that no id was trained on ------------------------------
@pytest.mark.slow
def test_a_feature_item_tower_places_items_that_ids_never_saw():
    """Items whose every interaction is withheld from training: an item tower of the description
    (text) and price (numeric) ranks them for their users; an id-only tower cannot (their ids were
    never trained), and scores them near chance."""
    from twotower.config import RunConfig
    from twotower.data.readers.tabular import features_from_table
    from twotower.data.sources import build_dataset
    from twotower.data.synthetic import make_synthetic
    from twotower.model.towers import embed_items, embed_users
    from twotower.training.trainer import Trainer

    syn = make_synthetic(n_users=800, n_items=400, n_categories=10, n_clusters=5, interactions_per_user=(15, 40),
                         seed=1, price_affinity=2.0, popularity_exponent=0.5)
    frame = syn.interactions.frame
    cold = np.random.default_rng(0).permutation(400)[:80]
    warm_frame = frame[~frame["item"].isin(cold)].reset_index(drop=True)
    truth = frame[frame["item"].isin(cold)]
    recalls = {}
    for name, model, features in [
        ("ids", {"item_id": True}, {}),
        ("features", {"item_id": False}, {"item": [{"name": "description", "kind": "text", "hash_buckets": 4096},
                                                     {"name": "price", "kind": "numeric", "transform": "quantile",
                                                      "buckets": 8}]}),
    ]:
        cfg = RunConfig.from_dict({"data": {"dataset": "synthetic", "test_fraction": 0.05, "valid_fraction": 0.0},
                                   "model": {"dim": 16, **model}, "features": features,
                                   "train": {"epochs": 5, "batch_size": 256, "lr": 0.02, "patience": 0, "seed": 0}})
        specs = cfg.feature_specs()
        # the item table puts every item in the vocabulary, the cold ones too (with no interaction)
        item_f = features_from_table(syn.item_table(), np.arange(400), specs.item, "item")
        ds = build_dataset("synthetic", warm_frame, None, item_f, None, cfg.data)
        assert (ds.items.encode(cold) >= 0).all() and not np.isin(ds.items.encode(cold), ds.train.items).any()
        trainer = Trainer(cfg, ds, quiet=True, log=lambda m: None)
        trainer.fit()
        users = ds.users.encode(truth["user"].unique())
        with torch.no_grad():
            u = embed_users(trainer.model, users, ds.history("valid")).numpy()
            g = embed_items(trainer.model).numpy()
        cold_idx = ds.items.encode(cold)
        scores = u @ g[cold_idx].T
        top = cold_idx[np.argsort(-scores, axis=1)[:, :10]]
        held = truth.assign(u=ds.users.encode(truth["user"]), i=ds.items.encode(truth["item"]))
        by_user = held.groupby("u")["i"].apply(set).to_dict()
        recalls[name] = float(np.mean([len(by_user[uu] & set(t)) / len(by_user[uu]) for uu, t in zip(users, top)]))
    chance = 10 / 80
    assert recalls["features"] > 2 * chance and recalls["features"] > 1.8 * recalls["ids"], recalls
    assert recalls["ids"] < 1.6 * chance, recalls


# ---- the named datasets' features --------------------------------------------------------------------
def test_movielens_100k_has_every_kind(data_dir):
    """configs/ml-100k-features.toml reads genres (lists), titles (text), the release year (numeric,
    missing where the date is), the age as a number, zip codes and each rating's hour and weekday."""
    from twotower.config import RunConfig
    from twotower.data.sources import load_dataset

    cfg = RunConfig.load(Path(__file__).resolve().parents[1] / "configs" / "ml-100k-features.toml")
    kinds = {s.kind for t in ("item", "user", "context") for s in cfg.features.tower(t)}
    assert kinds == {"categorical", "multi_categorical", "numeric", "text"} and cfg.model.user_history
    ds = load_dataset(cfg, data_dir)
    items, users = ds.item_features, ds.user_features
    toy = ds.items.encode([1])[0]
    assert items.dense["title"][toy] == "Toy Story (1995)" and items.dense["year"][toy] == 1995.0
    assert np.isnan(items.dense["year"][ds.items.encode([267])[0]])  # the film without a release date
    u1 = ds.users.encode([1])[0]
    assert users.dense["age"][u1] == 24.0 and users.rows["zip"].row(u1).size == 1
    assert set(ds.train.context["weekday"]) <= {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}
    assert set(ds.test.context["hour"]) <= {str(h) for h in range(24)} and len(ds.test.context["hour"]) == len(ds.test)
    # a rating's context is its own: hour of its timestamp (UTC)
    k = 0
    assert ds.train.context["hour"][k] == str(int(ds.train.timestamps[k]) // 3600 % 24)
    # fitted on training rows only: the users of the training split
    assert items.fit_rows.sum() == len(np.unique(ds.train.items)) and users.fit_rows.sum() == len(np.unique(ds.train.users))


def test_grocery_has_categories_and_the_weekday(data_dir):
    from twotower.config import RunConfig
    from twotower.data.sources import load_dataset

    cfg = RunConfig.from_dict({"data": {"dataset": "grocery", "split": "temporal"},
                               "features": {"item": [{"name": "i_category", "kind": "categorical"}],
                                            "context": [{"name": "weekday", "kind": "categorical", "derive": "weekday"}]}})
    ds = load_dataset(cfg, data_dir)
    assert ds.item_features.kinds() == {"i_category": "categorical"}
    assert set(ds.test.context["weekday"]) <= {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}
    assert len(set(ds.train.context["weekday"])) == 7


@pytest.mark.slow
def test_a_refit_keeps_the_fitted_state_the_run_directory_holds(tmp_path):
    """train.refit retrains on train + validation; the encoders it builds fit the same state as the
    first model's (the training split's), so the run directory's features describe the final weights."""
    from twotower.api import train
    from twotower.config import RunConfig
    from twotower.run import Run
    from twotower.model.towers import embed_items

    _files(tmp_path)
    cfg = RunConfig.load(_config(tmp_path), ["train.refit=true"])
    result = train(cfg, tmp_path / "run", quiet=True, log=lambda m: None)
    run = Run(tmp_path / "run")
    state, back = result.model.feature_state(), run.model.feature_state()
    assert back.meta == json.loads(json.dumps(state.meta))
    torch.testing.assert_close(embed_items(run.model), embed_items(result.model))


def test_new_entities_join_every_kinds_table_as_encode_places_them(trained):
    """``FeatureSet.extended`` (admitting items to a trained run) appends a row per new item to each
    encoder's per-entity table: looked up, the new rows are what ``encode`` gives for the same values."""
    from twotower.features.encoders import FeatureSet

    run = _run(trained)
    feats = run.model.item_tower.features
    fitted, unknown = feats.extended([ITEM, {**OTHER_ITEM, "cat": "never seen"}])
    assert unknown == [{}, {"cat": ["never seen"]}]
    torch.manual_seed(0)
    grown = FeatureSet(fitted, 8, 0.1)
    grown.load_state_dict(feats.state_dict())
    with torch.no_grad():
        stored = grown(grown.lookup(torch.tensor([N_ITEMS, N_ITEMS + 1])))
        encoded = feats(feats.encode([ITEM, {**OTHER_ITEM, "cat": "never seen"}])[0])
        torch.testing.assert_close(stored, encoded)
        torch.testing.assert_close(grown(grown.lookup(torch.arange(N_ITEMS))), feats(feats.lookup(torch.arange(N_ITEMS))))


def test_every_encoder_runs_on_plain_tensors_and_exports(trained):
    """Each encoder's forward takes plain tensors (a Bag's codes and offsets, or one tensor) and
    exports with ``torch.export`` to the same values, so that the towers can be exported;
    ``example_input`` gives an input."""
    from torch import nn

    from twotower.features.encoders import Bag

    class OnTensors(nn.Module):
        def __init__(self, enc):
            super().__init__()
            self.enc = enc

        def forward(self, *x):
            return self.enc(Bag(*x) if len(x) == 2 else x[0])

    run = _run(trained)
    encoders = list(run.model.item_tower.features.encoders) + list(run.model.user_tower.features.encoders) \
        + list(run.model.user_tower.context.encoders)
    for enc in encoders:
        x = enc.example_input(3)
        args = (x.codes, x.offsets) if isinstance(x, Bag) else (x,)
        with torch.no_grad():
            out = OnTensors(enc)(*args)
            assert out.shape == (3, 8) and torch.isfinite(out).all(), enc.name
            exported = torch.export.export(OnTensors(enc), args)
            torch.testing.assert_close(exported.module()(*args), out)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.slow
def test_every_kind_and_the_context_export_with_the_towers(trained, tmp_path, fmt):
    """``twotower export`` takes a run with every kind: each feature's tensors are inputs of its
    tower (context ones named ``context.NAME.FIELD``), and the exported towers give the Python
    path's vectors for new entities with given values, missing values and another context."""
    if fmt == "onnx":
        for p in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(p)
    from twotower.export import TowerExport, export_run
    from twotower.export.formats import LOAD
    from twotower.export.towers import numpy_inputs

    run = _run(trained)
    desc = export_run(run, tmp_path / "exp", fmt=fmt)
    names = {t: [i["name"] for i in desc["towers"][t]["inputs"]] for t in ("user", "item")}
    for tower, name in KINDS:
        where = "user" if tower == "context" else tower
        prefix = "context." if tower == "context" else ""
        assert any(n.startswith(f"{prefix}{name}.") for n in names[where]), (tower, name, names[where])
    kinds = {i["name"]: i.get("kind") for i in desc["towers"]["item"]["inputs"]}
    assert kinds["price.values"] == "numeric" and kinds["title.codes"] == "text" and kinds["emb.vectors"] == "vector"

    model = run.model.cpu().eval()
    cases = {
        "item": model.item_inputs(np.array([-1, -1, 0]), [ITEM, OTHER_ITEM, {}]),
        "user": model.user_inputs(np.array([-1, 0, 0]), [np.array([1, 2]), np.array([3]), np.array([4, 5])],
                                  [USER, {}, OTHER_USER], context=[CONTEXT, OTHER_CONTEXT, {}]),
    }
    for tower, x in cases.items():
        module = TowerExport(model, tower)
        runtime = LOAD[fmt](tmp_path / "exp" / desc["towers"][tower]["file"])
        with torch.no_grad():
            want = (model.user_vectors(x) if tower == "user" else model.item_vectors(x)).numpy()
        got = runtime(numpy_inputs(module.sig, module.tensors_of(x)))
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=tower)
        assert np.abs(want[0] - want[1]).max() > 1e-3  # the rows' values differ, and so do their vectors
