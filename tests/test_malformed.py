"""The malformed-input corpus through the command line. ``twotower train`` with a config pointing at
each bad file must exit with code 2 and one message on stderr naming the file, the place (line,
field, column, row, byte offset), the problem and the fix, and write nothing: ``--out`` is not
created. Odd but valid inputs load (and train) instead.

What the reliability checklist asks for, and where it is tested (``CLI`` = ``test_bad_input_exits_2``
/ ``test_odd_but_valid_*`` here, ``readers`` = ``test_readers.py::test_malformed_input[...]`` and
its neighbours):

=============================  =======================================================================
empty file                     CLI empty_file, header_only_blank; readers empty_file, whitespace_only
header only                    CLI header_only; readers header_only
a missing column               CLI missing_column, parquet_missing_column, features_missing_column;
                               readers misnamed_column, parquet_missing_column, features_missing_column
extra columns                  valid: CLI test_odd_but_valid_* (extra header columns ignored);
                               a row with more fields than the header: CLI extra_field_in_row,
                               unquoted_comma_in_title
non-integer ids (required)     CLI lightgcn_non_integer_id, movielens_non_integer_user, parquet_float_id;
                               readers lightgcn_non_numeric, ml_non_numeric_user
negative ids                   CLI lightgcn_negative_id (an error there); valid raw ids in CSV
                               (test_odd_but_valid_*); readers lightgcn_negative
NaN                            CLI nan_timestamp, nan_weight, nan_user_id, parquet_nan_item, empty_item;
                               readers empty_user, parquet_null_item
duplicate rows                 valid: duplicate interactions are one positive (test_odd_but_valid_*);
                               CLI duplicate_feature_rows; readers features_duplicate_id
latin-1 bytes in UTF-8         CLI latin1_in_utf8; readers latin1_in_utf8, test_encoding_error_names_offset
CRLF line endings              valid: test_odd_but_valid_*; readers test_tsv_and_crlf_and_bom
a very long line               valid: test_odd_but_valid_* (a 200,000-character id); CLI
                               very_long_bad_line; readers test_very_long_line_and_blank_lines
a truncated gzip file          CLI truncated_gzip; readers truncated_gzip, gz_name_not_gzip
a truncated Parquet file       CLI truncated_parquet; readers truncated_parquet
features with unknown items    CLI unknown_item_in_features; readers features_unknown_id;
                               test_cli.py::test_unknown_item_in_features_table
items without a category       valid: test_odd_but_valid_* (empty category cells, items absent from
                               the features table)
non-numeric timestamps         CLI non_numeric_timestamp, parquet_text_timestamp; readers bad_timestamp
=============================  =======================================================================
"""
from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower.cli import main


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _interactions(n_users: int = 20, per_user: int = 6) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(0)
    rows = []
    for u in range(1, n_users + 1):
        for t, i in enumerate(rng.choice(np.arange(1, 31), size=per_user, replace=False)):
            rows.append((u, int(i), 1_000 + 10 * u + t))
    return rows


GOOD = "user,item,time\n" + "".join(f"{u},{i},{t}\n" for u, i, t in _interactions())
FILES = '[data]\ndataset = "files"\ninteractions = "{inter}"\n'
TIMED = FILES + 'time_col = "time"\n'
WEIGHTED = FILES + 'weight_col = "w"\n'
FEATURES = FILES + 'item_features = "{items}"\nitem_id_col = "item"\nitem_feature_cols = ["genre"]\n'
LIGHTGCN = '[data]\ndataset = "lightgcn"\npath = "{folder}"\nsplit = "given"\n'
MOVIELENS = '[data]\ndataset = "ml-100k"\npath = "{folder}"\n'
GENRES = "unknown|0\nAction|1\nComedy|2\n\n"
ML_ITEMS = "1|A (1995)|01-Jan-1995||http://x|0|0|1\n2|B (1995)|01-Jan-1995||http://y|0|1|1\n"
ML_USERS = "1|24|M|technician|85711\n2|53|F|other|94043\n"


def _lines(good_rows: str, bad: str, header: str = "user,item,time\n") -> str:
    return header + good_rows + bad


FEW = "1,2,3\n2,3,4\n"

