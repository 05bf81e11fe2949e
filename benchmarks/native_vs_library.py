"""Each compiled kernel (``twotower.native``) against the best library path that computes the same.

    flock /tmp/twotower-bench.lock .venv/bin/python benchmarks/native_vs_library.py [--run RUN]
        [--parts topk step isolated] [--reps 3] [--steps 150] [--out benchmarks/results/native-vs-library.json]

The decision rule (issue 16): a kernel stays only where it beats the best library path by at least
1.2x on the whole workload it serves; the figures are recorded either way (docs/benchmarks.md,
"C against the library alternative").

``topk``: the full Gowalla test ranking (29,858 users x 40,981 items, train + valid items masked,
top 20) with the vectors of ``--run`` (a Gowalla run at d = 64; without it, the untrained towers:
random unit vectors) and the real known-item CSR, three ways, each a whole ranking, interleaved
``--reps`` times:

- ``C``: ``_topk.c`` (``ranking.top_k_blocks`` with the kernel on);
- ``torch.topk``: the same function with the kernel off (1024-user blocks: product, mask, topk);
- ``FAISS``: ``IndexFlatIP`` exact search (its own BLAS and heaps), each user over-fetching by its
  known-item count (users bucketed by the next power of two of 20 + count, one search per bucket),
  the known items then dropped. The ranking itself; user vectors are computed for all three.

Recall@20 and NDCG@20 of each must be the same (the kernel is kept or dropped on speed alone).

``step``: whole Gowalla training steps (``Trainer.step``, ``configs/gowalla.toml`` at d = 64,
B = 2048, ``deferred_adam``), one trainer per variant, taking the same batches in turn (the order
rotating every step), median of ``--steps`` after 20 warm-up steps:

- ``C+C``: both kernels (the default);
- softmax on its PyTorch paths: ``eager`` (the hand-fused block loop, ``losses._blocks_python``) and
  ``torch.compile`` (the composed loss, ``q @ v.T + offset``, positive shift, excluded entries,
  ``logsumexp``, autograd, compiled with ``dynamic=True``), DeferredAdam compiled;
- DeferredAdam on its PyTorch path: ``eager`` and ``torch.compile`` (its lookup pass and its step
  compiled with ``dynamic=True``, floats not specialised), the softmax compiled.

``isolated``: the part each kernel replaces, alone: the loss forward + backward on a captured
Gowalla batch (C, eager, torch.compile); DeferredAdam lookup + step on a 70,000 x 64 table, 4,096
rows a step (C, eager, torch.compile). For context; the decision uses the whole workloads.
"""
from __future__ import annotations

import twotower  # noqa: F401  first, as the twotower command does: its OpenMP settings precede torch's

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from twotower import native
from twotower.config import RunConfig
from twotower.data.sources import load_dataset
from twotower.evaluation import metrics as M
from twotower.evaluation.ranking import embed_items, embed_users, top_k_blocks
from twotower.training import losses
from twotower.training.batching import epoch_batches
from twotower.training.optim import DeferredAdam
from twotower.training.trainer import Trainer, build_model

ROOT = Path(__file__).resolve().parents[1]
K = 20


@contextlib.contextmanager
def kernels_off(*names: str):
    """Only ``names`` switched off (the others stay as they are), for one variant of a paired run."""
    active = native.active
    native.active = lambda kernel: kernel not in names and active(kernel)
    try:
        yield
    finally:
        native.active = active


# ---- topk -------------------------------------------------------------------------------------------------
def faiss_top_k(user_vecs: np.ndarray, item_vecs: np.ndarray, users: np.ndarray, known, k: int) -> np.ndarray:
    """Exact top-k by inner product with FAISS, each user's known items excluded by over-fetching."""
    import faiss

    index = faiss.IndexFlatIP(item_vecs.shape[1])
    index.add(item_vecs)
    m = item_vecs.shape[0]
    counts = (known.indptr[users + 1] - known.indptr[users]).astype(np.int64)
    fetch = np.minimum(2 ** np.ceil(np.log2(k + counts)).astype(np.int64), m)
    known_keys = np.sort(np.repeat(np.arange(known.n_rows, dtype=np.int64), np.diff(known.indptr)) * m + known.indices)
    out = np.empty((len(users), k), dtype=np.int64)
    for f in np.unique(fetch):
        rows = np.flatnonzero(fetch == f)
        _, ids = index.search(user_vecs[rows], int(f))
        keys = users[rows, None] * m + ids
        pos = np.searchsorted(known_keys, keys).clip(max=len(known_keys) - 1)
        drop = (known_keys[pos] == keys) | (ids < 0)
        first = np.argsort(drop, axis=1, kind="stable")[:, :k]  # the best k not dropped, in rank order
        out[rows] = np.take_along_axis(ids, first, axis=1)
    return out


