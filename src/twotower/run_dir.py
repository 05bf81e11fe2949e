"""The run directory's format: every file of a run is named, written and read here, and nowhere else.

    RUN/
      config.json            the resolved config (``RunConfig``)
      dataset.json           the data's summary (counts, feature cardinalities)
      users.json, items.json vocabularies: raw id <-> index
      known.safetensors      each user's known items (training + validation, in time order), the
                             training positives per item (behind p(j)), the test split's users
      features.json          the towers' fitted feature state (``FeatureState.meta``: vocabularies)
      features.safetensors   its per-entity tables (``FeatureState.arrays``)
      titles.json            item titles, when the data has them
      heldout.safetensors    each user's validation and test items (the marks of the serve page;
                             nothing trains or evaluates from it)
      model.safetensors      the final weights: best on validation, or the refit's
      metrics.jsonl          one line per epoch
      metrics.json           final validation and test figures
      item_embeddings.npy    g(j) of every item at the final weights
      lineage.json           a run made by ``twotower update``: its parent run (path, weights'
                             digest), its generation, what the update added
      activity.safetensors   a run made by ``twotower update``: per user and per item the generation
                             whose new interactions last touched it, and which are retired
                             (``update.retire_after``); absent: generation 0 for all, none retired
      manifest.json          the sha256 of every file above; written last (the run is complete)
      checkpoint/            working state for --resume: last.safetensors, best.safetensors,
                             optimizer.pt, negatives.safetensors, state.json (written last); each
                             checkpoint is written whole into checkpoint.new and swapped in
      refit/                 the refit's own run directory (its checkpoints)
      baseline.json          a baseline's folder (`twotower baseline`) instead of the towers' files:
                             method, settings chosen on validation, the search; with config.json,
                             metrics.json and manifest.json
      index/                 the item index (``twotower index``; its files are ``index``'s)
      embeddings/            item embeddings as Parquet parts (``twotower embed``)
      .staged/               a new version of some of the files above, written whole before any
                             replaces the run's (``staging`` / ``commit_staged``: admitting items)

``RunDir`` is the one owner: the trainer and ``api.train`` write through it, ``Run`` and every command
read through it. ``artifacts`` is the atomic writer and reader it uses (it knows no names).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import artifacts, locks
from .config import RunConfig
from .data.dataset import CSR, Dataset
from .data.vocab import Vocabulary
from .errors import ArtifactError
from .features.encoders import FeatureState

CONFIG = "config.json"
DATASET = "dataset.json"
USERS = "users.json"
ITEMS = "items.json"
KNOWN = "known.safetensors"
FEATURES = "features.json"
FEATURE_ARRAYS = "features.safetensors"
TITLES = "titles.json"
HELDOUT = "heldout.safetensors"
WEIGHTS = "model.safetensors"
EPOCHS = "metrics.jsonl"
BASELINE = "baseline.json"
METRICS = "metrics.json"
ITEM_EMBEDDINGS = "item_embeddings.npy"
LINEAGE = "lineage.json"
ACTIVITY = "activity.safetensors"
MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint"
REFIT = "refit"
INDEX = "index"
EMBEDDINGS = "embeddings"
STAGED = ".staged"
# inside .staged/: written once every staged file is complete; from then on the swap is finished
# by whoever opens the run next (``settle``)
_COMMIT = "COMMIT"
# inside checkpoint/
_LAST, _BEST, _OPTIMIZER, _NEGATIVES, _STATE = "last.safetensors", "best.safetensors", "optimizer.pt", \
    "negatives.safetensors", "state.json"


@dataclass
class Known:
    """What a run knows of its users and items: each user's known items (training + validation, in
    time order; what serving excludes and feeds the user tower), training positives per item, and
    the users of the test split."""

    history: CSR
    item_counts: np.ndarray
    test_users: np.ndarray


@dataclass
class Checkpoint:
    """A checkpoint read back: the last weights, the best ones so far (``None`` before the first
    validation), the optimizer's state, the trainer's state and the negative sources' state."""

    last: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None
    optimizer: Any
    state: dict
    negatives: dict[str, torch.Tensor] | None