# name: (files {relative name: content}, config template, [strings the message must hold])
BAD = {
    "empty_file": ({"inter.csv": b""}, FILES, ["inter.csv", "empty (0 bytes)", "recreate"]),
    "header_only_blank": ({"inter.csv": "\n   \n\n"}, FILES, ["inter.csv", "only whitespace", "header row"]),
    "header_only": ({"inter.csv": "user,item,time\n"}, TIMED, ["inter.csv", "line 2", "no data rows", "add rows"]),
    "missing_column": ({"inter.csv": "usr,item\n1,2\n"}, FILES,
                       ["inter.csv", "header (line 1)", "'user' is missing", "'usr'", "data.user_col"]),
    "parquet_missing_column": ({"inter.parquet": _parquet(pa.table({"user": [1], "movie": [2]}))},
                               FILES,
                               ["inter.parquet", "schema", "'item' is missing", "data.item_col"]),
    "features_missing_column": ({"inter.csv": GOOD, "items.csv": "item,Genre\n1,a\n"}, FEATURES,
                                ["items.csv", "header (line 1)", "'genre' is missing", "case-sensitive",
                                 "data.item_feature_cols"]),
    "extra_field_in_row": ({"inter.csv": _lines(FEW, "3,4,5,6\n")}, TIMED,
                           ["inter.csv", "line 4", "4 fields, the header has 3", "quote"]),
    "unquoted_comma_in_title": ({"inter.csv": GOOD, "items.csv": "item,title,genre\n1,Toy Story,Animation\n"
                                 "2,Toy Story, The,Animation\n"}, FEATURES + 'item_title_col = "title"\n',
                                ["items.csv", "line 3", "4 fields, the header has 3", "quote that value"]),
    "very_long_bad_line": ({"inter.csv": _lines(FEW, "9," + "x" * 300_000 + ",5,7\n")}, TIMED,
                           ["inter.csv", "line 4", "4 fields", "quote"]),
    "lightgcn_non_integer_id": ({"lg/train.txt": "0 1 2\n1 3 x4\n", "lg/test.txt": "0 3\n1 1\n"},
                                LIGHTGCN, ["train.txt", "line 2, field 3", "'x4' is not an integer id", "integer ids"]),
    "lightgcn_negative_id": ({"lg/train.txt": "0 1 2\n1 3\n2 -4 5\n", "lg/test.txt": "0 3\n"},
                             LIGHTGCN, ["train.txt", "line 3, field 2", "negative id '-4'", "start at 0"]),
    "movielens_non_integer_user": ({"ml/u.genre": GENRES, "ml/u.item": ML_ITEMS, "ml/u.user": ML_USERS,
                                    "ml/u.data": "1\t1\t5\t881250949\nu2\t2\t3\t891717742\n"},
                                   MOVIELENS, ["u.data", "line 2", "user id 'u2' is not an integer", "fetch it again"]),
    "parquet_float_id": ({"inter.parquet": _parquet(pa.table({"user": [1.0, 2.5], "item": [1, 2]}))},
                         FILES,
                         ["inter.parquet", "row index 1", "user id 2.5", "not an integer", "fix the id column"]),
    "nan_timestamp": ({"inter.csv": _lines(FEW, "3,4,NaN\n")}, TIMED,
                      ["inter.csv", "line 4", "timestamp 'NaN'", "not a number", "unix seconds"]),
    "nan_weight": ({"inter.csv": "user,item,w\n1,2,1\n1,3,nan\n"}, WEIGHTED,
                   ["inter.csv", "line 3", "weight 'nan'", "finite numbers"]),
    "nan_user_id": ({"inter.csv": _lines(FEW, "NaN,4,7\n")}, TIMED,
                    ["inter.csv", "line 4", "user id 'NaN'", "missing value", "fill in the user id"]),
    "parquet_nan_item": ({"inter.parquet": _parquet(pa.table({"user": [1, 2], "item": [4.0, float("nan")]}))},
                         FILES,
                         ["inter.parquet", "row index 1", "item id is empty", "fill in the item id"]),
    "empty_item": ({"inter.csv": _lines(FEW, "3,,7\n")}, TIMED, ["inter.csv", "line 4", "item id is empty", "fill in"]),
    "duplicate_feature_rows": ({"inter.csv": GOOD, "items.csv": "item,genre\n1,a\n2,b\n1,c\n"}, FEATURES,
                               ["items.csv", "line 4", "item id 1 appears more than once", "keep one row"]),
    "latin1_in_utf8": ({"inter.csv": b"user,item\n1,caf\xe9\n"}, FILES,
                       ["inter.csv", "line 2, column 6", "0xe9", "not valid utf-8", "iconv"]),
    "truncated_gzip": ({"inter.csv.gz": gzip.compress(GOOD.encode() * 50)[:400]}, TIMED,
                       ["inter.csv.gz", "gzip stream", "truncated or corrupt", "compress it again"]),
    "truncated_parquet": ({"inter.parquet": _parquet(pa.table({"user": [1, 2, 3], "item": [4, 5, 6]}))[:-20]},
                          FILES,
                          ["inter.parquet", "footer", "cannot read the Parquet file", "write or fetch it again"]),
    "non_numeric_timestamp": ({"inter.csv": _lines(FEW, "3,4,yesterday\n")}, TIMED,
                              ["inter.csv", "line 4", "timestamp 'yesterday'", "not a number", "convert dates"]),
    "parquet_text_timestamp": ({"inter.parquet": _parquet(pa.table({"user": [1, 2], "item": [3, 4],
                                                                    "time": ["2020-01-01", "x"]}))},
                               TIMED,
                               ["inter.parquet", "row index 0", "timestamp '2020-01-01'", "unix seconds"]),
}


