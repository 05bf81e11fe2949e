"""``twotower export``: a run's towers, vocabularies, item embeddings and score convention, in one
folder that a process without twotower can serve from.

    OUT/
      export.json          what everything is: each tower's inputs and outputs (names, dtypes,
                           shapes, meanings), the score convention and its inner-product layout,
                           the files and their sha256 (written last: the folder is complete)
      user_tower.onnx      f(u): ONNX (or user_tower.pt: TorchScript)
      item_tower.onnx      g(j): for items not in the catalog below, or to re-embed
      items.parquet        one row per item, row i = item index i: item (raw id), vector (g(j)),
                           bias (b_j; 0 without a learned bias), log_p (log p(j)), index_vector
                           ([g(j), s_b b_j, s_p (-log p(j) - c)]: what an inner-product index holds)
      users.parquet        with --users: user (raw id), vector (f(u) of each known user, with its
                           known items as history and its stored features)
      vocab/users.json     raw user ids, position = index (the ``ids`` input of the user tower)
      vocab/items.json     raw item ids, position = index (``ids`` of the item tower, ``history``)
      vocab/features.json  each feature's fitted state by tower (item, user, context): its kind and
                           what encodes its values (categorical: "values", code i = values[i], then
                           the out-of-vocabulary and the missing code; numeric: mean, std or edges;
                           text: the tokenizer's settings, buckets and seed; docs/features.md)

The folder is written into ``OUT.new`` and swapped in whole (``artifacts.replace_dir``), so a
failed export leaves no half-written folder and an earlier export stays as it was. Before the swap,
each exported tower is run back (ONNX Runtime, or ``torch.jit.load``) on real users and items and
compared with the Python path; the largest difference is recorded in export.json.
"""
from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import artifacts
from ..errors import ArtifactError
from ..index.embeddings import embeddings_table
from ..index.run_index import item_vectors, user_vectors
from ..model.scoring import item_bias
from ..model.towers import embed_items
from ..run import Run
from .formats import FORMATS, LOAD, SAVE, SUFFIX, require
from .towers import ExportError, TowerExport, check_dtypes, numpy_inputs

DESCRIPTION = "export.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
VOCAB = "vocab"
SCHEMA = 1
# Rows the exported towers are checked on before the folder is swapped in (real users and items).
CHECK_ROWS = 64
# Exported and Python vectors further apart than this fail the export (float32 arithmetic in
# another order differs by ~1e-7).
CHECK_TOLERANCE = 1e-4


def score_convention(layout, bias: bool, fold_in: bool) -> dict:
    """The served score and its inner-product layout (``model/scoring.py``, ``ScoreLayout``), JSON-ready."""
    item = "[vector, bias_scale * bias, scale * (-log_p - offset)]" if bias else "[vector, scale * (-log_p - offset)]"
    query = "[f / temperature, 1 / bias_scale, alpha / scale]" if bias else "[f / temperature, alpha / scale]"
    out = {
        "score": "score(u, j) = <f(u), g(j)> / temperature + bias_j - alpha * log_p_j",
        "temperature": layout.temperature,
        "learned_bias": bias,
        "log_p": "log((n_j + 1) / (N + n_items)): n_j the item's training positives, N their total (add-one smoothed)",
        "alpha": "popularity correction chosen per request: 0 is the training score, > 0 favours the tail, < 0 the head",
        "layout": {"offset": layout.offset, "scale": layout.scale, "bias_scale": layout.bias_scale,
                   "item_vector": item, "query_vector": query,
                   "inner_product": "<query_vector, item_vector> = score(u, j) - alpha * offset: the same ranking for every "
                                    "item; add alpha * offset back to report the score"},
        "exclude": "the user's known items are not excluded by the score: drop them from the results",
    }
    if fold_in:
        out["new_user"] = ("this user tower reads no history: place a user not in the vocabulary at "
                           "f = normalize(sum of the vector of each of its items), the point the run's service uses")
    return out


def _check(module: TowerExport, runtime, inputs, reference: torch.Tensor) -> float:
    tensors = module.tensors_of(inputs)
    check_dtypes(module.sig, tensors)
    got = runtime(numpy_inputs(module.sig, tensors))
    diff = float(np.abs(got - reference.float().cpu().numpy()).max()) if len(got) else 0.0
    if not diff <= CHECK_TOLERANCE:
        raise ExportError(f"the exported {module.sig.tower} tower differs from the Python path by {diff:.3g} "
                          f"(more than {CHECK_TOLERANCE:g}) on {len(got)} rows; the export was not written")
    return diff


def _check_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, min(n, CHECK_ROWS), replace=False)) if n else np.empty(0, np.int64)


def export_run(run: Run | str | Path, out: str | Path, fmt: str = "onnx", users: bool = False, overwrite: bool = False,
               log=None) -> dict:
    """Export ``run`` into the folder ``out`` (module docstring) as ``fmt`` (``"onnx"`` or
    ``"torchscript"``); ``users``: also every known user's ``f(u)``. Returns export.json's content.

    Refused with an ``ExportError`` (nothing written): an unknown format, a missing optional package
    (``pip install 'twotower[export]'``), an ``out`` that exists and is not an earlier export (or is
    one, without ``overwrite``), a tower the runtime does not reproduce."""
    log = log or (lambda m: None)
    if fmt not in FORMATS:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require("onnx", "onnxscript", "onnxruntime", why="exporting to ONNX (and checking the result)")
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder; choose another --out")
        if any(out.iterdir()):
            if not (out / DESCRIPTION).is_file():
                raise ExportError(f"{out}: exists, is not empty and holds no {DESCRIPTION} (not an export); choose another "
                                  "--out, a new or empty folder")
            if not overwrite:
                raise ExportError(f"{out}: holds an earlier export; pass --overwrite to replace it, or choose another --out")
    run = run if isinstance(run, Run) else Run(run)
    t0 = time.perf_counter()
    stage = artifacts.staging_dir(out, DESCRIPTION)
    try:
        desc = _write(run, stage, fmt, users, log)
        desc["seconds"] = round(time.perf_counter() - t0, 3)
        files = sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*") if p.is_file())
        desc["sha256"] = {f: artifacts.sha256_file(stage / f) for f in files}
        artifacts.write_json(stage / DESCRIPTION, desc)
        artifacts.replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return desc


