"""Where the replay benchmark's shortfall on MovieLens 100K lies (docs/freshness.md): step 1 of the
6-slice protocol of ``freshness.py``, Recall@20 on the next slice split by user: those new in the
slice just seen (the update trains them on all they did) against older users (whom the update sees
only through the replay sample), for the retrain and three update settings.

    TWOTOWER_DATA=/path/to/data flock /tmp/twotower-heavy.lock .venv/bin/python benchmarks/freshness_groups.py
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
torch.set_num_threads(2)
from freshness import load_frame, cuts, base_config, retrain, recall_of_run
from twotower.config import UpdateConfig
from twotower.update import update
f = load_frame('ml-100k', Path(os.environ.get('TWOTOWER_DATA', 'data')))
b = cuts(len(f), 0.7, 6)
seen, sl, nxt = f.iloc[:b[1]], f.iloc[b[0]:b[1]], f.iloc[b[1]:b[2]]
newu = set(sl.user) - set(f.iloc[:b[0]].user)
groups = {"users new in slice": nxt[nxt.user.isin(newu)], "older users": nxt[~nxt.user.isin(newu)], "all": nxt}
cfg = base_config('ml-100k', 5)
with tempfile.TemporaryDirectory() as t:
    t = Path(t)
    _, base = retrain(cfg, f.iloc[:b[0]], t / 'base')
    _, rd = retrain(cfg, seen, t / 'retrain')
    print("retrain 5 ep", {k: round(recall_of_run(rd, seen, g), 4) for k, g in groups.items()})
    for name, u in (("update 4ep r1 lr.002", UpdateConfig(epochs=4, replay=1.0, lr=0.002)),
                    ("update 4ep r3 lr.002", UpdateConfig(epochs=4, replay=3.0, lr=0.002)),
                    ("update 4ep r1 lr.005", UpdateConfig(epochs=4, replay=1.0))):
        out = t / name.replace(' ', '_')
        update(base, sl, out, cfg=u, log=lambda m: None)
        print(name, {k: round(recall_of_run(out, seen, g), 4) for k, g in groups.items()})
