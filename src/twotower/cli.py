"""Command line: ``twotower train | evaluate | recommend | index | embed | add-items | update | serve | export | mine | compare | tune | baseline | demo | config | info``.

Every subcommand is a thin shell over the Python API (``twotower.api``, ``twotower.run.Run``): a
``cmd_<command>`` function that runs it, beside the ``add_<command>_parser`` function that declares
its arguments (``COMMANDS`` lists them).
User mistakes (bad data, bad config, bad run directory) print one message and exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .display import format_metrics, item_label
from .errors import TwotowerError, storage_error

EPILOG_TRAIN = """\
examples:
  twotower train configs/ml-100k.toml --out runs/ml100k
  twotower train configs/gowalla.toml --out runs/gowalla --set train.epochs=5 --set model.temperature=0.07
  twotower train configs/gowalla.toml --out runs/gowalla --resume     # continue after a crash
  torchrun --standalone --nproc-per-node 2 -m twotower train configs/gowalla.toml --out runs/gowalla-2

Under torchrun (gloo on CPU, NCCL on CUDA) train.batch_size is the global batch: each rank takes
batch_size / N rows of it, in-batch negatives are gathered across ranks, and rank 0 alone writes
the run directory and evaluates; --resume works the same way.

The config has six sections: [data] (what to read and how to split it), [model] (the towers),
[train] (optimiser, loss and its corrections, early stopping), [negatives] (sampled, memory-bank
and hard negatives), [mining] (hard-negative mining rounds) and [eval] (cut-offs K, popularity
correction, buckets). Every key, its default and bounds: docs/config.md or `twotower config
--reference`. Data paths are relative to the data directory: --data-dir, else $TWOTOWER_DATA, else
~/.local/share/twotower.
"""


EPILOG_EMBED = """\
examples:
  twotower embed runs/big                                  # RUN/embeddings/part-00000.parquet, ... + embeddings.json
  twotower embed runs/big --chunk-size 500000 --device cuda
  for i in 0 1 2 3; do twotower embed runs/big --job $i/4 & done; wait   # four jobs, parts in parallel
  twotower index runs/big --from-parts runs/big/embeddings --kind ivf   # then: twotower serve runs/big

