"""ANN benchmark: recall@10/@100 against exact search, single-query latency and batched QPS, for
flat (exact), IVF and HNSW over a sweep of nprobe / efSearch; build time separately.

    .venv/bin/python benchmarks/ann.py                                  # 1M x 64 synthetic, clustered
    .venv/bin/python benchmarks/ann.py --run runs/gowalla               # + a trained run's item embeddings

Catalogs: a synthetic-but-clustered 1M x 64 catalog (``synthetic_catalog.py``: Gaussian mixture on
the unit sphere, Zipf popularity) and, with ``--run``, the item embeddings of a trained run with
real users of that run as queries. Vectors are those the service searches: the item tower's
output with the popularity coordinate appended (``twotower.model.scoring``), queries with
``alpha = 0``. Single-query figures use one FAISS thread (``faiss.omp_set_num_threads(1)``);
batched figures one search call over all queries with every core. Writes
``benchmarks/results/ann-<catalog>.json``, ``docs/img/ann-recall-latency.png`` and the ANN section of
``docs/benchmarks.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from twotower import artifacts  # noqa: E402
from twotower.index import IndexParams, ItemIndex, ScoreLayout, log_popularity, recall_at  # noqa: E402

IVF_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)
HNSW_SWEEP = (16, 32, 64, 128, 256, 512)


def single_query_ms(fn, queries: np.ndarray, k: int) -> dict:
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        fn(queries[:1], k)
        t = []
        for i in range(len(queries)):
            s = time.perf_counter()
            fn(queries[i : i + 1], k)
            t.append(time.perf_counter() - s)
    finally:
        faiss.omp_set_num_threads(threads)
    t = np.asarray(t) * 1e3
    return {"ms_mean": float(t.mean()), "ms_p50": float(np.percentile(t, 50)), "ms_p99": float(np.percentile(t, 99))}


def batched_qps(fn, queries: np.ndarray, k: int) -> float:
    fn(queries[:10], k)
    s = time.perf_counter()
    fn(queries, k)
    return len(queries) / (time.perf_counter() - s)


def bench_catalog(name: str, items: np.ndarray, log_p: np.ndarray, users: np.ndarray, temperature: float,
                  n_single: int, log) -> dict:
    layout = ScoreLayout.fit(log_p, temperature)
    x = layout.items(items, log_p)
    q = layout.queries(users, 0.0)
    res = {"catalog": name, "n_items": int(len(x)), "dim": int(items.shape[1]), "indexed_dim": int(x.shape[1]),
           "queries": int(len(q)), "single_queries": int(min(n_single, len(q)))}
    log(f"[{name}] {len(x):,} items x {items.shape[1]} (+1 popularity), {len(q):,} queries")
    t = time.perf_counter()
    flat = ItemIndex.build(x, IndexParams(kind="flat"), layout)
    res["flat"] = {"build_s": time.perf_counter() - t}
    _, exact = flat.exact_search(q, 100)
    sq = q[:n_single]
    for k in (10, 100):
        res["flat"][f"k{k}"] = {"single": single_query_ms(flat.search, sq, k), "batched_qps": batched_qps(flat.search, q, k)}
    log(f"[{name}] exact: {res['flat']['k10']['single']['ms_p50']:.2f} ms per query (k = 10, one thread), "
        f"{res['flat']['k10']['batched_qps']:.0f} QPS batched")
    for kind, knob, sweep, params in (("ivf", "nprobe", IVF_SWEEP, IndexParams(kind="ivf")),
                                      ("hnsw", "ef_search", HNSW_SWEEP, IndexParams(kind="hnsw", M=32, ef_construction=80))):
        t = time.perf_counter()
        idx = ItemIndex.build(x, params, layout)
        entry = {"build_s": time.perf_counter() - t, "params": idx.params.to_dict(), "sweep": []}
        log(f"[{name}] {kind}: built in {entry['build_s']:.1f}s ({idx.params.to_dict()})")
        for v in sweep:
            if kind == "ivf" and v > idx.params.nlist:
                continue
            idx.params = replace(idx.params, **{knob: v})
            _, ids = idx.search(q, 100)
            row = {knob: v, "recall@10": recall_at(ids[:, :10], exact[:, :10], 10), "recall@100": recall_at(ids, exact, 100)}
            if kind == "hnsw":  # FAISS searches with max(efSearch, k): measure k = 10 with its own top 10
                _, ids10 = idx.search(q, 10)
                row["recall@10"] = recall_at(ids10, exact[:, :10], 10)
            for k in (10, 100):
                row[f"k{k}"] = {"single": single_query_ms(idx.search, sq, k), "batched_qps": batched_qps(idx.search, q, k)}
            log(f"[{name}] {kind} {knob}={v}: recall@10 {row['recall@10']:.4f} ({row['k10']['single']['ms_p50']:.3f} ms), "
                f"recall@100 {row['recall@100']:.4f} ({row['k100']['single']['ms_p50']:.3f} ms), "
                f"batched {row['k10']['batched_qps']:.0f} QPS at k = 10")
            entry["sweep"].append(row)
        res[kind] = entry
    res["best_at_0.95"] = best_at(res, 0.95)
    return res


def best_at(res: dict, target: float) -> dict:
    """Per k: the fastest single-query configuration with recall@k >= target, and its speed-up over exact."""
    out = {}
    for k in (10, 100):
        exact_ms = res["flat"][f"k{k}"]["single"]["ms_p50"]
        cands = [(row[f"k{k}"]["single"]["ms_p50"], kind, row) for kind in ("ivf", "hnsw") for row in res[kind]["sweep"]
                 if row[f"recall@{k}"] >= target]
        if cands:
            ms, kind, row = min(cands, key=lambda c: c[0])
            knob = "nprobe" if kind == "ivf" else "ef_search"
            out[f"k{k}"] = {"kind": kind, knob: row[knob], f"recall@{k}": row[f"recall@{k}"], "ms_p50": ms,
                            "exact_ms_p50": exact_ms, "speedup": exact_ms / ms}
    return out


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.ticker
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4.2 * len(results)), squeeze=False)
    for r, res in zip(axes, results):
        for ax, k in zip(r, (10, 100)):
            for kind, knob, marker in (("ivf", "nprobe", "o"), ("hnsw", "ef_search", "s")):
                rows = res[kind]["sweep"]
                xs = [row[f"k{k}"]["single"]["ms_p50"] for row in rows]
                ys = [row[f"recall@{k}"] for row in rows]
                ax.plot(xs, ys, marker=marker, label=f"{kind.upper()} ({knob})")
                for xv, yv, row in zip(xs, ys, rows):
                    ax.annotate(str(row[knob]), (xv, yv), textcoords="offset points", xytext=(3, -10), fontsize=7)
            ax.axvline(res["flat"][f"k{k}"]["single"]["ms_p50"], color="gray", ls="--", label="exact (flat)")
            ax.axhline(0.95, color="gray", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("single-query latency, p50 (ms, one thread)")
            ax.set_ylabel(f"recall@{k} against exact")
            ax.set_title(f"{res['catalog']}: {res['n_items']:,} items, k = {k}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def markdown(results: list[dict]) -> str:
    lines = ["<!-- ann:begin -->", "## ANN search: recall against exact, latency, throughput", "",
             "Vectors are what the service searches: the item tower's output with the "
             "popularity coordinate appended (`twotower.model.scoring`), queries at `alpha = 0`, inner-product "
             "metric for every kind (`twotower.index.index`), the product's search path (`ItemIndex.search`). Recall@k = overlap of the "
             "top k with exact search's top k. Single-query latency: one query per call, one FAISS thread, p50 over "
             "the single-query sample. Batched: one call over all queries, every core. Build times separately.", ""]
    for res in results:
        lines += [f"### {res['catalog']}: {res['n_items']:,} items x {res['dim']} (+1), {res['queries']:,} queries", "",
                  "```bash", res["command"], "```", "", f"Machine: {res['machine']}.", ""]
        if res.get("note"):
            lines += [res["note"], ""]
        f = res["flat"]
        lines += [f"Exact (flat): {f['k10']['single']['ms_p50']:.2f} ms per query at k = 10, {f['k100']['single']['ms_p50']:.2f} ms "
                  f"at k = 100 (one thread); batched {f['k10']['batched_qps']:,.0f} QPS. "
                  f"Build: flat {f['build_s']:.1f} s, IVF {res['ivf']['build_s']:.1f} s (nlist {res['ivf']['params']['nlist']}), "
                  f"HNSW {res['hnsw']['build_s']:.1f} s (M {res['hnsw']['params']['M']}, efConstruction "
                  f"{res['hnsw']['params']['ef_construction']}).", "",
                  "| index | knob | recall@10 | ms/query k=10 | QPS batched k=10 | recall@100 | ms/query k=100 | QPS batched k=100 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for kind, knob in (("ivf", "nprobe"), ("hnsw", "efSearch")):
            key = "nprobe" if kind == "ivf" else "ef_search"
            for row in res[kind]["sweep"]:
                lines.append(f"| {kind.upper()} | {knob} {row[key]} | {row['recall@10']:.4f} | {row['k10']['single']['ms_p50']:.3f} | "
                             f"{row['k10']['batched_qps']:,.0f} | {row['recall@100']:.4f} | {row['k100']['single']['ms_p50']:.3f} | "
                             f"{row['k100']['batched_qps']:,.0f} |")
        lines.append(f"| flat | exact | 1.0000 | {f['k10']['single']['ms_p50']:.3f} | {f['k10']['batched_qps']:,.0f} | 1.0000 | "
                     f"{f['k100']['single']['ms_p50']:.3f} | {f['k100']['batched_qps']:,.0f} |")
        lines.append("")
        for k, b in res["best_at_0.95"].items():
            knob = "nprobe" if b["kind"] == "ivf" else "ef_search"
            lines.append(f"- fastest at recall@{k[1:]} >= 0.95: **{b['kind'].upper()} {knob} {b[knob]}**, "
                         f"recall {b['recall@' + k[1:]]:.4f}, {b['ms_p50']:.3f} ms vs exact {b['exact_ms_p50']:.2f} ms: "
                         f"**{b['speedup']:.0f}x faster**")
        lines.append("")
    lines += ["![recall against single-query latency](img/ann-recall-latency.png)", "",
              "Result files: `benchmarks/results/ann-<catalog>.json`.", "<!-- ann:end -->"]
    return "\n".join(lines)


def write_section(doc: Path, section: str, begin: str, end: str) -> None:
    """Replace the marked section of ``doc`` (or append it)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    artifacts.write_text(doc, text if text.endswith("\n") else text + "\n")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu})"


