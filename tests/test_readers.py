"""Tests for twotower.data.readers: real files, odd-but-valid inputs, a malformed-input corpus."""
from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.errors import DataError
from twotower.data.readers import (
    Features,
    Interactions,
    read_features,
    read_interactions,
    read_lightgcn,
    read_lightgcn_file,
    read_movielens_100k,
)

DATA = Path(
    os.environ.get(
        "TWOTOWER_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"
    )
)
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data folder {DATA} is absent")


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


GENRES = ["unknown", "Action", "Comedy"]


def make_ml100k(root: Path, *, data=None, item=None, user=None, genre=None) -> Path:
    """A tiny MovieLens-100K-shaped folder; pass bytes/str to replace one file."""
    d = root / "ml-100k"
    write(d / "u.genre", genre if genre is not None else
          "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    write(d / "u.item", item if item is not None else (
        "1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n".encode()
        + "2|Misérables, Les (1995)|01-Jan-1995||http://y|0|1|1\n".encode("latin-1")
        + b"3|unknown||||1|0|0\n"
    ))
    write(d / "u.user", user if user is not None else
          "1|24|M|technician|85711\n2|53|F|other|94043\n")
    write(d / "u.data", data if data is not None else
          "1\t1\t5\t881250949\n2\t2\t3\t891717742\n1\t3\t1\t878887116\n")
    return d


def raises_data_error(fn, *args, **kwargs) -> DataError:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------


@needs_data
def test_movielens_100k_real():
    inter, items, users = read_movielens_100k(DATA / "ml-100k")
    f = inter.frame
    assert len(inter) == 100_000
    assert list(f.columns) == ["user", "item", "timestamp", "weight"]
    assert f["user"].dtype == np.int64 and f["item"].dtype == np.int64
    assert f["timestamp"].dtype == np.int64 and f["weight"].dtype == np.float32
    assert inter.has_timestamps
    assert f["user"].nunique() == 943 and f["item"].nunique() == 1682
    assert set(f["weight"].unique()) == {1, 2, 3, 4, 5}
    assert isinstance(f.index, pd.RangeIndex)
    assert (f.iloc[0]["user"], f.iloc[0]["item"], f.iloc[0]["timestamp"]) == (196, 242, 881250949)

    assert len(items.ids) == 1682 and items.ids.dtype == np.int64
    assert len(set(items.ids)) == 1682
    by_id = dict(zip(items.ids.tolist(), range(len(items.ids))))
    assert items.titles[by_id[1]] == "Toy Story (1995)"
    assert items.titles[by_id[543]] == "Misérables, Les (1995)"
    assert items.titles[by_id[1633]] == "Á köldum klaka (Cold Fever) (1994)"
    assert items.categorical["genre"][by_id[1]] == ["Animation", "Children's", "Comedy"]
    assert items.categorical["genre"][by_id[267]] == ["unknown"]
    assert all(len(g) >= 1 for g in items.categorical["genre"])

    assert len(users.ids) == 943
    assert set(users.categorical) == {"age", "gender", "occupation"}
    u1 = int(np.flatnonzero(users.ids == 1)[0])
    assert users.categorical["age"][u1] == ["18-24"]  # age 24
    assert users.categorical["gender"][u1] == ["M"]
    assert users.categorical["occupation"][u1] == ["technician"]
    u2 = int(np.flatnonzero(users.ids == 2)[0])
    assert users.categorical["age"][u2] == ["50-55"]  # age 53


@needs_data
def test_gowalla_real():
    train, test = read_lightgcn(DATA / "gowalla")
    assert len(train) == 810_128 and len(test) == 217_242
    assert train.frame["user"].nunique() == 29_858
    assert test.frame["user"].nunique() == 29_858
    assert train.frame["item"].max() + 1 <= 40_981
    assert train.frame["user"].dtype == np.int64 and train.frame["item"].dtype == np.int64
    assert not train.has_timestamps
    assert train.frame["user"].iloc[0] == 0 and train.frame["item"].iloc[:3].tolist() == [0, 1, 2]


@needs_data
def test_grocery_real():
    inter = read_interactions(
        DATA / "grocery" / "train.csv", user_col="user_id", item_col="item_id", time_col="time"
    )
    f = inter.frame
    assert len(inter) == 121_892
    assert inter.has_timestamps and f["timestamp"].dtype == np.int64
    assert f["user"].nunique() == 14_681 and f["item"].nunique() == 8_687
    assert f.iloc[0].tolist() == [2177, 3, 965779200]

    meta = read_features(DATA / "grocery" / "item_meta.csv", id_col="item_id",
                         columns=["i_category"])
    assert len(meta.ids) == 8_713 and meta.ids.dtype == np.int64
    cats = meta.categorical["i_category"]
    assert all(len(c) == 1 for c in cats)
    assert len({c[0] for c in cats}) == 57
    assert set(f["item"].unique()) <= set(meta.ids.tolist())