Part p holds the items with vocabulary index p*N .. (p+1)*N - 1 (N = --chunk-size): columns item
(raw id) and vector (float32). Each part has a record part-NNNNN.json (range, size, sha256, the
weights' sha256); embeddings.json lists every part and is written when the last one exists.
Every file is written atomically: rerun an interrupted job and it keeps the parts already written.
"""


def _data_dir(args) -> Path | None:
    return Path(args.data_dir) if getattr(args, "data_dir", None) else None


# ---- argument types: a value that cannot work is refused by the parser, with its bounds --------------
def int_in(lo: int, hi: int):
    """An ``argparse`` type: an integer from ``lo`` to ``hi``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be an integer from {lo:,} to {hi:,}, got {v:,}")
        return v
    parse.__name__ = "integer"
    return parse


def out_path(text: str) -> str:
    """An ``argparse`` type for ``--out``: not empty (``--out ""`` meant the current folder)."""
    if not text.strip() or "\x00" in text:
        raise argparse.ArgumentTypeError(f"expected a folder or file name, got {text!r}")
    return text


out_path.__name__ = "path"


def float_in(lo: float, hi: float, lo_open: bool = False):
    """An ``argparse`` type: a finite number in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or not (lo < v if lo_open else lo <= v) or v > hi:
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {text}")
        return v
    parse.__name__ = "number"
    return parse


ALPHA = float_in(-1e4, 1e4)   # as the config's eval.alpha and the service's requests


def cmd_train(args) -> int:
    from .api import train
    from .config import RunConfig
    from .run_dir import RunDir
    from .training import distributed

    overrides = list(args.set or [])
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.device is not None:
        overrides.append(f'train.device="{args.device}"')
    cfg = RunConfig.load(args.config, overrides)
    out = Path(args.out)
    rd = RunDir(out)
    if not distributed.is_main():
        # Under torchrun every rank checks before any writes: rank 0 writes only after all ranks
        # have joined the process group (in the trainer), so none can see a directory it created.
        _check_fresh(rd, args.resume)
        res = train(cfg, out, _data_dir(args), resume=args.resume, quiet=args.quiet)
    else:
        # The lock first, then the check: two trainings started together both found the directory
        # empty before. ``train`` takes the same lock again (re-entrant) and holds it to the end.
        with rd.lock("twotower train" + (" --resume" if args.resume else "")):
            _check_fresh(rd, args.resume)
            res = train(cfg, out, _data_dir(args), resume=args.resume, quiet=args.quiet)
    distributed.shutdown()
    if not distributed.is_main():
        return 0
    table = {"valid": res.valid}
    if res.test is not None:
        table["test"] = res.test
    print(format_metrics(table, [k for k in cfg.eval.ks if k <= 100]))
    print(f"run written to {out} ({res.seconds:.0f}s)")
    return 0


def _check_fresh(rd, resume: bool) -> None:
    if not resume and not rd.is_empty():
        raise TwotowerError(f"{rd.path}: already exists and is not empty. Pass --resume to continue that run, or choose "
                            "another --out")


def add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a model from a config file", epilog=EPILOG_TRAIN,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="TOML or YAML config (see configs/; every key: docs/config.md)")
    t.add_argument("--out", required=True, type=out_path, help="run directory to write (config, vocabularies, weights, metrics)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    t.add_argument("--epochs", type=int_in(1, 100_000), help="shorthand for --set train.epochs=N")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], help="shorthand for --set train.device=...: auto picks CUDA "
                   "when available (under torchrun: one GPU per rank, cuda:LOCAL_RANK)")
    t.add_argument("--data-dir", help="data directory (default: $TWOTOWER_DATA or ~/.local/share/twotower)")
    t.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch), for logs")
    t.set_defaults(func=cmd_train)


def cmd_evaluate(args) -> int:
    from .api import evaluate_run

    m = evaluate_run(args.run, args.split, _data_dir(args), alpha=args.alpha)
    if args.json:
        print(json.dumps(m, indent=2, sort_keys=True))
    else:
        ks = sorted({int(k.split("@")[1].split("/")[0]) for k in m if "@" in k})
        print(format_metrics({args.split: m}, ks))
    return 0


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="score a trained run by full ranking",
                       description="Rank every item for every user of the split, the user's known items masked, and print\n"
                                   "Recall, NDCG, HR, Precision, MRR, coverage, tail share and popularity at each cut-off\n"
                                   "of the run's eval.ks (--json adds recall by popularity bucket of the held-out item).",
                       epilog="examples:\n  twotower evaluate runs/ml100k\n  twotower evaluate runs/ml100k --split valid --json\n"
                              "  twotower evaluate runs/ml100k --alpha 0.5      # as served with popularity correction",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run", help="run directory written by `twotower train`")
    e.add_argument("--split", choices=["test", "valid"], default="test",
                   help="held-out items to score: test (the user's training and validation items masked) or valid "
                        "(training items masked); default test")
    e.add_argument("--data-dir", help="data directory the run was trained from (default: $TWOTOWER_DATA or "
                                      "~/.local/share/twotower): the split is rebuilt from the data and the run's config")
    e.add_argument("--json", action="store_true", help="print all metrics as JSON")
    e.add_argument("--alpha", type=ALPHA, default=None,
                   help="rank by the served score with popularity correction, score - alpha * log p(item), as "
                        "`serve` does (default: the run's eval.alpha, normally 0). Raising it trades head-item "
                        "recall for tail-item recall: see the recall@K/tail rows of --json")
    e.set_defaults(func=cmd_evaluate)


def _read_user_file(path: Path, entity: str = "user", what: str = "users") -> list[str]:
    from .errors import DataError

    if not path.is_file():
        raise DataError(path, f"{what} file not found", f"pass a text file with one raw {entity} id per line")
    try:
        ids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8 text (byte {e.start})", "Save the file as UTF-8") from None
    if not ids:
        raise DataError(path, f"no {entity} ids in the file", f"write one raw {entity} id per line")
    return ids


def cmd_recommend(args) -> int:
    import numpy as np

    from . import artifacts, locks
    from .run import Run

    out = Path(args.out) if args.out else None
    if out is not None:  # before any work: a name that cannot be written is refused at once
        if out.is_dir():
            raise TwotowerError(f"--out {out}: is a folder; give a file name, e.g. --out {out / 'recs.parquet'}")
        if out.suffix not in (".parquet", ".csv"):
            raise TwotowerError(f"--out {out}: use a .parquet or .csv file name")
    run = Run(args.run)
    if args.user is not None or args.history is not None or args.features:
        return _recommend_one(run, args)
    if args.users_file:
        users = run.users.coerce(_read_user_file(Path(args.users_file)))
        unknown = run.users.encode(users) < 0
        if unknown.any():
            raise TwotowerError(f"{args.users_file}: {int(unknown.sum())} unknown user id(s), e.g. {users[unknown][:3].tolist()}; "
                                "remove them or check the run")
    elif args.all_users:
        idx = run.test_users if args.scope == "test" else np.arange(len(run.users))
        users = run.users.decode(idx)
    else:
        raise TwotowerError("say whom to recommend for: --user ID, --users-file FILE or --all-users")
    if out is None:
        raise TwotowerError("batch recommendation writes a file: pass --out FILE.parquet or FILE.csv")
    from .serving.query import Recommender

    with locks.exclusive(out, "twotower recommend", folder=False):
        artifacts.remove_stale_temporaries(out.parent, [out.name])  # what a killed writer of this file left
        rec = Recommender.load(run, args.index, category_feature=args.category_feature)
        recs = rec.recommend_frame(users, k=args.k, exclude_seen=not args.include_seen, alpha=args.alpha,
                                   category=args.category,
                                   context=_parsed(run.model.user_tower.context, args.context, "--context", "context feature"))
        with artifacts.atomic_path(out) as tmp:
            if out.suffix == ".parquet":
                recs.to_parquet(tmp, index=False)
            else:
                recs.to_csv(tmp, index=False)
    print(f"wrote {len(recs):,} recommendations for {len(users):,} users to {out}")
    return 0


def _recommend_one(run, args) -> int:
    """One user's top-k through the serving code path (``Recommender``): a known user by id, or a
    new user by a history of item ids."""
    from .serving.query import Query, Recommender, UnknownUserError

    rec = Recommender.load(run, args.index, category_feature=args.category_feature)
    context = _parsed(run.model.user_tower.context, args.context, "--context", "context feature")
    if args.user is not None:
        if args.features:
            raise TwotowerError("--features describe a new user (with --history, or alone); a known user's features are "
                                "already in the model")
        q = Query(user=args.user, k=args.k, alpha=args.alpha, exclude_seen=not args.include_seen, category=args.category,
                  context=context)
    else:
        q = Query(history=[h.strip() for h in (args.history or "").split(",") if h.strip()], k=args.k, alpha=args.alpha,
                  exclude_seen=not args.include_seen, category=args.category, context=context,
                  features=_parsed(run.model.user_tower.features, args.features, "--features", "user feature"))
    try:
        r = rec.recommend(q)
    except UnknownUserError:
        raise TwotowerError(f"user {args.user!r} is not in this run's vocabulary ({len(run.users):,} users); "
                            "pass a user id from the training data, or a new user's items with --history ID,ID,...") from None
    if args.user is not None:
        hist = run.history_of(args.user)
        print(f"user {args.user}: {len(hist)} known items" + (f", e.g. {', '.join(item_label(run, i) for i in hist[-5:])}" if len(hist) else ""))
    else:
        print(f"new user: {len(q.history) - len(r.unknown_items)} known items"
              + (f" ({len(r.unknown_items)} unknown ignored: {', '.join(map(str, r.unknown_items[:5]))})" if r.unknown_items else ""))
    if r.fallback:
        print(f"(nothing usable: {r.fallback_reason}; the most popular items{' of ' + str(args.category) if args.category else ''})")
    print(f"{'rank':>4}  {'item':>10}  {'score':>7}  title")
    for rank, (item, score) in enumerate(zip(r.items.tolist(), r.scores.tolist()), 1):
        print(f"{rank:>4}  {str(item):>10}  {score:7.4f}  {run.title(item) or ''}")
    return 0


def _parsed(features, text: str | None, option: str, what: str) -> dict | None:
    """``name=value,...`` of a command line, each value as its feature's kind takes it."""
    if text is None:
        return None
    if features is None:
        raise TwotowerError(f"{option}: this model's user tower takes no {what}s")
    from .errors import FeatureInputError

    try:
        return features.parse(text, what)
    except KeyError as e:
        raise TwotowerError(f"{option}: {e.args[0]}") from None
    except FeatureInputError as e:
        raise TwotowerError(f"{option}: {e}") from None


def add_recommend_parser(sub) -> None:
    r = sub.add_parser("recommend", help="top-k items for one user or for many (to a file)",
                       epilog="examples:\n  twotower recommend runs/ml100k --user 196 -k 20\n"
                              "  twotower recommend runs/ml100k --history 50,172,181 -k 10 --alpha 0.5\n"
                              "  twotower recommend runs/feat --features age=31,occupation=writer --context hour=21\n"
                              "  twotower recommend runs/ml100k --all-users -k 100 --out candidates.parquet",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run", help="run directory written by `twotower train`")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--user", help="raw user id")
    g.add_argument("--all-users", action="store_true", help="every user of the run's test split (see --scope)")
    g.add_argument("--users-file", help="text file with one raw user id per line")
    g.add_argument("--history", metavar="ID,ID,...", help="a new user: raw item ids, oldest first (unknown ones are ignored)")
    r.add_argument("--scope", choices=["test", "all"], default="test", help="with --all-users: test-split users or every user")
    r.add_argument("-k", type=int_in(1, 100_000), default=20, help="items per user (default 20)")
    r.add_argument("--out", type=out_path, help="output file for batch mode: .parquet or .csv (columns user, item, score, rank)")
    r.add_argument("--include-seen", action="store_true", help="do not exclude the user's training items")
    r.add_argument("--alpha", type=ALPHA, default=0.0, help="popularity correction: score - alpha * log p(item) (default 0)")
    r.add_argument("--features", metavar="NAME=VALUE,...", help="a new user's features (with --history, or alone): "
                   "numbers, labels (several: a|b), texts, vectors (numbers separated by spaces)")
    r.add_argument("--context", metavar="NAME=VALUE,...", help="the request's context features, e.g. hour=21,weekday=Sat "
                   "(those left out take their defaults: docs/features.md)")
    r.add_argument("--category", help="only items of this category (a value of the item feature --category-feature)")
    r.add_argument("--category-feature", help="item feature that --category refers to (default: the model's only "
                   "categorical item feature; needed when it has several)")
    r.add_argument("--index", help="index folder (default RUN/index if built, else exact search)")
    r.set_defaults(func=cmd_recommend)


def cmd_index(args) -> int:
    from .index.index import IndexParams
    from .index.run_index import build_run_index
    from .run import Run

    run = Run(args.run)
    if args.update or any(x is not None for x in (args.add, args.replace, args.remove)) or args.add_new:
        return _update_index(run, args)
    if args.retune:
        from .index.run_index import retune_run_index

        idx = retune_run_index(run, args.out, args.ef_search, args.nprobe, args.target_recall, args.sample_users, args.seed,
                               log=lambda m: print(m, flush=True))
        m = idx.info.get("measured", {})
        print(f"{idx.kind}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("recall@")))
        return 0
    params = IndexParams(kind=args.kind, nlist=args.nlist, nprobe=args.nprobe, M=args.M, ef_construction=args.ef_construction,
                         ef_search=args.ef_search, pq_m=args.pq_m, pq_bits=args.pq_bits or (4 if args.fast_scan else 8),
                         refine=args.refine, fast_scan=args.fast_scan, target_recall=0.95 if args.target_recall is None else args.target_recall, train_size=args.train_size)
    if args.from_parts:  # one part in memory at a time
        from .index.parts import build_run_index_from_parts

        idx = build_run_index_from_parts(run, args.from_parts, params, args.out, sample=args.sample_users, seed=args.seed,
                                         progress=not args.quiet, log=lambda m: print(m, flush=True))
    else:
        idx = build_run_index(run, params, args.out, sample=args.sample_users, seed=args.seed, progress=not args.quiet,
                              log=lambda m: print(m, flush=True))
    m = idx.info.get("measured", {})
    print(f"{idx.kind}: {idx.size:,} items, dim {idx.dim}; "
          + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("recall@"))
          + f"; {m.get('ann_ms_p50', float('nan')):.3f} ms per query (exact {m.get('exact_ms_p50', float('nan')):.3f} ms)")
    return 0


def _item_list(path: str, what: str, vectors: bool):
    """Raw item ids (and vectors) from ``--add`` / ``--replace`` / ``--remove``: a text file with one
    id per line, or a Parquet file with a column ``item`` (and ``vector``, a list of floats per item,
    as `twotower embed` writes: used instead of the item tower when present)."""
    import numpy as np

    from .errors import DataError

    p = Path(path)
    if p.suffix.lower() != ".parquet":
        ids = _read_user_file(p, "item", what)
        return ids, None
    try:
        import pyarrow.parquet as pq

        t = pq.read_table(p)
    except FileNotFoundError:
        raise DataError(p, "file not found", f"pass the items to {what} as a Parquet file or a text file") from None
    except Exception as e:  # pyarrow's errors for a damaged file
        raise DataError(p, f"cannot read it as Parquet ({str(e).splitlines()[0]})", "write it again") from None
    if "item" not in t.column_names:
        raise DataError(p, f"no column 'item' (columns: {', '.join(t.column_names)})",
                        "name the column of raw item ids 'item'")
    ids = t.column("item").to_pylist()
    if not vectors or "vector" not in t.column_names:
        return ids, None
    vec = t.column("vector").to_pylist()
    width = {len(v) if v is not None else -1 for v in vec}
    if len(width) != 1 or -1 in width:
        raise DataError(p, "the 'vector' column has missing values or rows of different lengths",
                        "give every item a vector of the model's dimension")
    return ids, np.asarray(vec, dtype=np.float32)


def _update_index(run, args) -> int:
    from .index.run_index import update_run_index

    if args.from_parts or args.retune:
        from .errors import ConfigError

        raise ConfigError("--update changes a built index: it cannot be combined with --from-parts or --retune")
    add, add_v = _item_list(args.add, "add", True) if args.add else (None, None)
    rep, rep_v = _item_list(args.replace, "replace", True) if args.replace else (None, None)
    rem, _ = _item_list(args.remove, "remove", False) if args.remove else (None, None)
    idx = update_run_index(run, add=add, replace=rep, remove=rem, add_vectors=add_v, replace_vectors=rep_v,
                           add_new=args.add_new, folder=args.out, rebuild_share=args.rebuild_share,
                           sample=args.sample_users, seed=args.seed, log=lambda m: print(m, flush=True))
    m = idx.info.get("measured", {})
    print(f"{idx.kind}: {idx.size:,} items after the update; "
          + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("recall@")))
    return 0