@dataclass
class Activity:
    """Per user and per item: the generation whose new interactions last touched it (0: the
    training data, ``k``: the ``k``-th update) and whether it is retired. An entity admitted since
    (``add-items``) counts as touched at the run's generation and is not retired."""

    users_seen: np.ndarray     # int64 [n_users]
    items_seen: np.ndarray     # int64 [n_items]
    users_retired: np.ndarray  # bool [n_users]
    items_retired: np.ndarray  # bool [n_items]

    @classmethod
    def fresh(cls, n_users: int, n_items: int) -> "Activity":
        """A run trained from scratch: everything seen at generation 0, nothing retired."""
        return cls(np.zeros(n_users, np.int64), np.zeros(n_items, np.int64), np.zeros(n_users, bool), np.zeros(n_items, bool))

    def grown(self, n_users: int, n_items: int, generation: int) -> "Activity":
        """Padded to the vocabularies' sizes (entities admitted since, seen at ``generation``)."""
        def pad(a: np.ndarray, n: int, fill) -> np.ndarray:
            return a.copy() if len(a) >= n else np.r_[a, np.full(n - len(a), fill, dtype=a.dtype)]
        return Activity(pad(self.users_seen, n_users, generation), pad(self.items_seen, n_items, generation),
                        pad(self.users_retired, n_users, False), pad(self.items_retired, n_items, False))


