"""Text the commands print: a metrics table and an item with its title.

Shared by ``twotower train``/``evaluate``/``recommend`` (``cli``) and ``twotower demo`` (``demo``),
so that both print the same table.
"""
from __future__ import annotations

METRIC_NAMES = ("recall", "ndcg", "hr", "precision", "mrr", "coverage", "tail_share", "popularity")
# a cold split's groups (config.COLD_GROUPS) and the metrics shown for each
GROUP_METRICS = ("recall", "ndcg")


def format_metrics(rows: dict[str, dict[str, float]], ks: list[int]) -> str:
    """One column per entry of ``rows`` (e.g. ``valid``, ``test``), one line per ``metric@k`` that
    any column has, for the cut-offs ``ks``; a metric a column lacks prints as ``nan``."""
    from .config import COLD_GROUPS

    cols = list(rows)
    keys = [f"{n}@{k}" for k in ks for n in METRIC_NAMES]
    # a cold split's warm and cold columns (cold_items/recall@20, ...) after the plain metrics
    keys += [f"{g}/{n}@{k}" for g in COLD_GROUPS for k in ks for n in GROUP_METRICS]
    width = max([16] + [len(key) + 2 for key in keys if any(key in r for r in rows.values())])
    lines = [f"{'metric':<{width}}" + "".join(f"{c:>12}" for c in cols)]
    for key in keys:
        if any(key in r for r in rows.values()):
            lines.append(f"{key:<{width}}" + "".join(f"{rows[c].get(key, float('nan')):>12.4f}" for c in cols))
    return "\n".join(lines)


def item_label(run, item) -> str:
    """``item (title)`` when the run knows the item's title, else the raw id alone."""
    t = run.title(item)
    return f"{item} ({t})" if t else str(item)
