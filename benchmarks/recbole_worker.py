"""One RecBole model on pre-split atomic files; run by benchmarks/recbole_compare.py with the Python
of RecBole's own virtual environment (it imports nothing from twotower).

    python recbole_worker.py DATA_DIR DATASET MODEL EPOCHS BATCH DIM NEGATIVES OUT.json

Trains ``EPOCHS`` epochs on ``DATASET.train.inter`` (no validation pass), then ranks every item
for every user of ``DATASET.test.inter`` with training and validation items masked (RecBole's
full-sort evaluation) and writes: seconds per epoch, positive pairs per second, evaluation
seconds, test Recall@20 / NDCG@20 and peak resident memory.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time


def main() -> None:
    data_dir, dataset, model_name, epochs, batch, dim, negatives, out = sys.argv[1:9]
    epochs, batch, dim, negatives = int(epochs), int(batch), int(dim), int(negatives)
    data_dir, out = os.path.abspath(data_dir), os.path.abspath(out)
    os.chdir(tempfile.mkdtemp(prefix="recbole-run-"))  # RecBole writes log/ and log_tensorboard/ here

    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import get_model, get_trainer, init_seed

    ckpt = tempfile.mkdtemp(prefix="recbole-ckpt-")
    cfg = {
        "data_path": data_dir, "dataset": dataset,
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id"]},
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id",
        "embedding_size": dim, "epochs": epochs, "eval_step": 0,
        # RecBole counts a batch in rows after negative sampling (one row per negative in its
        # pairwise format): this keeps `batch` positive pairs per step, as in twotower.
        "train_batch_size": batch * negatives,
        "train_neg_sample_args": {"distribution": "uniform", "sample_num": negatives},
        "metrics": ["Recall", "NDCG"], "topk": [20], "valid_metric": "Recall@20",
        "eval_batch_size": 4096, "device": "cpu", "use_gpu": False, "seed": 0, "reproducibility": True,
        "show_progress": False, "checkpoint_dir": ckpt, "state": "WARNING", "save_dataset": False,
        "save_dataloaders": False,
    }
    config = Config(model=model_name, config_dict=cfg)
    init_seed(config["seed"], config["reproducibility"])
    logging.getLogger().setLevel(logging.WARNING)
    t0 = time.perf_counter()
    ds = create_dataset(config)
    # RecBole's full-sort evaluation counts this batch in user x item scores: its default (4096)
    # would score one user per call; 256 users per call is what a user would set.
    config["eval_batch_size"] = 256 * ds.item_num
    train_data, _valid, test_data = data_preparation(config, ds)
    load_s = time.perf_counter() - t0
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    pairs = len(train_data._dataset)
    epoch_s, losses = [], []
    for epoch in range(epochs):
        t = time.perf_counter()
        loss = trainer._train_epoch(train_data, epoch, show_progress=False)
        epoch_s.append(time.perf_counter() - t)
        losses.append(float(sum(loss) if isinstance(loss, tuple) else loss))
        print(f"{model_name} epoch {epoch + 1}: {epoch_s[-1]:.1f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    eval_s = time.perf_counter() - t
    res = {
        "tool": "RecBole", "model": model_name, "epochs": epochs, "batch_positives": batch, "dim": dim,
        "negatives_per_positive": negatives, "train_pairs": pairs, "load_seconds": load_s,
        "epoch_seconds": epoch_s, "seconds_per_epoch": sum(epoch_s) / epochs,
        "examples_per_s": pairs * epochs / sum(epoch_s), "loss": losses, "eval_seconds": eval_s,
        "test_recall@20": float(result["recall@20"]), "test_ndcg@20": float(result["ndcg@20"]),
        "test_users": int(test_data._dataset.user_num) if hasattr(test_data, "_dataset") else None,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "recbole": __import__("recbole").__version__, "torch": __import__("torch").__version__,
        "threads": __import__("torch").get_num_threads(),
    }
    with open(out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