def ranking_metrics(top: np.ndarray, users: np.ndarray, truth, m: int) -> dict:
    truth_keys = np.sort(np.repeat(np.arange(truth.n_rows, dtype=np.int64), truth.lengths()) * m + truth.indices)
    keys = users[:, None] * m + top
    pos = np.searchsorted(truth_keys, keys).clip(max=len(truth_keys) - 1)
    hits = torch.from_numpy(truth_keys[pos] == keys)
    n_rel = torch.from_numpy(truth.lengths()[users])
    return {"recall@20": float(M.recall_at_k(hits, n_rel, K).mean()), "ndcg@20": float(M.ndcg_at_k(hits, n_rel, K).mean())}


def bench_topk(model, ds, reps: int) -> dict:
    known = ds.history("valid")  # train + valid: what the test ranking masks
    truth = ds.test.csr(known.n_rows)
    users = np.flatnonzero(truth.lengths() > 0)
    hl = model.cfg.history_length

    def ours():
        return np.concatenate([top.numpy() for _, _, top in top_k_blocks(model, users, known, known, K, hl, 1024)])

    def pytorch():
        with kernels_off("topk"):
            return ours()

    def faiss_way():
        item_vecs = embed_items(model).numpy()
        user_vecs = np.concatenate([embed_users(model, users[s:s + 4096], known, hl).numpy()
                                    for s in range(0, len(users), 4096)])
        return faiss_top_k(user_vecs, item_vecs, users, known, K)

    ways = {"C": ours, "torch.topk": pytorch, "FAISS": faiss_way}
    seconds = {w: [] for w in ways}
    results = {}
    for rep in range(reps + 1):  # rep 0 warms up (and gives the results compared)
        names = list(ways)[rep % 3:] + list(ways)[: rep % 3]
        for w in names:
            t = time.perf_counter()
            top = ways[w]()
            if rep:
                seconds[w].append(time.perf_counter() - t)
            else:
                results[w] = top
    figures = {w: ranking_metrics(results[w], users, truth, model.n_items) for w in ways}
    same_rows = {w: float((np.sort(results[w], 1) == np.sort(results["C"], 1)).all(1).mean()) for w in ways}
    out = {"users": int(len(users)), "items": int(model.n_items), "k": K, "masked": int(known.indices.size), "ways": {}}
    for w in ways:
        out["ways"][w] = {"median_s": float(np.median(seconds[w])), "seconds": seconds[w], **figures[w],
                          "rows_same_items_as_C": same_rows[w]}
    return out


# ---- step ---------------------------------------------------------------------------------------------------
def composed_loss(q, v, target, offset, hit_rows, hit_cols, shift):
    """The shared-candidate softmax composed from PyTorch operators (autograd does the gradient)."""
    z = q @ v.T
    if offset is not None:
        z = z + offset
    rows = torch.arange(q.shape[0], device=q.device)
    z_target = z[rows, target]
    if shift is not None:
        z_target = z_target - shift
        z = z.index_put((rows, target), z_target)
    z = z.index_put((hit_rows, hit_cols), torch.full((), float("-inf"), dtype=z.dtype))
    return (torch.logsumexp(z, dim=1) - z_target).mean()


_compiled_loss = None


def compiled_shared_softmax_loss(query, vectors, target, offset=None, excluded=None, positive_shift=None, extra=None,
                                 extra_mask=None, block_rows=None, query_ids=None):
    """``losses.shared_softmax_loss``'s signature over ``torch.compile(composed_loss)``."""
    global _compiled_loss
    if extra is not None:
        raise NotImplementedError("per-row columns: not in the Gowalla configuration")
    if _compiled_loss is None:
        _compiled_loss = torch.compile(composed_loss, dynamic=True)
    rows, cols = excluded if excluded is not None else losses.no_coordinates(query.device)
    return _compiled_loss(query, vectors, target, offset, rows, cols, positive_shift)


def compile_deferred_adam(opt: DeferredAdam) -> None:
    """DeferredAdam's PyTorch path (its lookup pass and its step) under torch.compile."""
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    torch._dynamo.config.specialize_float = False  # else each step's new step size recompiles
    opt.compiled = False
    opt._catch_up = torch.compile(DeferredAdam._catch_up, dynamic=True)
    opt.step = torch.compile(opt.step, dynamic=True)


