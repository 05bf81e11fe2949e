"""The MovieLens 100K folder as GroupLens ships it (``u.data``, ``u.item``, ``u.user``, ``u.genre``)."""
from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from twotower.errors import DataError

from .columns import trimmed_strings
from .files import check_file, decode_text, read_raw
from .records import Features, Interactions
from .table import Table, parser_error, text_locator


_AGE_BUCKETS = [(18, "under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"),
                (56, "50-55")]


def _age_bucket(age: int) -> str:
    for upper, name in _AGE_BUCKETS:
        if age < upper:
            return name
    return "56+"


def _read_headerless(
    path: Path, sep: str, n_fields: int, encoding: str, fix: str
) -> tuple[pd.DataFrame, Callable[[int], str]]:
    """Read a header-less, unquoted file with exactly ``n_fields`` fields per line as strings."""
    check_file(path)
    text = decode_text(path, read_raw(path), encoding)
    if not text.strip():
        raise DataError(path, "file has no lines, only whitespace", fix)
    locate = text_locator(text, header=False)
    # pandas pads short lines and cuts or rejects long ones: check field counts first.
    lines = [ln for ln in text.split("\n") if ln.strip()]
    counts = np.fromiter((ln.count(sep) for ln in lines), dtype=np.int64, count=len(lines))
    wrong = np.flatnonzero(counts != n_fields - 1)
    if wrong.size:
        row = int(wrong[0])
        raise DataError(
            path,
            f"line has {int(counts[row]) + 1} fields, expected {n_fields} separated by {sep!r}",
            f"fix or drop that line; {fix}",
            where=locate(row),
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            df = pd.read_csv(
                io.StringIO(text),
                sep=sep,
                header=None,
                names=list(range(n_fields)),
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                quoting=csv.QUOTE_NONE,
                index_col=False,
            )
    except pd.errors.ParserError as exc:  # pragma: no cover - field counts were checked
        raise parser_error(path, exc) from None
    return df, locate


def read_movielens_100k(directory) -> tuple[Interactions, Features, Features]:
    """Read the MovieLens 100K folder as shipped by GroupLens.

    Returns ``(interactions, item_features, user_features)``: interactions from ``u.data`` with
    ``timestamp`` (int64 unix seconds) and ``weight`` = rating (float32); item features from
    ``u.item`` (latin-1) with ``categorical={"genre": [...]}`` (names from ``u.genre``) and
    titles; user features from ``u.user`` with ``age`` (bucket such as ``"25-34"``), ``gender``
    and ``occupation``. Every column (``movielens_100k_tables``) can be read as declared instead.
    """
    from twotower.config import FeatureSpec

    from .tabular import features_from_table

    inter, items, users = movielens_100k_tables(directory)
    legacy = {"item": [FeatureSpec(name="genre", kind="multi_categorical")],
              "user": [FeatureSpec(name=n, kind="categorical") for n in ("age", "gender", "occupation")]}
    item_f = features_from_table(items, items.columns["movie_id"].to_numpy(), legacy["item"], "item",
                                 items.columns["title"].to_numpy(dtype=object))
    user_f = features_from_table(users, users.columns["user_id"].to_numpy(), legacy["user"], "user")
    return inter, item_f, user_f


# The columns of the tables movielens_100k_tables returns (what [features] declarations can name).
ML100K_ITEM_COLUMNS = ("genre", "title", "year", "release_date")
ML100K_USER_COLUMNS = ("age", "age_years", "gender", "occupation", "zip", "zip_area")
ML100K_INTERACTION_COLUMNS = ("timestamp", "rating")


def movielens_100k_tables(directory) -> tuple[Interactions, Table, Table]:
    """The MovieLens 100K folder as raw tables, each column as GroupLens ships it or taken from it:

    - items (``u.item``): ``movie_id``; ``genre`` (the list of genre names of the flags), ``title``,
      ``release_date`` (as written, e.g. ``01-Jan-1995``; empty for a few), ``year`` (its year, NaN
      where there is none);
    - users (``u.user``): ``user_id``; ``age`` (the bucket, e.g. ``"25-34"``), ``age_years`` (the
      number), ``gender``, ``occupation``, ``zip`` (as written; a few are Canadian) and
      ``zip_area`` (its first character, the US postal region);
    - interactions (``u.data``): ``user``, ``item``, ``timestamp``, ``weight`` (the rating).

    Messages about a column name its file and line.
    """
    directory = Path(directory)
    if not (directory / "u.data").exists() and (directory / "ml-100k" / "u.data").exists():
        directory = directory / "ml-100k"
    if not directory.is_dir():
        raise DataError(
            directory,
            "folder not found" if not directory.exists() else "is not a folder",
            "give the ml-100k folder holding u.data, u.item, u.user and u.genre",
        )
    fetch = "the file should match the GroupLens ml-100k release; fetch it again"

    # Genres.
    genre_path = directory / "u.genre"
    genre_df, genre_loc = _read_headerless(genre_path, "|", 2, "latin-1", fetch)
    genre_index = _int_column(genre_path, genre_df[1], genre_loc, "genre index", fetch)
    order = np.argsort(genre_index, kind="stable")
    if not np.array_equal(genre_index[order], np.arange(len(genre_index))):
        raise DataError(
            genre_path, "genre indices are not 0, 1, 2, ... in some order", fetch, where="column 2"
        )
    genre_names = [str(genre_df[0].iloc[i]).strip() for i in order]
    n_genres = len(genre_names)

    # Items.
    item_path = directory / "u.item"
    item_df, item_loc = _read_headerless(item_path, "|", 5 + n_genres, "latin-1", fetch)
    item_ids = _int_column(item_path, item_df[0], item_loc, "movie id", fetch)
    _check_unique(item_path, item_ids, item_loc, "movie id", fetch)
    flags = item_df.iloc[:, 5:].to_numpy(dtype=object)
    bad = ~np.isin(flags, ["0", "1"])
    if bad.any():
        row, col = (int(x[0]) for x in np.nonzero(bad))
        raise DataError(
            item_path,
            f"genre flag {flags[row, col]!r} for genre {genre_names[col]!r} is not 0 or 1",
            fetch,
            where=f"{item_loc(row)}, field {6 + col}",
        )
    on = flags == "1"
    names = np.asarray(genre_names, dtype=object)
    genres = pd.Series([list(names[r]) for r in on], dtype=object)
    titles = item_df[1].to_numpy(dtype=object).astype(str).astype(object)
    released = pd.Series(item_df[2].to_numpy(dtype=object)).str.strip()
    when = pd.to_datetime(released, format="%d-%b-%Y", errors="coerce")
    unreadable = when.isna().to_numpy() & (released.to_numpy(dtype=object) != "")
    if unreadable.any():
        row = int(np.flatnonzero(unreadable)[0])
        raise DataError(item_path, f"release date {released.iloc[row]!r} is not a date like 01-Jan-1995", fetch,
                        where=f"{item_loc(row)}, field 3")
    items = Table(item_path, {
        "movie_id": pd.Series(item_ids), "genre": genres, "title": pd.Series(titles, dtype=object),
        "release_date": pd.Series(released.to_numpy(dtype=object), dtype=object),
        "year": pd.Series(when.dt.year.to_numpy(dtype=np.float64, na_value=np.nan)),
    }, len(item_ids), item_loc, ["movie_id", *ML100K_ITEM_COLUMNS])

    # Users.
    user_path = directory / "u.user"
    user_df, user_loc = _read_headerless(user_path, "|", 5, "latin-1", fetch)
    user_ids = _int_column(user_path, user_df[0], user_loc, "user id", fetch)
    _check_unique(user_path, user_ids, user_loc, "user id", fetch)
    ages = _int_column(user_path, user_df[1], user_loc, "age", fetch)
    zips = pd.Series([str(z).strip() for z in user_df[4]], dtype=object)
    users = Table(user_path, {
        "user_id": pd.Series(user_ids),
        "age": pd.Series([_age_bucket(int(a)) for a in ages], dtype=object),
        "age_years": pd.Series(ages.astype(np.int64)),
        "gender": pd.Series([str(g).strip() for g in user_df[2]], dtype=object),
        "occupation": pd.Series([str(o).strip() for o in user_df[3]], dtype=object),
        "zip": zips,
        "zip_area": pd.Series([z[:1] for z in zips], dtype=object),
    }, len(user_ids), user_loc, ["user_id", *ML100K_USER_COLUMNS])

    # Ratings.
    data_path = directory / "u.data"
    data_df, data_loc = _read_headerless(data_path, "\t", 4, "latin-1", fetch)
    u = _int_column(data_path, data_df[0], data_loc, "user id", fetch)
    i = _int_column(data_path, data_df[1], data_loc, "item id", fetch)
    rating = _int_column(data_path, data_df[2], data_loc, "rating", fetch)
    ts = _int_column(data_path, data_df[3], data_loc, "timestamp", fetch)
    for values, known, what, other in ((u, user_ids, "user", "u.user"),
                                       (i, item_ids, "item", "u.item")):
        unknown = ~np.isin(values, known)
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            raise DataError(
                data_path,
                f"{what} id {int(values[row])} is not listed in {other} "
                f"({int(unknown.sum())} such ratings)",
                fetch,
                where=data_loc(row),
            )
    frame = pd.DataFrame(
        {"user": u, "item": i, "timestamp": ts, "weight": rating.astype(np.float32)}
    )
    columns = Table(data_path, {"timestamp": pd.Series(ts), "rating": pd.Series(rating)}, len(ts), data_loc,
                    list(ML100K_INTERACTION_COLUMNS))
    return Interactions(frame, str(data_path), columns), items, users


def _int_column(
    path: Path, series: pd.Series, locate: Callable[[int], str], what: str, fix: str
) -> np.ndarray:
    arr = trimmed_strings(series)
    ok = pc.match_substring_regex(arr, r"^-?[0-9]{1,18}$").to_numpy(zero_copy_only=False)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        value = arr[row].as_py()
        problem = f"{what} is empty" if not value else f"{what} {value!r} is not an integer"
        raise DataError(path, problem, fix, where=locate(row))
    return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False)


def _check_unique(
    path: Path, ids: np.ndarray, locate: Callable[[int], str], what: str, fix: str
) -> None:
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataError(path, f"{what} {int(ids[row])} appears twice", fix, where=locate(row))