# --------------------------------------------------------------------------------------------
# valid but odd inputs
# --------------------------------------------------------------------------------------------


def test_csv_comma_sniffed_and_extra_columns_ignored(tmp_path):
    p = write(tmp_path / "x.csv", "user,item,extra,time\n1,10,zz,5\n2,20,yy,6\n")
    inter = read_interactions(p, time_col="time")
    assert inter.frame.to_dict("list") == {"user": [1, 2], "item": [10, 20], "timestamp": [5, 6]}
    assert inter.source == str(p)


def test_tsv_and_crlf_and_bom(tmp_path):
    p = write(tmp_path / "x.tsv", "\ufeffuser\titem\tw\r\n1\t10\t0.5\r\n1\t10\t0.5\r\n")
    inter = read_interactions(p, weight_col="w")
    assert inter.frame["user"].tolist() == [1, 1]  # duplicates kept
    assert inter.frame["weight"].dtype == np.float32
    assert inter.frame["weight"].tolist() == [0.5, 0.5]


def test_string_ids_and_leading_zeros_stay_strings(tmp_path):
    p = write(tmp_path / "x.csv", "user,item\nalice,007\nbob,12\n")
    f = read_interactions(p).frame
    assert f["user"].tolist() == ["alice", "bob"] and f["user"].dtype == object
    assert f["item"].tolist() == ["007", "12"]  # "007" is not rewritten to 7
    assert f["item"].dtype == object


def test_float_timestamps_and_gzip(tmp_path):
    p = tmp_path / "x.csv.gz"
    p.write_bytes(gzip.compress(b"user\titem\tts\n1\t2\t1.5\n3\t4\t2e3\n"))
    f = read_interactions(p, time_col="ts").frame
    assert f["timestamp"].dtype == np.float64 and f["timestamp"].tolist() == [1.5, 2000.0]


def test_very_long_line_and_blank_lines(tmp_path):
    long_id = "u" + "x" * 200_000
    p = write(tmp_path / "x.csv", f"user,item\n\n{long_id},1\n\n2,3\n")
    f = read_interactions(p).frame
    assert f["user"].tolist() == [long_id, "2"]


def test_parquet_roundtrip(tmp_path):
    p = tmp_path / "x.parquet"
    pq.write_table(pa.table({"u": ["a", "b"], "i": [1, 2], "t": [1.0, 2.5], "junk": [0, 0]}), p)
    f = read_interactions(p, user_col="u", item_col="i", time_col="t").frame
    assert f.to_dict("list") == {"user": ["a", "b"], "item": [1, 2], "timestamp": [1.0, 2.5]}
    assert f["item"].dtype == np.int64


def test_features_multi_valued_titles_and_missing(tmp_path):
    p = write(tmp_path / "items.tsv",
              "id\ttitle\tgenres\tcat\n1\tOne\tA|B\tx\n2\tTwo\t\t\n3\t\tC||\ty\n")
    feats = read_features(p, "id", ["cat"], multi_valued={"genres": "|"}, title_col="title",
                          known_ids=[1, 2, 3, 4])
    assert isinstance(feats, Features)
    assert feats.ids.tolist() == [1, 2, 3]
    assert feats.categorical["genres"] == [["A", "B"], [], ["C"]]
    assert feats.categorical["cat"] == [["x"], [], ["y"]]
    assert feats.titles.tolist() == ["One", "Two", ""]


def test_lightgcn_user_without_items_crlf_tabs(tmp_path):
    p = write(tmp_path / "train.txt", "0 1 2\r\n1\r\n2\t5 5\r\n\r\n")
    inter = read_lightgcn_file(p)
    assert isinstance(inter, Interactions)
    assert inter.frame.to_dict("list") == {"user": [0, 0, 2, 2], "item": [1, 2, 5, 5]}


def test_movielens_small_folder(tmp_path):
    d = make_ml100k(tmp_path)
    inter, items, users = read_movielens_100k(tmp_path)  # parent folder is accepted too
    assert len(inter) == 3 and inter.frame["weight"].tolist() == [5.0, 3.0, 1.0]
    assert items.titles.tolist()[1] == "Misérables, Les (1995)"
    assert items.categorical["genre"] == [["Comedy"], ["Action", "Comedy"], ["unknown"]]
    assert users.categorical["age"] == [["18-24"], ["50-55"]]
    assert read_movielens_100k(d)[0].frame.equals(inter.frame)


