"""Where a Gowalla training step goes: ``torch.profiler`` over ``Trainer.step`` (configs/gowalla.toml
at d = 64, B = 2048), the operators by self CPU time.

    .venv/bin/python benchmarks/profile_step.py [--optimizer deferred_adam] [--steps 30] [--data-dir ../shared/data]

The three products are ``aten::mm`` (forward scores, query gradient) and ``aten::addmm_`` (item
gradient); divide the table's totals by ``--steps`` for ms per step. Prints only.
"""
import argparse

import numpy as np
from torch.profiler import profile

from twotower.api import load_dataset
from twotower.config import RunConfig
from twotower.training.batching import epoch_batches
from twotower.training.trainer import Trainer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", default=None, help="train.optimizer (default: the config's)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--data-dir", default=None, help="datasets folder (default: $TWOTOWER_DATA)")
    args = p.parse_args(argv)
    cfg = RunConfig.load("configs/gowalla.toml", ["model.dim=64"] + ([f'train.optimizer="{args.optimizer}"'] if args.optimizer else []))
    ds = load_dataset(cfg.data, args.data_dir)
    tr = Trainer(cfg, ds, None, quiet=True)
    tr.model.train()
    rng = np.random.default_rng(0)
    batches = list(epoch_batches(len(ds.train), cfg.train.batch_size, rng, None))
    for pairs in batches[:10]:  # warm-up
        tr.step(pairs, rng)
    with profile() as prof:
        for pairs in batches[10 : 10 + args.steps]:
            tr.step(pairs, rng)
    print(f"{args.steps} steps, optimizer {cfg.train.optimizer}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
