"""A trained run directory, loaded: config, vocabularies, model, known items per user.

``Run`` is what evaluation, offline recommendation (and serving) start from; it needs no data
files, only the run directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import artifacts
from .config import RunConfig
from .data.dataset import CSR, EncodedFeatures
from .data.vocab import Vocabulary
from .errors import ArtifactError
from .evaluation.ranking import embed_items, top_k_blocks
from .model.towers import TwoTowerModel


def _features_from_state(state: dict[str, torch.Tensor], prefix: str, vocabs: dict[str, list], selected) -> EncodedFeatures | None:
    if not vocabs:
        return None
    names = list(vocabs) if selected == "all" else list(selected)
    if not names:
        return None
    values, rows = {}, {}
    for k, name in enumerate(names):
        values[name] = Vocabulary(np.asarray(vocabs[name], dtype=object), name=name)
        rows[name] = CSR(state[f"{prefix}.features.indptr{k}"].numpy(), state[f"{prefix}.features.values{k}"].numpy())
    return EncodedFeatures(values, rows)


class Run:
    """A run directory written by ``twotower train``."""

    def __init__(self, path: str | Path, weights: str = "model.safetensors", verify: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: not a directory. Pass the --out folder of `twotower train`")
        if verify:
            artifacts.verify_manifest(self.path)
        self.config = RunConfig.from_dict(artifacts.read_json(self.path / "config.json"), source=str(self.path / "config.json"))
        self.users = Vocabulary.from_json((self.path / "users.json").read_text(encoding="utf-8"))
        self.items = Vocabulary.from_json((self.path / "items.json").read_text(encoding="utf-8"))
        known = artifacts.load_tensors(self.path / "known.safetensors")
        self.known = CSR(known["indptr"].numpy(), known["indices"].numpy())
        self.item_counts = known["item_counts"].numpy()
        feats = artifacts.read_json(self.path / "features.json")
        titles_path = self.path / "titles.json"
        self.titles = np.asarray(artifacts.read_json(titles_path), dtype=object) if titles_path.exists() else None
        state = artifacts.load_tensors(self.path / weights)
        m = self.config.model
        self.model = TwoTowerModel(len(self.users), len(self.items), m,
                                   _features_from_state(state, "item_tower", feats.get("item", {}), m.item_features),
                                   _features_from_state(state, "user_tower", feats.get("user", {}), m.user_features))
        try:
            self.model.load_state_dict(state)
        except RuntimeError as e:
            raise ArtifactError(f"{self.path / weights}: weights do not match the run's config ({str(e).splitlines()[0]})") from None
        self.model.eval()
        self._item_vecs: torch.Tensor | None = None

    @property
    def item_vectors(self) -> torch.Tensor:
        if self._item_vecs is None:
            self._item_vecs = embed_items(self.model)
        return self._item_vecs

    def metrics(self) -> dict:
        return artifacts.read_json(self.path / "metrics.json")

    def recommend(self, users, k: int = 10, exclude_seen: bool = True, batch_users: int = 1024) -> pd.DataFrame:
        """Top-k items for known users (raw ids in, raw ids out): columns ``user, item, score, rank``.

        Every item the user has in the training data (validation part included) is excluded.
        Unknown user ids raise ``KeyError``.
        """
        idx = self.users.encode(np.asarray(users), strict=True)
        frames = []
        hist_len = self.config.model.history_length
        for block, scores, items in top_k_blocks(self.model, idx, self.known, self.known if exclude_seen else None, k,
                                                hist_len, batch_users, self.item_vectors):
            kk = items.shape[1]
            s = scores.numpy().ravel()
            ok = np.isfinite(s)  # a user who has seen almost everything gets fewer than k items
            frames.append(pd.DataFrame({
                "user": np.repeat(self.users.decode(block), kk)[ok],
                "item": self.items.decode(items.numpy().ravel())[ok],
                "score": s[ok],
                "rank": np.tile(np.arange(1, kk + 1), len(block))[ok],
            }))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["user", "item", "score", "rank"])

    # ---- heldout.safetensors and metrics.jsonl (issue 20, for the page of `twotower serve`) ---------
    def heldout(self) -> tuple[CSR, CSR] | None:
        """Each user's validation and test items as two CSRs over the user vocabulary (written by
        ``trainer.write_heldout``), or ``None`` for a run trained before that file existed."""
        if not hasattr(self, "_heldout"):
            path = self.path / "heldout.safetensors"
            if not path.is_file():
                self._heldout = None
            else:
                t = artifacts.load_tensors(path)
                self._heldout = tuple(CSR(t[f"{s}_indptr"].numpy(), t[f"{s}_indices"].numpy()) for s in ("valid", "test"))
        return self._heldout

    def epoch_records(self) -> list[dict]:
        """The per-epoch records of ``metrics.jsonl`` (loss, seconds, ``valid/<metric>``), oldest
        first; ``[]`` when the file is absent."""
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        try:
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: corrupted ({e}). Re-run training") from None

    def title(self, item_raw) -> str | None:
        if self.titles is None:
            return None
        i = self.items.encode([item_raw])[0]
        return None if i < 0 else self.titles[i]

    def history_of(self, user_raw) -> np.ndarray:
        u = self.users.encode([user_raw], strict=True)[0]
        return self.items.decode(self.known.row(u))

    # ---- item categories (serving-time filters) ---------------------------------------------------
    def item_feature_values(self) -> dict[str, list]:
        """The values of each categorical item feature the item tower uses, from ``features.json``
        (``{}`` when the item tower has no features)."""
        bags = getattr(self.model.item_tower, "features", None)
        if bags is None:
            return {}
        vocabs = artifacts.read_json(self.path / "features.json").get("item", {})
        return {name: list(vocabs.get(name, [])) for name in bags.names}

    def item_category_items(self, feature: str, value) -> np.ndarray:
        """Sorted indices of the items whose ``feature`` includes ``value`` (multi-valued features
        such as genres count every value). Raises ``KeyError`` naming the known features or values."""
        values = self.item_feature_values()
        if feature not in values:
            raise KeyError(f"item feature {feature!r} is not in this model; known: {sorted(values) or 'none'}")
        vocab = values[feature]
        matches = [i for i, v in enumerate(vocab) if str(v) == str(value)]
        if not matches:
            raise KeyError(f"{feature} {value!r} is not a known value; known: {vocab[:20]}{' ...' if len(vocab) > 20 else ''}")
        bags = self.model.item_tower.features
        k = bags.names.index(feature)
        indptr = getattr(bags, f"indptr{k}").cpu().numpy()
        codes = getattr(bags, f"values{k}").cpu().numpy()
        owners = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        return np.unique(owners[codes == matches[0]]).astype(np.int64)