VARIANTS = {  # name: (softmax, rowadam), each "C", "eager" or "compile"
    "C+C": ("C", "C"),
    "softmax eager": ("eager", "C"),
    "softmax torch.compile": ("compile", "C"),
    "rowadam eager": ("C", "eager"),
    "rowadam torch.compile": ("C", "compile"),
}


def bench_step(ds, steps: int) -> dict:
    warmup = min(20, steps)
    trainers = {}
    for name, (softmax, rowadam) in VARIANTS.items():
        cfg = RunConfig.load(str(ROOT / "configs" / "gowalla.toml"), ["model.dim=64"])
        tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
        tr.model.train()
        opt = tr.optimizer.opts[0]
        assert isinstance(opt, DeferredAdam) and opt.compiled
        if rowadam == "eager":
            opt.compiled = False
        elif rowadam == "compile":
            compile_deferred_adam(opt)
        trainers[name] = tr
    batches = epoch_batches(len(ds.train), 2048, np.random.default_rng(0), None)[: warmup + steps]
    ms = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    loss_fn = losses.shared_softmax_loss
    losses_seen = {name: [] for name in VARIANTS}
    for i, pairs in enumerate(batches):
        for name in names[i % len(names):] + names[: i % len(names)]:
            softmax = VARIANTS[name][0]
            losses.shared_softmax_loss = compiled_shared_softmax_loss if softmax == "compile" else loss_fn
            with kernels_off(*(["softmax"] if softmax != "C" else [])):
                t = time.perf_counter()
                loss = trainers[name].step(pairs, np.random.default_rng(i))
                dt = time.perf_counter() - t
            losses.shared_softmax_loss = loss_fn
            losses_seen[name].append(loss)
            if i >= warmup:
                ms[name].append(dt * 1e3)
    out = {"batch": 2048, "dim": 64, "steps": steps, "variants": {}}
    for name in VARIANTS:
        out["variants"][name] = {"softmax": VARIANTS[name][0], "rowadam": VARIANTS[name][1],
                                 "median_ms": float(np.median(ms[name])), "ms": ms[name],
                                 "mean_loss_last_20": float(np.mean(losses_seen[name][-20:]))}
    return out


# ---- isolated parts -------------------------------------------------------------------------------------------
def bench_isolated(ds, reps: int) -> dict:
    cfg = RunConfig.load(str(ROOT / "configs" / "gowalla.toml"), ["model.dim=64"])
    tr = Trainer(cfg, ds, None, quiet=True, log=lambda m: None)
    tr.model.train()
    captured = []
    loss_fn = losses.shared_softmax_loss
    losses.shared_softmax_loss = lambda *a, **k: captured.append((a, k)) or loss_fn(*a, **k)
    for i, pairs in enumerate(epoch_batches(len(ds.train), 2048, np.random.default_rng(0), None)[:12]):
        tr.step(pairs, np.random.default_rng(i))
    losses.shared_softmax_loss = loss_fn
    (q, v, target, offset, excluded, shift, _, _), kw = captured[-1]
    q, v, offset = q.detach(), v.detach(), offset.detach()

    def loss_of(fn):
        def run():
            qq, vv, oo = (t.clone().requires_grad_() for t in (q, v, offset))
            fn(qq, vv, target, oo, excluded, shift, query_ids=kw.get("query_ids")).backward()
        return run

    def eager():
        with kernels_off("softmax"):
            loss_of(loss_fn)()

    softmax = {"C": loss_of(loss_fn), "eager": eager, "torch.compile": loss_of(compiled_shared_softmax_loss)}

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 70_000, (4096,), generator=g) for _ in range(20 * (reps + 2))]
    tables = {}
    for kind in ("C", "eager", "torch.compile"):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(70_000, 64, sparse=True)
        opt = DeferredAdam(emb.parameters(), lr=1e-3, compiled=kind == "C")
        if kind == "torch.compile":
            compile_deferred_adam(opt)
        opt.attach(emb)
        tables[kind] = (emb, opt)

    def adam_steps(kind, block):
        emb, opt = tables[kind]
        for ix in ids[block * 20:(block + 1) * 20]:
            opt.zero_grad(set_to_none=True)
            emb(ix).square().sum().backward()
            opt.step()

    out = {"loss": {w: [] for w in softmax}, "deferred_adam": {w: [] for w in tables}}
    for rep in range(reps + 2):  # the first two warm up (torch.compile compiles, then recompiles once)
        for w, fn in softmax.items():
            t = time.perf_counter()
            for _ in range(10):
                fn()
            if rep >= 2:
                out["loss"][w].append((time.perf_counter() - t) / 10 * 1e3)
        for w in tables:
            t = time.perf_counter()
            adam_steps(w, rep)
            if rep >= 2:
                out["deferred_adam"][w].append((time.perf_counter() - t) / 20 * 1e3)
    return {part: {w: {"median_ms": float(np.median(x)), "ms": x} for w, x in ways.items()} for part, ways in out.items()} | {
        "loss_batch": {"rows": int(q.shape[0]), "candidates": int(v.shape[0]), "dim": int(q.shape[1])}}