def add_index_parser(sub) -> None:
    ix = sub.add_parser("index", help="embed every item and build a FAISS index in the run directory",
                        epilog="examples:\n  twotower index runs/ml100k                      # auto: flat below 50k items, HNSW up to 5M, IVF beyond\n"
                               "  twotower index runs/gowalla --kind hnsw --M 32 --ef-search 128\n"
                               "  twotower index runs/big --kind ivfpq --nlist 4096 --pq-m 16 --refine 4\n"
                               "  twotower index runs/big --from-parts runs/big/embeddings --kind ivf   # parts of `twotower embed`\n"
                               "  twotower index runs/big --update --add new.parquet --remove retired.txt   # no rebuild\n\n"
                               "Search knobs not given (--nprobe, --ef-search) are tuned on real users to reach --target-recall.\n"
                               "Recall@10/@100 against exact search and per-query latency are printed and stored in RUN/index/index.json.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ix.add_argument("run", help="run directory written by `twotower train`")
    ix.add_argument("--kind", choices=["auto", "flat", "ivf", "hnsw", "ivfpq"], default="auto",
                    help="flat: exact; hnsw: neighbour graph; ivf: k-means lists; ivfpq: lists of compressed codes, "
                         "re-ranked exactly; auto (default): flat below 50k items, hnsw up to 5M, ivf beyond")
    ix.add_argument("--nlist", type=int_in(1, 1 << 24), help="IVF lists (default 4 * sqrt(items))")
    ix.add_argument("--nprobe", type=int_in(1, 1 << 24), help="IVF lists visited per query (default: tuned)")
    ix.add_argument("--M", type=int_in(2, 1024), default=32, help="HNSW neighbours per node (default 32)")
    ix.add_argument("--ef-construction", type=int_in(1, 1 << 16), default=80, help="HNSW build-time candidate list (default 80)")
    ix.add_argument("--ef-search", type=int_in(1, 1 << 16), help="HNSW search-time candidate list (default: tuned; at least k is used)")
    ix.add_argument("--pq-m", type=int_in(1, 4096), default=16, help="IVF-PQ sub-quantizers (default 16)")
    ix.add_argument("--pq-bits", type=int_in(1, 16), default=None, help="IVF-PQ bits per code (default 8; 4 with --fast-scan)")
    ix.add_argument("--fast-scan", action="store_true",
                    help="IVF-PQ: 4-bit codes scanned with SIMD lookup tables (FAISS IVFPQFastScan), several times faster per code")
    ix.add_argument("--refine", type=int_in(1, 1000), default=4, help="IVF-PQ: re-rank refine * k candidates exactly (default 4)")
    ix.add_argument("--target-recall", type=float_in(0.0, 1.0, lo_open=True), default=None, help="tuning target for recall@10 and @100 (default 0.95)")
    ix.add_argument("--retune", action="store_true", help="keep the built index; set --ef-search/--nprobe, or tune them again, and re-measure")
    ix.add_argument("--sample-users", type=int_in(1, 10_000_000), default=1000,
                    help="real users to tune and measure recall on (default 1000)")
    ix.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of the user sample and of the k-means training sample (default 0)")
    ix.add_argument("--out", type=out_path, help="index folder (default RUN/index)")
    ix.add_argument("--quiet", action="store_true", help="no progress bar")
    ix.add_argument("--from-parts", metavar="DIR", help="build from the Parquet parts of `twotower embed` (one part in memory at "
                    "a time; IVF kinds train on a sample of all parts) instead of embedding every item in memory")
    ix.add_argument("--train-size", type=int_in(1, 1 << 31), metavar="N", help="IVF kinds: items k-means trains on (default 64 per list, at least 10,000)")
    up = ix.add_argument_group("updating a built index without a rebuild (--update)")
    up.add_argument("--update", action="store_true", help="change the built index: --add, --replace, --remove, --add-new; "
                    "then recall against exact search is measured and stored as at build")
    up.add_argument("--add", metavar="FILE", help="items to add: a text file of raw item ids, one per line (vectors from the "
                    "item tower), or Parquet with columns item and vector (e.g. from `twotower embed`); the run must know the ids")
    up.add_argument("--replace", metavar="FILE", help="items whose vectors changed (same formats as --add)")
    up.add_argument("--remove", metavar="FILE", help="items to retire: a text file of raw item ids, or Parquet with a column item")
    up.add_argument("--add-new", action="store_true", help="add every item the run has beyond the index (admitted since it was built)")
    up.add_argument("--rebuild-share", type=float_in(0.0, 1.0), metavar="S", help="HNSW / IVF-PQ: rebuild when removed or replaced entries "
                    "pass this share of the index (default 0.2, kept in index.json)")
    ix.set_defaults(func=cmd_index)


def cmd_embed(args) -> int:
    from .index.parts import MANIFEST, embed_run_to_parts, parse_job
    from .run import Run
    from .run_dir import RunDir

    job, n_jobs = parse_job(args.job)
    run = Run(args.run)
    res = embed_run_to_parts(run, args.out, args.chunk_size, args.batch_size, job, n_jobs, args.device, args.overwrite,
                             progress=not args.quiet, log=lambda m: print(m, flush=True))
    if res["manifest"] is None:
        print(f"job {job}/{n_jobs} done; {len(res['missing'])} part(s) still to be written by the other jobs")
    else:
        m = res["manifest"]
        print(f"{m['n_items']:,} items x {m['dim']} dims in {m['n_parts']} part(s), {m['bytes'] / 2**20:,.1f} MiB: "
              f"{Path(args.out or RunDir(args.run).embeddings_dir) / MANIFEST}")
    return 0


def add_embed_parser(sub) -> None:
    em = sub.add_parser("embed", help="embed every item into Parquet parts (catalogs larger than memory)",
                        epilog=EPILOG_EMBED, formatter_class=argparse.RawDescriptionHelpFormatter)
    em.add_argument("run", help="run directory written by `twotower train`")
    em.add_argument("--out", type=out_path, metavar="DIR", help="parts folder (default RUN/embeddings)")
    em.add_argument("--chunk-size", type=int_in(1, 1 << 31), default=1_000_000, metavar="N",
                    help="items per part (default 1,000,000: 256 MB of float32 at 64 dims); one part is in memory at a time")
    em.add_argument("--batch-size", type=int_in(1, 1 << 24), default=16384, metavar="B", help="items per item-tower forward pass (default 16384)")
    em.add_argument("--job", default="0/1", metavar="I/N", help="this is job I of N (from 0): write parts p with p %% N == I "
                    "(default 0/1: all); the job that completes the set writes the manifest")
    em.add_argument("--device", help="torch device for the item tower, e.g. cuda or cuda:1 (default cpu)")
    em.add_argument("--overwrite", action="store_true", help="recompute this job's parts even when already written")
    em.add_argument("--quiet", action="store_true", help="no progress bar")
    em.set_defaults(func=cmd_embed)


def cmd_add_items(args) -> int:
    from .index.admit import admit, read_new_items
    from .run import Run

    seps = {}
    for item in args.sep or []:
        name, eq, sep = item.partition("=")
        if not eq or not name or not sep:
            raise TwotowerError(f"--sep {item!r}: expected FEATURE=SEPARATOR, e.g. --sep 'genre=|'")
        seps[name] = sep
    new = read_new_items(Run(args.run), args.items, args.id_col, args.title_col, seps)
    res = admit(args.run, items=new, log=lambda m: print(m, flush=True))
    for raw, bad in list(res.unknown_features.items())[:10]:
        print(f"  item {raw}: values the model does not know (ignored): "
              + "; ".join(f"{k} = {', '.join(map(str, v))}" for k, v in bad.items()))
    return 0


def add_add_items_parser(sub) -> None:
    a = sub.add_parser("add-items", help="admit new items to a trained run (and its index) without retraining",
                       description="Append new items to a trained run: the item vocabulary, every item feature's table,\n"
                                   "the weights (each new item's id row is the learned unknown vector: train with\n"
                                   "model.item_id_dropout > 0 for one that means something; zero otherwise), the item\n"
                                   "embeddings and RUN/index (FAISS add: no rebuild). Each new item's vector is what the\n"
                                   "item tower computes from its features. The run directory is rewritten at once (a new\n"
                                   "manifest); a `twotower serve` started afterwards serves the new items.",
                       epilog="examples:\n  twotower add-items runs/ml100k new_movies.parquet\n"
                              "  twotower add-items runs/ml100k new_movies.csv --sep 'genre=|' --title-col title\n\n"
                              "The file has the run's item id column (data.item_id_col, default \"item\") and one column per\n"
                              "item feature of the model, read as its declared kind (a multi-valued one: a list column, or\n"
                              "text split by --sep); an empty cell is a missing value. Ids the run already knows are refused.\n"
                              "Python: twotower.index.admit.admit(RUN, items=...).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("run", help="run directory written by `twotower train`")
    a.add_argument("items", help="table of the new items: CSV, TSV or Parquet")
    a.add_argument("--id-col", help="column holding the raw item id (default: the run's data.item_id_col)")
    a.add_argument("--title-col", help="column holding a display title (default: the run's data.item_title_col)")
    a.add_argument("--sep", action="append", metavar="FEATURE=SEP",
                   help="separator of a multi-valued feature's values in a text cell (repeatable; default: the "
                        "feature's declared separator, or the run's data.item_multi_valued)")
    a.set_defaults(func=cmd_add_items)
SERVE_FLAGS = ("host", "port", "max_batch", "header_timeout", "body_timeout", "keep_alive", "max_connections",
               "max_head_bytes", "shutdown_timeout")


def cmd_serve(args) -> int:
    from .serving.server import ServerSettings, listen
    from .serving.swap import SwapSettings, read_token

    settings = ServerSettings.checked(**{k: getattr(args, k) for k in SERVE_FLAGS})
    token = read_token(args.admin_token_file, args.admin_token_from_env)  # before the (long) load: fail fast
    swap = SwapSettings(run=args.run, token=token, watch=args.watch, interval=args.watch_interval,
                        category_feature=args.category_feature)
    sock = listen(settings.host, settings.port)  # before loading the run: a port in use is said at once
    try:
        from .serving.query import Recommender
        from .serving.service import serve

        rec = Recommender.load(args.run, args.index, category_feature=args.category_feature)
        i = rec.index
        saved = "" if i.info.get("saved", True) else " (no saved index: exact search; build one with `twotower index RUN`)"
        host, port = sock.getsockname()[:2]
        where = f"{'[' + host + ']' if ':' in host else host}:{port}"
        print(f"serving {args.run}: {i.size:,} items, index {i.kind}{saved}; page http://{where}/, "
              f"API http://{where}/docs", flush=True)
        if token is not None or args.watch:
            print("swaps: " + ", ".join(x for x in (
                f"POST http://{where}/admin/swap with the admin token" if token is not None else "",
                f"watching {args.run} every {args.watch_interval:g}s" if args.watch else "") if x), flush=True)
        serve(rec, settings, sock, log_level=args.log_level, swap=swap)
    finally:
        sock.close()
    return 0


def add_serve_parser(sub) -> None:
    from .serving.server import ServerSettings

    fields = ServerSettings.model_fields
    sv = sub.add_parser("serve", help="HTTP API (recommendations, similar items, look-ups, metadata) and a page to look at them",
                        description="Serve a trained run over HTTP: uvicorn with the httptools parser, one worker,\n"
                                    "micro-batching, and a deadline or a cap on everything a client controls (the head,\n"
                                    "the body, idle and open connections). Put a reverse proxy in front for TLS,\n"
                                    "authentication and rate limits (docs/reliability.md).",
                        epilog="examples:\n  twotower serve runs/ml100k                 # the page: http://127.0.0.1:8000/, the API: /docs\n"
                               "  twotower serve runs/ml100k --port 0        # any free port (printed)\n"
                               "  curl -s localhost:8000/recommend -d '{\"user\": 196, \"k\": 10}' -H 'content-type: application/json'\n\n"
                               "moving to a new model without dropping a request (off unless asked for):\n"
                               "  twotower serve runs/current --watch       # runs/current: a symlink; switch it atomically:\n"
                               "  ln -s v8 runs/next && mv -T runs/next runs/current\n"
                               "  twotower serve runs/v7 --admin-token-file /etc/twotower/token\n"
                               "  curl -s localhost:8000/admin/swap -H \"Authorization: Bearer $(cat /etc/twotower/token)\" \\\n"
                               "       -H 'content-type: application/json' -d '{\"run\": \"runs/v8\"}'\n"
                               "The new run and index are loaded and warmed beside the old ones, then swapped in at once;\n"
                               "requests being computed finish on the old model. A run that fails to load leaves the old\n"
                               "one serving (the reason is logged, returned by /admin/swap and shown in /metadata).",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sv.add_argument("run", help="run directory written by `twotower train` (with RUN/index if `twotower index` built one)")
    sv.add_argument("--index", help="index folder (default RUN/index if built, else exact search)")
    sv.add_argument("--category-feature", help="item feature that requests' \"category\" refers to when they do not say "
                    "(\"category_feature\"); default: the model's only categorical item feature")
    for name in SERVE_FLAGS:  # the bounds and their wording live in ServerSettings (checked in cmd_serve)
        f = fields[name]
        kind = {int: int, float: float}.get(f.annotation, str)
        sv.add_argument("--" + name.replace("_", "-"), type=kind, default=f.default, metavar=name.split("_")[-1].upper()
                        if kind is str else ("N" if kind is int else "S"), help=f"{f.description} (default {f.default})")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default info: start-up and errors; debug adds one line per request)")
    sw = sv.add_argument_group("model swaps")
    sw.add_argument("--watch", action="store_true", help="reload when RUN changes: a symlink switched to another run "
                    "directory, or a new manifest or index in it")
    sw.add_argument("--watch-interval", type=float, default=2.0, metavar="S", help="seconds between looks at RUN (default 2)")
    sw.add_argument("--admin-token-file", metavar="FILE", help="enable POST /admin/swap for requests that send "
                    "'Authorization: Bearer TOKEN', TOKEN the first line of FILE (at least 16 characters)")
    sw.add_argument("--admin-token-from-env", action="store_true", help="the same, with the token in $TWOTOWER_ADMIN_TOKEN")
    sv.set_defaults(func=cmd_serve)


EPILOG_EXPORT = """\
examples:
  twotower export runs/ml100k --format onnx --out exported/ml100k          # needs pip install 'twotower[export]'
  twotower export runs/ml100k --format torchscript --out exported/ml100k-ts --users

OUT holds export.json (each tower's named inputs with dtypes, shapes and meanings; the score
convention; the files' sha256), user_tower.onnx and item_tower.onnx (or .pt), items.parquet (item,
vector, bias, log_p, index_vector: one row per item), users.parquet with --users (user, vector), and
vocab/ (users.json, items.json: raw ids, position = index; features.json: each feature's values).
Each tower is run back and compared with the Python path before OUT is swapped in whole.

The served score is an inner product: put index_vector in any inner-product index and query it with
[f(u) / temperature, 1 / bias_scale, alpha / scale] (export.json, score.layout). README: "Serving
the towers elsewhere".
"""


def cmd_export(args) -> int:
    from .export import export_run

    desc = export_run(args.run, args.out, args.format, users=args.users, overwrite=args.overwrite,
                      log=lambda m: print(m, flush=True))
    print(f"exported {args.run} as {desc['runtime']} to {args.out} in {desc['seconds']:.1f}s")
    return 0


def add_export_parser(sub) -> None:
    ex = sub.add_parser("export", help="the towers as ONNX or TorchScript models, with item embeddings, vocabularies and "
                                       "the score convention, to serve without twotower",
                        epilog=EPILOG_EXPORT, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("run", help="run directory written by `twotower train`")
    ex.add_argument("--format", choices=["onnx", "torchscript"], required=True,
                    help="onnx: for ONNX Runtime, Triton, any ONNX runtime (needs the export extra); torchscript: for "
                         "libtorch, TorchServe, torch.jit.load")
    ex.add_argument("--out", required=True, type=out_path, metavar="DIR", help="folder to write: new, empty, or an earlier export with --overwrite")
    ex.add_argument("--users", action="store_true", help="also write users.parquet: f(u) of every known user")
    ex.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out (swapped in whole when done)")
    ex.set_defaults(func=cmd_export)


def cmd_mine(args) -> int:
    from .api import mine

    lo, hi = args.window
    mine(args.run, args.out, top_r=args.top_r, lo=lo, hi=hi, log=lambda m: print(m, flush=True))
    return 0


def add_mine_parser(sub) -> None:
    mn = sub.add_parser("mine", help="mine hard negatives with a trained run (for the next training)",
                        description="Each user's top R items by the run's model, the user's known items dropped,\n"
                                    "ranks [LO, HI) kept (the very top is skipped: unlabelled positives live there).\n"
                                    "The file has raw ids (user, item): train on it with negatives.hard = \"exposure\"\n"
                                    "and negatives.exposure_file = FILE. For mining rounds inside one training,\n"
                                    "see mining.rounds instead.",
                        epilog="example:\n  twotower mine runs/gowalla --out runs/gowalla/mined.parquet --top-r 200 --window 10 200\n"
                               "  twotower train configs/gowalla.toml --out runs/gowalla-hard --set negatives.hard='\"exposure\"' \\\n"
                               "      --set negatives.hard_k=8 --set negatives.exposure_file='\"/abs/path/mined.parquet\"'",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    mn.add_argument("run", help="a trained run directory")
    mn.add_argument("--out", required=True, type=out_path, help="output file: .parquet or .csv (columns user, item)")
    mn.add_argument("--top-r", type=int_in(1, 100_000), default=200, help="items retrieved per user (default 200)")
    mn.add_argument("--window", type=int_in(0, 100_000), nargs=2, default=[10, 200], metavar=("LO", "HI"),
                    help="keep ranks LO <= rank < HI among the non-positive items (default 10 200)")
    mn.set_defaults(func=cmd_mine)


def cmd_compare(args) -> int:
    from . import locks
    from .compare import finished_result, load_variants, run_comparison, write_report

    variants = load_variants(args.configs, args.set or [], args.grid or [])
    finished = [finished_result(p) for p in args.with_ or []]  # a bad folder is refused before any training
    out = Path(args.out)
    print(f"comparing {len(variants)} variants: " + "; ".join(v.name for v in variants))
    with locks.exclusive(out, "twotower compare"):  # the report too, not only the runs
        results = run_comparison(variants, out, _data_dir(args), quiet=args.quiet, resume=args.resume,
                                 only=args.only) + finished
        files = write_report(results, out, title=args.title or ", ".join(Path(c).stem for c in args.configs))
    print((out / "report.md").read_text(encoding="utf-8").split("\n\n")[2])
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="train variants side by side and write a report (table + plots)",
                       epilog="examples:\n  twotower compare configs/ml-100k.toml --grid 'model.temperature=[0.05, 0.1, 0.2]' "
                              "--grid 'train.logq=[true, false]' --out reports/ml100k\n"
                              "  twotower compare a.toml b.toml --out reports/ab\n\n"
                              "A config may also carry the grid itself as a [grid] table: \"model.temperature\" = [0.05, 0.1],\n"
                              "or named recipes as [variants.NAME] tables of overrides: [variants.mixed] \"negatives.sampled\" = 1024.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("configs", nargs="+", help="one or more configs (each crossed with its grid)")
    c.add_argument("--out", required=True, type=out_path, help="report directory: report.md, results.json, PNG plots, runs/")
    c.add_argument("--grid", action="append", metavar="SECTION.KEY=[V1, V2]", help="values to cross (repeatable)")
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override applied to every variant")
    c.add_argument("--with", dest="with_", action="append", metavar="DIR",
                   help="a finished run or baseline folder (`twotower baseline`) to report beside the variants, "
                        "read from its metrics.json (repeatable)")
    c.add_argument("--title", help="heading of report.md and the plots (default: the configs' file names)")
    c.add_argument("--data-dir", help="data directory (default: $TWOTOWER_DATA or ~/.local/share/twotower)")
    c.add_argument("--quiet", action="store_true", help="one line per variant")
    c.add_argument("--resume", action="store_true",
                   help="reuse variants already finished in OUT/runs with the same config (after an interruption, or "
                        "after adding variants); unfinished ones are trained again")
    c.add_argument("--only", action="append", metavar="PATTERN",
                   help="train only the variants whose names match this shell pattern (repeatable); the others are "
                        "read back where they finished before in OUT/runs and left out of the report otherwise")
    c.set_defaults(func=cmd_compare)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(data_dir=_data_dir(args), out=Path(args.out) if args.out else None, quiet=args.quiet,
                    offline=args.offline, synthetic=args.synthetic, epochs=args.epochs)


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="train and evaluate end to end on MovieLens 100K (or synthetic data offline)",
                       description="Train a model with pooled history and genres on MovieLens 100K (downloaded from "
                                   "GroupLens into the data directory when missing, MD5 verified; the generated "
                                   "synthetic dataset when offline), print validation and test metrics and three users' "
                                   "recommendations.")
    d.add_argument("--data-dir", help="where ml-100k/ is, or is downloaded to (default: $TWOTOWER_DATA or "
                                      "~/.local/share/twotower)")
    d.add_argument("--out", type=out_path, help="run directory (default: a temporary folder)")
    d.add_argument("--offline", action="store_true", help="do not try to download MovieLens 100K")
    d.add_argument("--synthetic", action="store_true", help="use the generated synthetic dataset")
    d.add_argument("--epochs", type=int_in(1, 100_000), help="cap the number of epochs (default: the demo config's 30, early-stopped)")
    d.add_argument("--quiet", action="store_true", help="no progress bars (one line per epoch)")
    d.set_defaults(func=cmd_demo)


def cmd_config(args) -> int:
    from .config import RunConfig, reference_markdown

    if args.reference:
        if args.config or args.set:
            raise TwotowerError("--reference prints every setting of every config; give it alone, without a config or --set")
        print(reference_markdown(), end="")
        return 0
    if not args.config:
        raise TwotowerError("say what to print: a config file (resolved and checked), or --reference for every setting")
    print(RunConfig.load(args.config, list(args.set or [])).to_json())
    return 0


def add_config_parser(sub) -> None:
    c = sub.add_parser("config", help="check a config and print it resolved, or print the reference of every setting",
                       description="With CONFIG: load it, apply --set, validate every value and print the resolved\n"
                                   "config as JSON (what `twotower train` would write to RUN/config.json).\n"
                                   "With --reference: every section and key with its type, default, bounds and\n"
                                   "meaning, as Markdown (docs/config.md is this output).",
                       epilog="examples:\n  twotower config configs/gowalla.toml --set train.epochs=5\n"
                              "  twotower config --reference > docs/config.md",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("config", nargs="?", help="TOML, YAML or JSON config to check and print resolved")
    c.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    c.add_argument("--reference", action="store_true", help="print the reference of every setting (Markdown) instead")
    c.set_defaults(func=cmd_config)


EPILOG_TUNE = """\
examples:
  twotower tune configs/ml-100k.toml --budget 2m --out tunes/ml100k
  twotower baseline configs/gowalla.toml --method als --out baselines/gowalla-als
  twotower tune configs/gowalla.toml --budget 20m --out tunes/gowalla \\
      --enqueue configs/gowalla-best.toml --enqueue configs/gowalla.toml --baseline baselines/gowalla-als

The config is the base of every trial; its [tune] section says what is searched (every key:
docs/config.md): a list of choices, a [low, high] range, or [] to keep the base config's value.
Selection is on validation only. The budget is wall clock for the whole command: trials, then
the best trial finished in OUT/best (train.refit, if set, retrains it on training + validation) and
test scored once; a trial that would overrun it is cut after its last whole epoch. OUT/report.md
has the trials table, validation against time, the importance of each setting and the baselines
(--baseline) beside the best trial. docs/tuning.md says what a budget buys.
"""


def cmd_tune(args) -> int:
    from .config import RunConfig
    from .tune import parse_budget, tune

    budget = parse_budget(args.budget)
    cfg = RunConfig.load(args.config, list(args.set or []))
    res = tune(cfg, Path(args.out), budget, _data_dir(args), baselines=args.baseline or [], enqueue=args.enqueue or [],
               jobs=args.jobs, max_trials=args.trials, quiet=args.quiet)
    mon = cfg.train.monitor
    if res.best is None:
        print(f"no trial finished an epoch within {budget:.0f}s; see {res.out / 'report.md'}")
        return 1
    rows = [("tuned (trial %d)" % res.best.number, res.valid, res.test or {})] + \
        [(b["name"], b["valid"], b["test"]) for b in res.baselines]
    k = mon.split("@")[1]
    print(f"{'model':<24}{'valid ' + mon:>18}{'test recall@' + k:>18}{'test ndcg@' + k:>16}")
    for name, valid, test in rows:
        print(f"{name:<24}{valid.get(mon, float('nan')):>18.4f}{test.get('recall@' + k, float('nan')):>18.4f}"
              f"{test.get('ndcg@' + k, float('nan')):>16.4f}")
    print(f"{len(res.trials)} trials in {res.seconds:.0f}s (budget {budget:.0f}s); best run in {res.out / 'best'}; "
          f"report {res.out / 'report.md'}")
    return 0


def add_tune_parser(sub) -> None:
    t = sub.add_parser("tune", help="search settings on validation within a wall-clock budget, refit the best, report",
                       epilog=EPILOG_TUNE, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("config", help="base config; its [tune] section is the search space")
    t.add_argument("--budget", required=True, help="wall clock for the whole command: 20m, 90s, 1h30m or seconds")
    t.add_argument("--out", required=True, help="folder to write: best/ (a run directory), report.md, tune.json, plots")
    t.add_argument("--enqueue", action="append", metavar="CONFIG",
                   help="try this config's values of the searched settings first (repeatable; e.g. a reference "
                        "config chosen on validation)")
    t.add_argument("--baseline", action="append", metavar="DIR",
                   help="a folder written by `twotower baseline` (or any finished run) to report beside the best "
                        "trial (repeatable)")
    t.add_argument("--trials", type=int, default=0, help="stop after this many trials (default 0: until the budget)")
    t.add_argument("--jobs", type=int, default=1,
                   help="trials at once, in threads, each with its share of the cores (default 1)")
    t.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    t.add_argument("--data-dir", help="data directory (default: $TWOTOWER_DATA or ~/.local/share/twotower)")
    t.add_argument("--quiet", action="store_true", help="one line per trial")
    t.set_defaults(func=cmd_tune)


def cmd_baseline(args) -> int:
    from .config import RunConfig
    from .data.sources import load_dataset
    from .training.baselines import run_baseline, write_baseline

    cfg = RunConfig.load(args.config, list(args.set or []))
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise TwotowerError(f"{out}: already exists and is not empty; choose another --out")
    ds = load_dataset(cfg.data, _data_dir(args))
    res = run_baseline(cfg, args.method, ds, log=(lambda m: None) if args.quiet else None)
    write_baseline(out, cfg, res)
    table = {"valid": res.valid}
    if res.test is not None:
        table["test"] = res.test
    print(format_metrics(table, [k for k in cfg.eval.ks if k <= 100]))
    print(f"{args.method}: settings {res.settings or '-'} (chosen on validation); final fit {res.fit_seconds:.1f}s; "
          f"written to {out}")
    return 0


def add_baseline_parser(sub) -> None:
    b = sub.add_parser("baseline", help="popularity, ALS or EASE on the same split and metrics as the towers",
                       description="Fit a baseline on the config's [data] split and score it with the towers' evaluator: "
                                   "popularity; ALS (implicit-feedback matrix factorisation, the `implicit` package: "
                                   "pip install -e \".[als]\"); EASE (Steck 2019, closed form; catalogs up to "
                                   "tune.ease_max_items items). Settings ([tune] als_* and ease_lambda) are chosen on "
                                   "validation by a coordinate search, then fitted on training + validation, and test "
                                   "is scored once. The folder holds metrics.json like a run's: `twotower compare "
                                   "--with DIR` and `twotower tune --baseline DIR` put it beside the towers.",
                       epilog="examples:\n  twotower baseline configs/ml-100k.toml --method ease --out baselines/ml100k-ease\n"
                              "  twotower baseline configs/gowalla.toml --method als --out baselines/gowalla-als "
                              "--set 'tune.als_factors=[256]'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("config", help="config whose [data] (the split), [eval] and [tune] (the settings tried) are used")
    b.add_argument("--method", required=True, choices=["popularity", "als", "ease"], help="which baseline")
    b.add_argument("--out", required=True, help="folder to write (config.json, baseline.json, metrics.json)")
    b.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    b.add_argument("--data-dir", help="data directory (default: $TWOTOWER_DATA or ~/.local/share/twotower)")
    b.add_argument("--quiet", action="store_true", help="no line per setting tried")
    b.set_defaults(func=cmd_baseline)


# One function per command, in the order `twotower --help` lists them.
def cmd_info(args) -> int:
    from . import __version__, native

    native.env_off()  # a TWOTOWER_NATIVE that is neither 0 nor 1: one message, exit code 2
    rep = native.report()
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    import platform

    import torch

    sw = rep["switch"]
    why = ("on" if sw["on"] else "OFF") + f" ({native.ENV}={sw['env'] if sw['env'] is not None else 'unset'}, " \
        f"train.native = {'true' if sw['config'] else 'false'} in this process)"
    print(f"twotower {__version__}, PyTorch {torch.__version__}, Python {platform.python_version()}")
    print(f"compiled kernels, switch {why}:")
    print(f"  {'kernel':<9}{'built':<7}{'MKL entry points':<18}{'runs':<10}why")
    for name, k in rep["kernels"].items():
        blas = "-" if k["blas_found"] is None else ("found" if k["blas_found"] else "NOT FOUND")
        print(f"  {name:<9}{'yes' if k['built'] else 'no':<7}{blas:<18}{k['path']:<10}{k['why']}")
    cpu, th = rep["cpu"], rep["threads"]
    print(f"CPU: AVX2 {'yes' if cpu['avx2'] else 'no'}, FMA {'yes' if cpu['fma'] else 'no'}; "
          f"MKL looked up in {rep['blas']['library']}")
    print(f"threads: {native.summary(rep).rsplit('; ', 1)[-1]} (interop {th['interop']}"
          + (f", OMP_NUM_THREADS={th['OMP_NUM_THREADS']}" if th["OMP_NUM_THREADS"] else "") + ")")
    return 0


def add_info_parser(sub) -> None:
    i = sub.add_parser("info", help="which compiled kernels run, and why (build, MKL, switch, CPU, threads)",
                       description="Say, for each compiled kernel (the fused softmax, full-catalog top-k, DeferredAdam's "
                                   "row passes), whether it was built, whether the MKL entry points it calls were found in "
                                   "PyTorch's library, whether the switch is on, and so whether the compiled path or the "
                                   "PyTorch path runs. TWOTOWER_NATIVE=0 turns every compiled path off; so does "
                                   "train.native = false for a training.",
                       epilog="examples:\n  twotower info\n  TWOTOWER_NATIVE=0 twotower info --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    i.add_argument("--json", action="store_true", help="print the report as JSON (the same as the `native` entry of a run's metrics.json)")
    i.set_defaults(func=cmd_info)


def cmd_update(args) -> int:
    from .config import UpdateConfig, apply_overrides
    from .run import Run
    from .update import update

    if args.set:
        bad = [x for x in args.set if not x.strip().startswith("update.")]
        if bad:
            raise TwotowerError(f"--set {bad[0]!r}: update takes only update.* settings (the run's other settings are its own)")
        d = apply_overrides({"update": Run(args.run).config.update.model_dump()}, args.set)
        cfg = UpdateConfig.from_values(d["update"], source="--set", section="update")
    else:
        cfg = None
    update(args.run, args.interactions, args.out, items=args.items, users=args.users, cfg=cfg, user_col=args.user_col,
           item_col=args.item_col, time_col=args.time_col, build_index=False if args.no_index else None,
           quiet=not args.progress, log=lambda m: print(m, flush=True))
    return 0


def add_update_parser(sub) -> None:
    u = sub.add_parser("update", help="continue a trained run on new interactions (new users and items admitted)",
                       description="Make a new run OUT from RUN and new interactions, without retraining from scratch:\n"
                                   "users and items RUN does not know are admitted (as `add-items` admits them), training\n"
                                   "continues from RUN's weights and optimizer state on the new interactions plus a replay\n"
                                   "sample of the ones RUN knows (so the model does not forget), the item counts continue\n"
                                   "(optionally decayed), and OUT is written whole (manifest, checkpoint for the next\n"
                                   "update, lineage.json naming RUN, the index rebuilt when RUN has one), then renamed\n"
                                   "into place. RUN is not changed. With update.retire_after = N, the users and items no\n"
                                   "update touched in N updates in a row are retired (out of the index and the\n"
                                   "recommendations; answered from their features or history, else refused).",
                       epilog="examples:\n  twotower update runs/ml100k --interactions new.csv --out runs/ml100k-2\n"
                              "  twotower update runs/ml100k --interactions new.csv --items new_movies.csv --out runs/ml100k-2 \\\n"
                              "      --set update.epochs=2 --set update.replay=1.5 --set update.lr=0.002\n"
                              "  twotower update runs/ml100k-2 --interactions week3.csv --out runs/ml100k-3 --set update.retire_after=4\n"
                              "  # replay the active users' own histories rather than a uniform sample (choose it on\n"
                              "  # validation: it won on MovieLens 100K, lost on Amazon Grocery; docs/freshness.md)\n"
                              "  twotower update runs/ml100k --interactions new.csv --out runs/ml100k-2 --set update.replay_focus=1\n\n"
                              "The settings are the [update] section of the run's config (docs/config.md); --set changes\n"
                              "them for this update. The interactions file has the run's user and item columns\n"
                              "(data.user_col, data.item_col; --user-col, --item-col) and, with data.time_col or\n"
                              "--time-col, timestamps. Python: twotower.update.update(RUN, NEW, OUT, cfg=UpdateConfig(...)).",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("run", help="run directory written by `twotower train` (or by an earlier update)")
    u.add_argument("--interactions", required=True, help="the new interactions: CSV, TSV or Parquet")
    u.add_argument("--out", required=True, help="the new run directory (must not exist)")
    u.add_argument("--items", help="table of new items' features (as `add-items` reads it)")
    u.add_argument("--users", help="table of new users' features (the run's data.user_id_col and user feature columns)")
    u.add_argument("--user-col", help="interactions column of the raw user id (default: the run's data.user_col)")
    u.add_argument("--item-col", help="interactions column of the raw item id (default: the run's data.item_col)")
    u.add_argument("--time-col", help="interactions column of a numeric timestamp (default: the run's data.time_col)")
    u.add_argument("--set", action="append", metavar="update.KEY=VALUE", help="override an [update] setting (repeatable)")
    u.add_argument("--no-index", action="store_true", help="do not build an index for OUT even when RUN has one")
    u.add_argument("--progress", action="store_true", help="show the training progress bar")
    u.set_defaults(func=cmd_update)


COMMANDS = (add_train_parser, add_evaluate_parser, add_recommend_parser, add_index_parser, add_embed_parser,
            add_add_items_parser, add_update_parser, add_serve_parser, add_export_parser, add_mine_parser,
            add_compare_parser, add_tune_parser, add_baseline_parser, add_demo_parser, add_config_parser,
            add_info_parser)


class _Parser(argparse.ArgumentParser):
    """A usage mistake is one line, as every other refusal: what was wrong, and where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="twotower", description="Train, evaluate and use two-tower retrieval models.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Start with `twotower demo`; then `twotower train --help`.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TwotowerError as e:
        return _refuse(args, e)
    except MemoryError:
        return _refuse(args, TwotowerError("ran out of memory. Lower what the run holds at once (model.dim, "
                                           "eval.batch_users, train.batch_size, --batch-size) or use a larger machine"))
    except OSError as e:  # the file system said no where no writer expected it: the same one line
        err = storage_error(e, doing="read or write")
        if err is None:
            raise
        return _refuse(args, err)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _refuse(args, e: Exception) -> int:
    print(f"twotower {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
