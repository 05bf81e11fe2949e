"""Property-based tests (hypothesis) of the readers and the splits: nothing lost, nothing
duplicated, nothing leaked from test into training."""
import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twotower.config import DataConfig
from twotower.data.readers import read_interactions
from twotower.data.sources import build_dataset

# Spellings of a missing value: among integer ids the reader refuses them with a message
# (tests/test_malformed.py), so a round trip is only promised for ids that are not one of them.
_MISSING = {"nan", "-nan", "na", "n/a", "#n/a", "null", "none", "<na>"}
ids = st.one_of(st.integers(min_value=0, max_value=10**12),
                st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=122, blacklist_characters=",\"'\\`"),
                        min_size=1, max_size=8).filter(lambda s: not s.strip().isdigit() and s == s.strip()
                                                       and s.lower() not in _MISSING))

rows = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40), st.integers(0, 10**9)), min_size=1, max_size=300)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.lists(st.tuples(ids, ids), min_size=1, max_size=50), sep=st.sampled_from([",", "\t"]),
       crlf=st.booleans())
def test_reader_round_trip(tmp_path_factory, data, sep, crlf):
    path = tmp_path_factory.mktemp("rt") / ("x.tsv" if sep == "\t" else "x.csv")
    nl = "\r\n" if crlf else "\n"
    path.write_bytes((f"user{sep}item{nl}" + "".join(f"{u}{sep}{i}{nl}" for u, i in data)).encode("utf-8"))
    got = read_interactions(path).frame
    assert len(got) == len(data)
    assert [str(x) for x in got["user"]] == [str(u) for u, _ in data]
    assert [str(x) for x in got["item"]] == [str(i) for _, i in data]


@settings(max_examples=60, deadline=None)
@given(data=rows, split=st.sampled_from(["random", "temporal"]), seed=st.integers(0, 3),
       test_fraction=st.floats(0.05, 0.5), valid_fraction=st.floats(0.0, 0.4))
def test_splits_partition_and_do_not_leak(data, split, seed, test_fraction, valid_fraction):
    frame = pd.DataFrame(data, columns=["user", "item", "timestamp"])
    cfg = DataConfig(split=split, seed=seed, test_fraction=test_fraction, valid_fraction=valid_fraction)
    ds = build_dataset("prop", frame, None, None, None, cfg)
    dedup = frame.sort_values("timestamp", kind="stable").drop_duplicates(["user", "item"])
    parts = [set(zip(ds.users.decode(s.users).tolist(), ds.items.decode(s.items).tolist()))
             for s in (ds.train, ds.valid, ds.test)]
    # nothing lost, nothing duplicated
    assert sum(len(s) for s in (ds.train, ds.valid, ds.test)) == len(dedup)
    assert parts[0] | parts[1] | parts[2] == set(zip(dedup.user, dedup.item))
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # every user keeps at least one training interaction
    assert set(np.unique(ds.train.users)) == set(range(ds.n_users))
    # no test item appears in the training histories used when scoring validation or test
    for upto in ("train", "valid"):
        h = ds.history(upto)
        known = {(u, int(i)) for u in range(ds.n_users) for i in h.row(u)}
        test = set(zip(ds.test.users.tolist(), ds.test.items.tolist()))
        assert not (known & test)
    if split == "temporal":
        last_train = pd.Series(ds.train.timestamps).groupby(ds.train.users).max()
        for u, t in zip(ds.test.users, ds.test.timestamps):
            assert t >= last_train[u]