def render(out_dir: Path, doc: Path) -> None:
    """The doc section and the plot from every ``ann-*.json`` in ``out_dir``."""
    every = [json.loads(f.read_text()) for f in sorted(out_dir.glob("ann-*.json"))]
    every.sort(key=lambda r: r["slug"] != "synthetic")
    for r in every:
        r["best_at_0.95"] = best_at(r, 0.95)
    plot(every, doc.parent / "img" / "ann-recall-latency.png")
    write_section(doc, markdown(every), "<!-- ann:begin -->", "<!-- ann:end -->")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size (default 1M)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batched QPS (default 1000)")
    p.add_argument("--single", type=int, default=200, help="queries timed one at a time (default 200)")
    p.add_argument("--run", help="a trained run directory: also benchmark its item embeddings with its users")
    p.add_argument("--no-synthetic", action="store_true", help="only the --run catalog")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"), help="where ann-<catalog>.json go")
    p.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="Markdown file whose ANN section is (re)written")
    p.add_argument("--render-only", action="store_true", help="only rewrite the doc section and plot from the result files")
    args = p.parse_args(argv)
    if args.render_only:
        render(Path(args.out_dir), Path(args.doc))
        return 0
    log = lambda m: print(m, flush=True)  # noqa: E731
    results = []
    if args.run:
        from twotower.index.run_index import sample_users, user_vectors
        from twotower.model.towers import embed_items
        from twotower.run import Run

        run = Run(args.run)
        items = embed_items(run.model).float().cpu().numpy()
        users = user_vectors(run, sample_users(run, args.queries, seed=0))
        name = f"{run.config.data.dataset} (trained run)"
        res = bench_catalog(name, items, log_popularity(run.item_counts), users, float(run.model.temperature), args.single, log)
        res["slug"] = run.config.data.dataset
        res["note"] = f"Item embeddings of the trained run `{args.run}`; queries: {len(users):,} of its users (user tower with their known items)."
        results.append(res)
    if not args.no_synthetic:
        from synthetic_catalog import catalog

        items, users, counts = catalog(args.items, args.queries)
        res = bench_catalog("synthetic clustered", items, log_popularity(counts), users, 0.1, args.single, log)
        res["slug"] = "synthetic"
        res["note"] = (f"Synthetic: a Gaussian mixture of {args.items // 100:,} clusters (100 items each on average) on the unit sphere (noise 0.8 x the centre norm; "
                       "queries drawn from the same mixture with noise 1.0), Zipf popularity (`benchmarks/synthetic_catalog.py`). "
                       "Not real data: real embeddings usually have a lower intrinsic dimension and are easier to index.")
        results.append(res)
    cmd = ".venv/bin/python benchmarks/ann.py" + (f" --run {args.run}" if args.run else "") + (
        f" --items {args.items}" if args.items != 1_000_000 else "") + (" --no-synthetic" if args.no_synthetic else "")
    out_dir = Path(args.out_dir)
    for res in results:  # one result file per catalog; the doc section shows every catalog benchmarked so far
        res["command"], res["machine"] = cmd, machine()
        artifacts.write_json(out_dir / f"ann-{res['slug']}.json", res)
    render(out_dir, Path(args.doc))
    for res in results:
        for k, b in res["best_at_0.95"].items():
            log(f"{res['catalog']}: fastest at recall@{k[1:]} >= 0.95: {b}")
    log(f"wrote {', '.join('ann-' + r['slug'] + '.json' for r in results)} in {out_dir} and the ANN section of {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