class RunDir:
    """A run directory (module docstring): where each part of a run is, and how it is written and read."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ---- places ----------------------------------------------------------------------------------
    @property
    def refit(self) -> "RunDir":
        """The refit's own run directory (its checkpoints live there)."""
        return RunDir(self.path / REFIT)

    @property
    def index_dir(self) -> Path:
        """Where ``twotower index`` puts the item index by default."""
        return self.path / INDEX

    @property
    def embeddings_dir(self) -> Path:
        """Where ``twotower embed`` writes the embedding parts by default."""
        return self.path / EMBEDDINGS

    # ---- one writer at a time ------------------------------------------------------------------------
    def lock(self, command: str, log=None):
        """Hold the run directory's lock while writing it (``locks.exclusive``: ``RUN/.twotower.lock``
        with the owner's pid and host; a second writer is refused, naming the holder). Once it is
        held, ``remove_stale_temporaries`` may clear what killed writers left."""
        return locks.exclusive(self.path, command, log=log)

    def remove_stale_temporaries(self) -> None:
        """Call holding the lock: the temporaries of writers killed mid-write (``atomic_path``)."""
        for d in (self.path, self.path / REFIT):
            artifacts.remove_stale_temporaries(d)

    def is_empty(self) -> bool:
        """Nothing here but, perhaps, the lock: a fresh ``--out``."""
        return not self.path.exists() or not any(p.name != locks.FOLDER_LOCK for p in self.path.iterdir())

    # ---- training: the start -----------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Training has begun here (a checkpoint or an epoch line exists)."""
        return (self.path / CHECKPOINT).exists() or (self.path / EPOCHS).exists()

    def clear_progress(self) -> None:
        """Remove what a run that died before its first checkpoint left: a half-written first
        checkpoint, an epoch line."""
        for stale in (CHECKPOINT, CHECKPOINT + ".new", CHECKPOINT + ".old"):
            shutil.rmtree(self.path / stale, ignore_errors=True)
        (self.path / EPOCHS).unlink(missing_ok=True)

    def check_config(self, cfg: RunConfig) -> None:
        """Refuse to continue a run started with another config."""
        p = self.path / CONFIG
        if p.is_file() and artifacts.read_json(p) != cfg.to_dict():
            raise ArtifactError(f"{self.path}: the run was started with a different config; resume it with the same config "
                                f"(see {p}) or start a new run")

    def write_metadata(self, cfg: RunConfig, ds: Dataset, features: FeatureState) -> None:
        """Config, vocabularies, known items per user, item counts and the fitted feature state:
        what serving and evaluation need besides the weights."""
        self.write_description(cfg, ds.users, ds.items, ds.history("valid"), ds.item_counts(),
                               np.unique(ds.test.users), features, ds.summary(), ds.item_titles)
        self.write_heldout(ds.valid.csr(ds.n_users), ds.test.csr(ds.n_users))

    def write_heldout(self, valid: CSR, test: CSR) -> None:
        """Each user's validation and test items (per-user CSRs over the user vocabulary, in time
        order when the data has timestamps): what a user went on to interact with after the
        training data, shown as marks by the page of ``twotower serve``."""
        tensors = {}
        for name, csr in (("valid", valid), ("test", test)):
            tensors[f"{name}_indptr"] = torch.from_numpy(np.asarray(csr.indptr, dtype=np.int64))
            tensors[f"{name}_indices"] = torch.from_numpy(np.asarray(csr.indices, dtype=np.int64))
        artifacts.save_tensors(self.path / HELDOUT, tensors)

    def write_description(self, cfg: RunConfig, users: Vocabulary, items: Vocabulary, known: CSR, item_counts: np.ndarray,
                          test_users: np.ndarray, features: FeatureState, summary: dict | None = None,
                          titles: np.ndarray | None = None) -> None:
        """``write_metadata`` from its parts (a run assembled without a ``Dataset``)."""
        d = self.path
        d.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(d / CONFIG, cfg.to_json() + "\n")
        if summary is not None:
            artifacts.write_json(d / DATASET, summary)
        artifacts.write_text(d / USERS, users.to_json())
        artifacts.write_text(d / ITEMS, items.to_json())
        artifacts.save_tensors(d / KNOWN, {
            "indptr": torch.from_numpy(np.asarray(known.indptr, dtype=np.int64)),
            "indices": torch.from_numpy(np.asarray(known.indices, dtype=np.int64)),
            "item_counts": torch.from_numpy(np.asarray(item_counts).astype(np.int64)),
            "test_users": torch.from_numpy(np.asarray(test_users).astype(np.int64)),
        })
        artifacts.write_json(d / FEATURES, features.meta)
        artifacts.save_tensors(d / FEATURE_ARRAYS, features.arrays)
        if titles is not None:
            artifacts.write_json(d / TITLES, [None if t is None else str(t) for t in titles])

    # ---- training: epochs, weights, checkpoints ----------------------------------------------------
    def save_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """The final (best so far) weights, ``model.safetensors``."""
        artifacts.save_tensors(self.path / WEIGHTS, weights)

    def append_epoch(self, record: dict) -> None:
        artifacts.append_jsonl(self.path / EPOCHS, record)

    def write_epochs(self, records: list[dict]) -> None:
        """Replace the epoch lines (on resume the checkpoint's history is the record)."""
        artifacts.write_text(self.path / EPOCHS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))

    def read_epochs(self) -> list[dict]:
        """The per-epoch records, oldest first; ``[]`` when there are none yet."""
        p = self.path / EPOCHS
        if not p.is_file():
            return []
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{p}: corrupted (not UTF-8 at byte {e.start}). Re-run training") from None
        records = [artifacts.parse_json(line, p) for line in lines if line.strip()]
        if not all(isinstance(r, dict) for r in records):
            raise ArtifactError(f"{p}: corrupted (a line is not an epoch record). Re-run training")
        return records

    def checkpoint_dir(self) -> Path | None:
        """The complete checkpoint (also one a crash left mid-swap), or ``None``."""
        return artifacts.committed_dir(self.path / CHECKPOINT, _STATE)

    def settle_checkpoint(self) -> None:
        """Finish a checkpoint swap a crash cut short (one complete copy, in place)."""
        artifacts.settle_dir(self.path / CHECKPOINT, _STATE)

    def save_checkpoint(self, last: dict[str, torch.Tensor], best: dict[str, torch.Tensor] | None, optimizer: Any,
                        state: dict, negatives: dict[str, torch.Tensor] | None = None) -> None:
        """Write a checkpoint whole and swap it in. Its files must change together: weights of
        epoch E with the state of epoch E - 1 would replay epoch E from the wrong start; so it is
        written into ``checkpoint.new``, ``state.json`` last, and swapped in."""
        final = self.path / CHECKPOINT
        ck = artifacts.staging_dir(final, _STATE)
        artifacts.save_tensors(ck / _LAST, last)
        if best is not None:  # not model.safetensors: a refit replaces that with its own weights
            artifacts.save_tensors(ck / _BEST, best)
        artifacts.save_torch_state(ck / _OPTIMIZER, optimizer)
        if negatives:  # memory bank, streaming frequencies, ratio counts, mined lists: resume replays exactly
            artifacts.save_tensors(ck / _NEGATIVES, negatives)
        state = dict(state)
        if isinstance(state.get("best_value"), float) and not math.isfinite(state["best_value"]):
            state["best_value"] = None
        artifacts.write_json(ck / _STATE, state)
        artifacts.replace_dir(ck, final)

    def load_checkpoint(self) -> Checkpoint:
        """The checkpoint to resume from (an error saying what to do when there is none)."""
        ck = self.checkpoint_dir()
        if ck is None:
            raise ArtifactError(f"{self.path}: no checkpoint to resume from. Start the run without --resume")
        state = artifacts.read_json(ck / _STATE)
        if not isinstance(state, dict):
            raise ArtifactError(f"{ck / _STATE}: corrupted (not a trainer state). Start the run again without --resume")
        state["best_value"] = -math.inf if state.get("best_value") is None else state["best_value"]
        best_path = ck / _BEST if (ck / _BEST).exists() else self.path / WEIGHTS
        return Checkpoint(
            last=artifacts.load_tensors(ck / _LAST),
            best=artifacts.load_tensors(best_path) if best_path.exists() else None,
            optimizer=artifacts.load_torch_state(ck / _OPTIMIZER),  # moved to param devices by the optimizer
            state=state,
            negatives=artifacts.load_tensors(ck / _NEGATIVES) if (ck / _NEGATIVES).exists() else None)

    # ---- replacing part of a finished run at once (admitting items) -----------------------------------
    def staging(self) -> "RunDir":
        """An empty ``RUN/.staged`` to write the next version of some of the run's files (and of
        its ``index/``) into, with this class's own writers; ``commit_staged`` then puts them in
        place. An uncommitted staging left by a crash is cleared first, a committed one finished."""
        self.settle()
        d = self.path / STAGED
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return RunDir(d)

    def commit_staged(self) -> None:
        """Replace the run's files (and folders) by the staged ones, then write the manifest. The
        marker written first makes the swap a commitment: a crash part-way is finished by
        ``settle`` (which ``verify`` calls), so a reader finds the old run or the new one, whole."""
        staged = self.path / STAGED
        names = sorted(p.name for p in staged.iterdir())
        artifacts.write_json(staged / _COMMIT, {"replace": names})
        self._roll_forward()

    def settle(self) -> None:
        """Finish a committed replacement that a crash (or a concurrent reader) cut short; leave an
        uncommitted staging alone (its writer may still be at work; the next ``staging`` clears it)."""
        if (self.path / STAGED / _COMMIT).is_file():
            self._roll_forward()

    def _roll_forward(self) -> None:
        staged = self.path / STAGED
        try:
            names = artifacts.read_json(staged / _COMMIT)["replace"]
        except ArtifactError:  # another process finished it meanwhile
            return
        for name in names:
            src, dst = staged / name, self.path / name
            try:
                if src.is_dir():
                    artifacts.replace_dir(src, dst)
                elif src.exists():
                    os.replace(src, dst)
            except FileNotFoundError:  # moved by another process finishing the same swap
                pass
            if not src.exists():  # a folder swap cut between its two renames leaves the old copy beside it
                shutil.rmtree(dst.with_name(dst.name + ".old"), ignore_errors=True)
        self.write_manifest()
        shutil.rmtree(staged, ignore_errors=True)

    def save_item_embeddings(self, vectors: np.ndarray) -> None:
        """``g(j)`` of every item, ``item_embeddings.npy``."""
        artifacts.save_numpy(self.path / ITEM_EMBEDDINGS, vectors)

    def read_item_embeddings(self) -> np.ndarray | None:
        """``item_embeddings.npy``, or ``None`` when the run has none."""
        p = self.path / ITEM_EMBEDDINGS
        return artifacts.load_numpy(p, "re-run training") if p.is_file() else None

    def write_lineage(self, lineage: dict) -> None:
        """``lineage.json``: the run this one was updated from (``twotower update``)."""
        artifacts.write_json(self.path / LINEAGE, lineage)

    def read_lineage(self) -> dict | None:
        """``lineage.json``, or ``None`` for a run trained from scratch."""
        p = self.path / LINEAGE
        return artifacts.read_json(p) if p.is_file() else None

    def write_activity(self, activity: Activity) -> None:
        """``activity.safetensors`` (``Activity``)."""
        artifacts.save_tensors(self.path / ACTIVITY, {
            "users_seen": torch.from_numpy(np.ascontiguousarray(activity.users_seen, dtype=np.int64)),
            "items_seen": torch.from_numpy(np.ascontiguousarray(activity.items_seen, dtype=np.int64)),
            "users_retired": torch.from_numpy(np.ascontiguousarray(activity.users_retired, dtype=np.uint8)),
            "items_retired": torch.from_numpy(np.ascontiguousarray(activity.items_retired, dtype=np.uint8)),
        })

    def read_activity(self, n_users: int, n_items: int) -> Activity:
        """The run's ``Activity`` over ``n_users`` / ``n_items`` (the vocabularies' sizes): the
        stored one grown to them, or ``Activity.fresh`` for a run without the file."""
        p = self.path / ACTIVITY
        if not p.is_file():
            return Activity.fresh(n_users, n_items)
        t = artifacts.load_tensors(p)
        act = Activity(t["users_seen"].numpy().astype(np.int64), t["items_seen"].numpy().astype(np.int64),
                       t["users_retired"].numpy().astype(bool), t["items_retired"].numpy().astype(bool))
        generation = int((self.read_lineage() or {}).get("generation", 0))
        return act.grown(n_users, n_items, generation)

    def read_summary(self) -> dict | None:
        """``dataset.json`` (the training data's summary), or ``None``."""
        p = self.path / DATASET
        return artifacts.read_json(p) if p.is_file() else None

    # ---- the end of training -------------------------------------------------------------------------
    def finish(self, metrics: dict, item_vectors: np.ndarray | None = None, weights: dict[str, torch.Tensor] | None = None) -> None:
        """The final artifacts, then the manifest that marks the run complete: the items' vectors,
        the final weights when they are not the ones already saved (a refit's), the metrics."""
        if item_vectors is not None:
            self.save_item_embeddings(item_vectors)
        if weights is not None:
            self.save_weights(weights)
        artifacts.write_json(self.path / METRICS, metrics)
        self.write_manifest()

    def write_baseline(self, cfg: RunConfig, result: dict) -> None:
        """A baseline's folder (``training.baselines``): the config, ``baseline.json`` (method,
        settings, the search), ``metrics.json`` (``valid``, ``test``, times) and the manifest."""
        self.path.mkdir(parents=True, exist_ok=True)
        artifacts.write_text(self.path / CONFIG, cfg.to_json() + "\n")
        artifacts.write_json(self.path / BASELINE, {k: result[k] for k in ("baseline", "settings", "search")})
        self.finish({k: v for k, v in result.items() if k != "search"})

    def is_baseline(self) -> bool:
        return (self.path / BASELINE).is_file()

    def write_manifest(self) -> None:
        """The sha256 of every file at the top of the run: written last, it marks the run complete."""
        artifacts.write_manifest(self.path, MANIFEST)

    # ---- reading ----------------------------------------------------------------------------------
    def check_is_dir(self) -> None:
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: not a directory. Pass the --out folder of `twotower train`")

    def verify(self) -> None:
        """Refuse a run whose files do not match its manifest, or that has none (unfinished). The
        manifest covers the files at the top (what serving and evaluation load); ``checkpoint/``
        is working state for ``--resume``."""
        self.settle()
        if not (self.path / MANIFEST).is_file():
            raise ArtifactError(f"{self.path}: no {MANIFEST}, so the run did not finish. Resume it with "
                                "`twotower train CONFIG --out RUN --resume`, or load it unverified with Run(path, verify=False)")
        artifacts.verify_manifest(self.path, MANIFEST)

    def read_config(self) -> RunConfig:
        return RunConfig.from_dict(artifacts.read_json(self.path / CONFIG), source=str(self.path / CONFIG))

    def read_vocabularies(self) -> tuple[Vocabulary, Vocabulary]:
        """The user and item vocabularies."""
        out = []
        for name in (USERS, ITEMS):
            d = artifacts.read_json(self.path / name)
            ids = d.get("ids") if isinstance(d, dict) else None
            if not isinstance(ids, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in ids):
                raise ArtifactError(f"{self.path / name}: not a vocabulary written by twotower (a list of raw ids). "
                                    "Re-run training, or restore the run from a backup")
            out.append(Vocabulary.from_dict(d))
        return tuple(out)

    def read_known(self) -> Known:
        t = artifacts.load_tensors(self.path / KNOWN)
        return Known(CSR(t["indptr"].numpy(), t["indices"].numpy()), t["item_counts"].numpy(), t["test_users"].numpy())

    def read_features(self) -> FeatureState:
        if (self.path / FEATURES).is_file() and not (self.path / FEATURE_ARRAYS).is_file():
            raise ArtifactError(f"{self.path}: no {FEATURE_ARRAYS} beside {FEATURES}: the run was written by an earlier "
                                "version of twotower, whose runs kept feature tables in the weights. Train it again")
        return FeatureState(artifacts.read_json(self.path / FEATURES), artifacts.load_tensors(self.path / FEATURE_ARRAYS))

    def read_heldout(self) -> tuple[CSR, CSR] | None:
        """``(valid, test)`` per-user CSRs, or ``None`` for a run written before the file existed."""
        p = self.path / HELDOUT
        if not p.is_file():
            return None
        t = artifacts.load_tensors(p)
        return tuple(CSR(t[f"{s}_indptr"].numpy(), t[f"{s}_indices"].numpy()) for s in ("valid", "test"))

    def read_titles(self) -> np.ndarray | None:
        p = self.path / TITLES
        return np.asarray(artifacts.read_json(p), dtype=object) if p.exists() else None

    def read_weights(self) -> dict[str, torch.Tensor]:
        return artifacts.load_tensors(self.path / WEIGHTS)

    @property
    def weights_path(self) -> Path:
        """For messages that name the weights file."""
        return self.path / WEIGHTS

    def read_metrics(self) -> dict:
        return artifacts.read_json(self.path / METRICS)

    def finished_metrics(self, cfg: RunConfig) -> dict | None:
        """The final metrics of a run that completed with exactly ``cfg``, else ``None``."""
        if not ((self.path / METRICS).is_file() and (self.path / CONFIG).is_file()):
            return None
        if artifacts.read_json(self.path / CONFIG) != cfg.to_dict():
            return None
        return artifacts.read_json(self.path / METRICS)

    def model_digest(self) -> str | None:
        """The sha256 of the final weights as the manifest records it (``None`` without one): what
        an index or embedding parts built from these weights carry."""
        p = self.path / MANIFEST
        if not p.is_file():
            return None
        m = artifacts.read_json(p)
        sha = m.get("sha256") if isinstance(m, dict) else None
        return sha.get(WEIGHTS) if isinstance(sha, dict) else None
