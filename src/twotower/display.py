"""Text the commands print: a metrics table and an item with its title.

Shared by ``twotower train``/``evaluate``/``recommend`` (``cli``) and ``twotower demo`` (``demo``),
so that both print the same table.
"""
from __future__ import annotations

METRIC_NAMES = ("recall", "ndcg", "hr", "precision", "mrr", "coverage", "tail_share", "popularity")


def format_metrics(rows: dict[str, dict[str, float]], ks: list[int]) -> str:
    """One column per entry of ``rows`` (e.g. ``valid``, ``test``), one line per ``metric@k`` that
    any column has, for the cut-offs ``ks``; a metric a column lacks prints as ``nan``."""
    cols = list(rows)
    lines = [f"{'metric':<16}" + "".join(f"{c:>12}" for c in cols)]
    for k in ks:
        for n in METRIC_NAMES:
            key = f"{n}@{k}"
            if any(key in r for r in rows.values()):
                lines.append(f"{key:<16}" + "".join(f"{rows[c].get(key, float('nan')):>12.4f}" for c in cols))
    return "\n".join(lines)


def item_label(run, item) -> str:
    """``item (title)`` when the run knows the item's title, else the raw id alone."""
    t = run.title(item)
    return f"{item} ({t})" if t else str(item)