def _write(tmp_path, files: dict, template: str):
    for name, content in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    inter = next((n for n in files if n.startswith("inter.")), "inter.csv")
    folder = "lg" if any(n.startswith("lg/") for n in files) else "ml"
    text = (template.replace("{inter}", (tmp_path / inter).as_posix()).replace("{items}", (tmp_path / "items.csv").as_posix())
            .replace("{folder}", (tmp_path / folder).as_posix()))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(text + '[model]\ndim = 8\n[train]\nepochs = 1\nbatch_size = 32\n[eval]\nks = [5]\n')
    return cfg


def test_corpus_covers_the_checklist():
    assert len(BAD) >= 20


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_with_file_place_problem_fix_and_writes_nothing(tmp_path, capsys, name):
    files, template, needles = BAD[name]
    cfg = _write(tmp_path, files, template)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("twotower train: error: "), err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert not out.exists()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no temporary files either


def _odd_but_valid(tmp_path):
    """One interactions file with CRLF line endings, extra header columns, duplicate rows, negative
    raw ids and a 200,000-character id; a features table where some items have no category and
    some interacted items have no row at all."""
    long_id = "u" + "x" * 200_000
    rows = [(u - 10, i, t) for u, i, t in _interactions()]  # users -9 .. 10: negative raw ids
    rows += [(i % 20 - 9, i, 6_000 + i) for i in range(1, 31)]  # every item 1 .. 30 at least once
    rows += rows[:15]  # duplicate rows
    rows.append((long_id, 1, 5_000))
    rows.append((long_id, 2, 5_001))
    text = "user,extra,item,time,notes\r\n" + "".join(f"{u},zz,{i},{t},n\r\n" for u, i, t in rows)
    (tmp_path / "inter.csv").write_bytes(text.encode("utf-8"))
    # items 1-9: a genre; 10-19: an empty cell; 20-30: no row in the table
    (tmp_path / "items.csv").write_text("item,genre\n" + "".join(f"{i},{'g' + str(i % 3) if i < 10 else ''}\n"
                                                                  for i in range(1, 20)))
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[data]\ndataset = "files"\ninteractions = "{(tmp_path / "inter.csv").as_posix()}"\n'
                   f'time_col = "time"\nitem_features = "{(tmp_path / "items.csv").as_posix()}"\nitem_id_col = "item"\n'
                   'item_feature_cols = ["genre"]\n[model]\ndim = 8\nitem_features = ["genre"]\n'
                   '[train]\nepochs = 1\nbatch_size = 32\n[eval]\nks = [5]\n')
    return cfg, rows, long_id


def test_odd_but_valid_inputs_load(tmp_path):
    from twotower.config import RunConfig
    from twotower.data.sources import load_dataset

    cfg, rows, long_id = _odd_but_valid(tmp_path)
    ds = load_dataset(RunConfig.load(cfg).data, tmp_path)
    n_pairs = len({(str(u), i) for u, i, _ in rows})
    assert ds.train.users.size + ds.valid.users.size + ds.test.users.size == n_pairs  # duplicates: one positive
    users = set(ds.users.ids.tolist())
    assert {"-9", "0", "10", long_id} <= users  # negative ids kept (strings here, because of the long id)
    assert ds.n_items == 30  # items without a features row are still items
    genre = ds.item_features.rows["genre"].lengths()
    one, empty_cell, no_row = ds.items.encode(np.array([1, 15, 25]))
    assert genre[one] == 1 and genre[empty_cell] == 0 and genre[no_row] == 0  # no category: no value, not an error


def test_odd_but_valid_inputs_train_through_the_cli(tmp_path, capsys):
    cfg, _, _ = _odd_but_valid(tmp_path)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    assert (out / "manifest.json").is_file() and json.loads((out / "metrics.json").read_text())["valid"]