# ---- report ------------------------------------------------------------------------------------------------------
def decide(res: dict) -> dict:
    """Per kernel: C's figure, the best library path's, their ratio, keep (>= 1.2x) or drop."""
    rows = {}
    if "topk" in res:
        w = res["topk"]["ways"]
        best = min(("torch.topk", "FAISS"), key=lambda n: w[n]["median_s"])
        rows["topk"] = {"C": w["C"]["median_s"], "best_library": best, "library": w[best]["median_s"], "unit": "s"}
    if "step" in res:
        v = res["step"]["variants"]
        for kernel, alts in (("softmax", ("softmax eager", "softmax torch.compile")),
                             ("rowadam", ("rowadam eager", "rowadam torch.compile"))):
            best = min(alts, key=lambda n: v[n]["median_ms"])
            rows[kernel] = {"C": v["C+C"]["median_ms"], "best_library": best, "library": v[best]["median_ms"], "unit": "ms"}
    for r in rows.values():
        r["ratio"] = r["library"] / r["C"]
        r["decision"] = "keep" if r["ratio"] >= 1.2 else "drop"
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a Gowalla run directory at d = 64 for the ranking (default: untrained towers)")
    p.add_argument("--parts", nargs="+", default=["topk", "step", "isolated"], choices=["topk", "step", "isolated"])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $TWOTOWER_DATA)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native-vs-library.json"))
    args = p.parse_args(argv)
    if not all(native.active(k) for k in native.KERNELS):
        raise SystemExit(f"every kernel must be active to be compared: {native.summary()}")
    cfg = RunConfig.load(str(ROOT / "configs" / "gowalla.toml"), ["model.dim=64"])
    ds = load_dataset(cfg.data, args.data_dir)
    res = {"command": "python benchmarks/native_vs_library.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "machine": f"{__import__('os').cpu_count()} cores {platform.machine()}", "torch": torch.__version__,
           "native": native.report(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "topk" in args.parts:
        if args.run:
            from twotower.run import Run

            model = Run(args.run).model
        else:
            torch.manual_seed(0)
            model = build_model(cfg, ds)
        model.eval()
        res["topk"] = bench_topk(model, ds, args.reps)
        res["topk"]["model"] = args.run or "untrained towers (random unit vectors)"
        for w, r in res["topk"]["ways"].items():
            print(f"topk {w:<11} {r['median_s']:6.2f} s   recall@20 {r['recall@20']:.6f}  ndcg@20 {r['ndcg@20']:.6f}  "
                  f"rows with C's items {r['rows_same_items_as_C']:.4f}", flush=True)
    if "step" in args.parts:
        res["step"] = bench_step(ds, args.steps)
        for name, r in res["step"]["variants"].items():
            print(f"step {name:<22} {r['median_ms']:7.1f} ms  (loss, last 20 steps: {r['mean_loss_last_20']:.4f})", flush=True)
    if "isolated" in args.parts:
        res["isolated"] = bench_isolated(ds, args.reps)
        for part in ("loss", "deferred_adam"):
            print(f"isolated {part}: " + ", ".join(f"{w} {r['median_ms']:.2f} ms" for w, r in res["isolated"][part].items()),
                  flush=True)
    res["decision"] = decide(res)
    print(f"\n{'kernel':<9}{'C':>10}{'best library path':>34}{'ratio':>8}  decision")
    for kernel, r in res["decision"].items():
        print(f"{kernel:<9}{r['C']:>8.2f} {r['unit']:<2}{r['best_library']:>24} {r['library']:>7.2f} {r['unit']:<2}"
              f"{r['ratio']:>6.2f}x  {r['decision']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