@pytest.mark.parametrize("seed", range(10))
def test_roundtrip_random(tmp_path, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 50))
    users = rng.integers(0, 2**62, size=n).tolist()
    text_ids = bool(seed % 2)
    items = [u % 97 for u in users]
    frame = pd.DataFrame({"user": [f"u{u}" if text_ids else u for u in users], "item": items})
    suffix = [".csv", ".tsv", ".parquet"][seed % 3]
    p = tmp_path / f"rt{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(p, index=False)
    else:
        frame.to_csv(p, index=False, sep="\t" if suffix == ".tsv" else ",")
    got = read_interactions(p).frame
    assert got["user"].tolist() == frame["user"].tolist()
    assert got["item"].tolist() == items
    assert got["item"].dtype == np.int64


# --------------------------------------------------------------------------------------------
# malformed inputs: every case must raise DataError naming the file and a place
# --------------------------------------------------------------------------------------------


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def case_missing_file(t):
    return (lambda: read_interactions(t / "nope.csv")), "nope.csv", None


def case_empty_file(t):
    p = write(t / "empty.csv", b"")
    return (lambda: read_interactions(p)), "empty.csv", "0 bytes"


def case_header_only(t):
    p = write(t / "hdr.csv", "user,item\n")
    return (lambda: read_interactions(p)), "hdr.csv", "line 2"


def case_misnamed_column(t):
    p = write(t / "cols.tsv", "user_id\titem_id\ttime\n1\t2\t3\n")
    return (lambda: read_interactions(p, user_col="user_id", item_col="item")), "cols.tsv", "header"


def case_empty_user(t):
    p = write(t / "nan_user.csv", "user,item\n1,2\n,3\n")
    return (lambda: read_interactions(p)), "nan_user.csv", "line 3"


def case_short_line_item(t):
    p = write(t / "short.csv", "user,item\n1,2\n\n4\n")
    return (lambda: read_interactions(p)), "short.csv", "line 4"  # blank line 3 is skipped


def case_bad_timestamp(t):
    p = write(t / "ts.csv", "user,item,time\n1,2,3\n1,2,yesterday\n")
    return (lambda: read_interactions(p, time_col="time")), "ts.csv", "line 3"


def case_bad_weight(t):
    p = write(t / "w.csv", "user,item,w\n1,2,1\n1,2,1\n1,2,heavy\n")
    return (lambda: read_interactions(p, weight_col="w")), "w.csv", "line 4"


def case_latin1_in_utf8(t):
    p = write(t / "enc.csv", "user,item\n1,caf".encode() + b"\xe9\n")
    return (lambda: read_interactions(p)), "enc.csv", "line 2"