def _write(run: Run, stage: Path, fmt: str, with_users: bool, log) -> dict:
    model = run.model.cpu().eval()
    rng = np.random.default_rng(0)
    towers = {}
    for tower in ("user", "item"):
        module = TowerExport(model, tower)
        example = module.example()
        check_dtypes(module.sig, example)
        name = f"{tower}_tower{SUFFIX[fmt]}"
        t = time.perf_counter()
        files = SAVE[fmt](module, example, stage / name)
        seconds = time.perf_counter() - t
        runtime = LOAD[fmt](stage / name)
        with torch.no_grad():
            if tower == "user":
                ids = _check_rows(len(run.users), rng)
                x = model.user_inputs(ids, run.known)
                diff = _check(module, runtime, x, model.user_vectors(x))
            else:
                ids = _check_rows(len(run.items), rng)
                x = model.item_inputs(ids)
                diff = _check(module, runtime, x, model.item_vectors(x))
        log(f"{tower} tower: {name} ({seconds:.1f}s), max |difference| to the Python path {diff:.2g} on {len(ids)} {tower}s")
        towers[tower] = {"file": name, "files": files, **module.sig.describe(), "export_seconds": round(seconds, 3),
                         "check": {"rows": int(len(ids)), "max_abs_diff": diff, "against": f"TwoTowerModel.{tower}_vectors"}}
    towers["user"]["history_length"] = int(run.config.model.history_length) if model.user_tower.use_history else None

    # items: g(j), bias, log p and the index layout, through the functions the run's index uses
    with torch.no_grad():
        emb = embed_items(model).float().cpu().numpy()
    log_p = run.log_popularity
    index_vecs, layout = item_vectors(run, emb)
    bias = item_bias(model)
    table = embeddings_table(run.items.ids, emb)
    table = table.append_column("bias", _float32(bias if bias is not None else np.zeros(len(emb))))
    table = table.append_column("log_p", _pa().array(np.asarray(log_p, dtype=np.float64)))
    table = table.append_column("index_vector", embeddings_table(run.items.ids, index_vecs).column("vector"))
    _write_parquet(table, stage / ITEMS)
    log(f"items: {ITEMS} ({len(emb):,} items x {emb.shape[1]} dims)")
    users_desc = None
    if with_users:
        vecs = user_vectors(run, np.arange(len(run.users)))
        _write_parquet(embeddings_table(run.users.ids, vecs).rename_columns(["user", "vector"]), stage / USERS)
        users_desc = {"file": USERS, "rows": int(len(vecs)),
                      "columns": {"user": "raw user id (row i = user index i)",
                                  "vector": "f(u), float32: the user tower with the user's known items (training and "
                                            "validation, the most recent history_length) and stored features"}}
        log(f"users: {USERS} ({len(vecs):,} users)")

    (stage / VOCAB).mkdir()
    artifacts.write_json(stage / VOCAB / "users.json", run.users.ids.tolist())
    artifacts.write_json(stage / VOCAB / "items.json", run.items.ids.tolist())
    artifacts.write_json(stage / VOCAB / "features.json",
                         {tower: {f["name"]: {k: v for k, v in f.items() if k != "name"} for f in feats}
                          for tower, feats in model.feature_state().meta.items()})
    return {
        "format": "twotower-export",
        "schema": SCHEMA,
        "runtime": fmt,
        "run": {"path": str(run.path.resolve()), "weights_sha256": run.dir.model_digest(),
                "model": run.config.model.model_dump(mode="json")},
        "made_with": {"twotower": _version(), "torch": torch.__version__, "python": platform.python_version()},
        "dim": int(model.cfg.dim),
        "towers": towers,
        "score": score_convention(layout, bias is not None, fold_in=not model.user_tower.use_history),
        "items": {"file": ITEMS, "rows": int(len(emb)),
                  "columns": {"item": "raw item id (row i = item index i)", "vector": "g(j), float32",
                              "bias": "b_j, float32 (0 when the model has no learned bias)",
                              "log_p": "log p(j), float64", "index_vector": "score.layout.item_vector, float32"}},
        "users": users_desc,
        "vocabularies": {"users": f"{VOCAB}/users.json", "items": f"{VOCAB}/items.json",
                         "features": f"{VOCAB}/features.json",
                         "how": "a JSON list of raw ids: the position of an id is its index; features.json: "
                                "{tower: {feature: {kind, ...}}}, a categorical feature's code i is values[i], then the "
                                "out-of-vocabulary code len(values) and the missing code len(values) + 1"},
    }


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("twotower")
    except PackageNotFoundError:
        return None


def _pa():
    import pyarrow

    return pyarrow


def _float32(values) -> "object":
    return _pa().array(np.asarray(values, dtype=np.float32))


def _write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    with artifacts.atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_description(folder: str | Path) -> dict:
    """export.json of an export folder (an ``ArtifactError`` when it is not one)."""
    p = Path(folder) / DESCRIPTION
    if not p.is_file():
        raise ArtifactError(f"{folder}: no {DESCRIPTION}; not a folder written by `twotower export`")
    return artifacts.read_json(p)
