"""Run by tests/test_distributed.py under ``torchrun --nproc-per-node 2``; not a test module itself.

    torchrun --standalone --nproc-per-node 2 tests/_distributed_worker.py SPEC.json OUT_DIR

For each case of the spec, every rank trains the case's global batches with ``Trainer.step`` and
saves its losses, gradients after every step and negative-source state to ``OUT_DIR/CASE.rankR.pt``,
for the test to compare with one process. Then the whole ``api.train`` runs once with rank 1's file
writes trapped: rank 1 records every write it attempts in ``OUT_DIR/rank1-writes.json``.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from twotower import artifacts
from twotower.config import RunConfig
from twotower.data.sources import load_dataset
from twotower.training.trainer import Trainer


def run_steps(cfg: RunConfig, batches: list[np.ndarray]) -> dict:
    """The case's global batches through ``Trainer.step``: the loss of each, and every parameter's
    gradient after each (the optimizer leaves them in ``.grad``)."""
    ds = load_dataset(cfg.data)
    tr = Trainer(cfg, ds, quiet=True, log=lambda m: None)
    rng = np.random.default_rng(0)
    losses, grads = [], []
    for pairs in batches:
        losses.append(tr.step(pairs, rng))
        grads.append({n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).detach().clone()
                      for n, p in tr.model.named_parameters() if p.grad is not None})
    return {"losses": losses, "grads": grads, "negatives": tr.candidates.state_dict(),
            "params": {k: v.detach().clone() for k, v in tr.model.state_dict().items()}}


def main(spec_path: str, out: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out_dir = Path(out)
    for case in spec["cases"]:
        cfg = RunConfig.from_dict(case["config"])
        batches = [np.asarray(b, dtype=np.int64) for b in case["batches"]]
        res = run_steps(cfg, batches)
        torch.save(res, out_dir / f"{case['name']}.rank{dist.get_rank()}.pt")

    from twotower import api

    attempts = []
    if dist.get_rank() != 0:
        real = artifacts.atomic_path

        def trap(path):
            attempts.append(str(path))
            return real(path)

        artifacts.atomic_path = trap
    cfg = RunConfig.from_dict(spec["fit"]["config"])
    api.train(cfg, out_dir / "run", quiet=True, log=lambda m: None)
    if dist.get_rank() != 0:
        (out_dir / "rank1-writes.json").write_text(json.dumps(attempts))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