def case_truncated_gzip(t):
    blob = gzip.compress(b"user,item\n" + b"1,2\n" * 5000)
    p = write(t / "cut.csv.gz", blob[: len(blob) // 2])
    return (lambda: read_interactions(p)), "cut.csv.gz", "gzip"


def case_gz_name_not_gzip(t):
    p = write(t / "plain.csv.gz", "user,item\n1,2\n")
    return (lambda: read_interactions(p)), "plain.csv.gz", "byte 0"


def case_truncated_parquet(t):
    blob = _parquet_bytes(pa.table({"user": [1, 2, 3], "item": [4, 5, 6]}))
    p = write(t / "cut.parquet", blob[: len(blob) - 20])
    return (lambda: read_interactions(p)), "cut.parquet", "footer"


def case_parquet_missing_column(t):
    p = write(t / "cols.parquet", _parquet_bytes(pa.table({"user": [1], "movie": [2]})))
    return (lambda: read_interactions(p)), "cols.parquet", "schema"


def case_parquet_null_item(t):
    p = write(t / "null.parquet", _parquet_bytes(pa.table({"user": [1, 2], "item": [4, None]})))
    return (lambda: read_interactions(p)), "null.parquet", "row index 1"


def case_unclosed_quote(t):
    p = write(t / "quote.csv", 'user,item\n1,2\n3,"4\n5,6\n')
    return (lambda: read_interactions(p)), "quote.csv", "line 3"


def case_whitespace_only(t):
    p = write(t / "blank.csv", "\n  \n")
    return (lambda: read_interactions(p)), "blank.csv", None


def case_lightgcn_non_numeric(t):
    p = write(t / "train.txt", "0 1 2\n1 3 x4\n")
    return (lambda: read_lightgcn_file(p)), "train.txt", "line 2"


def case_lightgcn_negative(t):
    p = write(t / "neg.txt", "0 1 2\n1 3\n2 -4 5\n")
    return (lambda: read_lightgcn_file(p)), "neg.txt", "line 3"


def case_lightgcn_bad_byte(t):
    p = write(t / "enc.txt", b"0 1\n1 2\xe9\n")
    return (lambda: read_lightgcn_file(p)), "enc.txt", "line 2"


def case_lightgcn_missing_test(t):
    write(t / "lg" / "train.txt", "0 1\n")
    return (lambda: read_lightgcn(t / "lg")), "test.txt", None


def case_features_unknown_id(t):
    p = write(t / "meta.csv", "item_id,cat\n1,a\n2,b\n99,c\n")
    return (lambda: read_features(p, "item_id", ["cat"], known_ids=np.array([1, 2, 3]))), \
        "meta.csv", "line 4"


def case_features_duplicate_id(t):
    p = write(t / "dup.csv", "item_id,cat\n1,a\n2,b\n1,c\n")
    return (lambda: read_features(p, "item_id", ["cat"])), "dup.csv", "line 4"


def case_features_missing_column(t):
    p = write(t / "fcols.csv", "item_id,Category\n1,a\n")
    return (lambda: read_features(p, "item_id", ["category"])), "fcols.csv", "header"


def case_ml_bad_rating(t):
    d = make_ml100k(t, data="1\t1\t5\t881250949\n2\t2\tfive\t891717742\n")
    return (lambda: read_movielens_100k(d)), "u.data", "line 2"


def case_ml_non_numeric_user(t):
    d = make_ml100k(t, data="1\t1\t5\t881250949\nu2\t2\t3\t891717742\n")
    return (lambda: read_movielens_100k(d)), "u.data", "line 2"


def case_ml_bad_genre_flag(t):
    d = make_ml100k(t, item="1|Toy Story (1995)|01-Jan-1995||http://x|0|0|1\n"
                            "2|B|x||y|0|2|1\n3|C||||1|0|0\n")
    return (lambda: read_movielens_100k(d)), "u.item", "line 2"


def case_ml_wrong_field_count(t):
    d = make_ml100k(t, user="1|24|M|technician|85711\n2|53|F|other\n")
    return (lambda: read_movielens_100k(d)), "u.user", "line 2"


def case_ml_unknown_item(t):
    d = make_ml100k(t, data="1\t1\t5\t881250949\n2\t77\t3\t891717742\n")
    return (lambda: read_movielens_100k(d)), "u.data", "line 2"


def case_ml_missing_folder(t):
    return (lambda: read_movielens_100k(t / "nowhere")), "nowhere", None


CASES = {name[5:]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


def test_corpus_is_large_enough():
    assert len(CASES) >= 15


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input(tmp_path, name):
    call, file_name, place = CASES[name](tmp_path)
    err = raises_data_error(call)
    msg = str(err)
    assert file_name in msg, msg
    if place is not None:
        assert place in msg, msg
    assert err.problem and err.fix, msg
    # no raw exception text from other libraries as the whole story
    assert "Traceback" not in msg


def test_missing_column_message_lists_columns(tmp_path):
    p = write(tmp_path / "cols.tsv", "user_id\titem_id\ttime\n1\t2\t3\n")
    msg = str(raises_data_error(read_interactions, p, user_col="user_id", item_col="item"))
    assert "'item' is missing" in msg
    assert "['user_id', 'item_id', 'time']" in msg
    assert "item_col" in msg


def test_headerless_file_hint(tmp_path):
    p = write(tmp_path / "nohdr.csv", "1,2\n3,4\n")
    msg = str(raises_data_error(read_interactions, p))
    assert "header" in msg


def test_encoding_error_names_offset(tmp_path):
    p = write(tmp_path / "enc.csv", b"user,item\n1,caf\xe9\n")
    err = raises_data_error(read_interactions, p)
    assert "offset 15" in str(err) and "0xe9" in str(err)
    # and the same file loads with its real encoding
    assert read_interactions(p, encoding="latin-1").frame["item"].tolist() == ["café"]


def test_unknown_feature_id_message(tmp_path):
    p = write(tmp_path / "users.csv", "uid,age\n5,20\nzz,30\n")
    err = raises_data_error(read_features, p, "uid", ["age"], known_ids=["5"], kind="user")
    assert "user id 'zz'" in str(err) and "line 3" in str(err)
    assert re.search(r"drop", err.fix)
