"""The report of abstraction profiles (`actstore abstraction --report PATH.html`): models side by side.

The profile figure (plots.profile_plot: per depth of the hierarchy, one bar per model, the share of its placed
features there), the table `actstore abstraction` prints, and for each model a few example features per depth with
their level and top images (services.report.index.feature_section, which shows the level of an index that has one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from actstore.config import public_config
from actstore.errors import ConfigError
from services.abstraction import Abstraction, AbstractionConfig, profile_table
from services.api.reader import IndexReader
from services.report.index import feature_section
from services.report.page import Page, write_page
from services.report.plots import profile_plot

__all__ = ["abstraction_report", "examples", "write_abstraction_report"]


def examples(depth: np.ndarray, share: np.ndarray, n: np.ndarray, at: int, count: int) -> np.ndarray:
    """Up to `count` features at depth `at`: those placed on the most labelled top images first, then by share,
    then by id."""
    ids = np.flatnonzero(depth == at)
    return ids[np.lexsort((ids, -share[ids], -n[ids]))][:count]


def abstraction_report(indexes: Mapping[str, str], examples_per_depth: int, images: int,
                       config: dict[str, Any]) -> Page:
    """The page for the indexes ({model name: index folder}), each with its abstraction profile written."""
    readers = {name: IndexReader(path) for name, path in indexes.items()}
    missing = [r.path for r in readers.values() if r.abstraction is None]
    if missing:
        raise ConfigError(f"{missing[0]}: no abstraction profile; run `actstore abstraction --index` on it first")
    profiles: dict[str, Abstraction] = {name: r.abstraction for name, r in readers.items() if r.abstraction}
    infos = {name: a.info for name, a in profiles.items()}
    first = next(iter(infos.values()))
    h = first["hierarchy"]
    facts: list[tuple[str, Any]] = [
        (f"model {name}", f"{i['backbone'].get('family')}:{i['backbone'].get('name')} layer {i['layer']}, "
                          f"{i['profile']['features']} features, top {i['k']} images each: {i['index']}")
        for name, i in infos.items()]
    facts += [("hierarchy", f"{h['source']}: {h.get('file') or ', '.join(h.get('columns') or [])}"),
              ("level", f"the deepest node holding at least {first['min_share']:g} of a feature's labelled top "
                        "images")]
    page = Page(f"Abstraction report: {len(infos)} model{'s' if len(infos) > 1 else ''}", "abstraction", facts,
                config)
    header, rows = profile_table(infos)
    depths = [r[0] for r in rows if r[0].startswith("depth ")]
    page.heading("Profiles")
    png, size, values = profile_plot({name: i["profile"]["share"] for name, i in infos.items()}, depths,
                                     "Where each model's features sit in the hierarchy")
    page.plot("abstraction-profile", png, size, "share of each model's placed features at each depth "
              "(deeper: more specific)", values)
    page.table(header, rows, table="profile")
    for name, a in profiles.items():
        page.heading(f"{name}: example features by depth (the depths where it has some)", model=name)
        for d, label in enumerate(depths):
            placed = int((a.depth == d).sum())
            if not placed:
                continue
            chosen = examples(a.depth, a.share, a.n, d, examples_per_depth)
            page.heading(f"{label}: {placed} features, {chosen.size} shown", level=3, model=name, depth=d)
            for fid in chosen.tolist():
                feature_section(page, readers[name], fid, images, label=f"{name} ", level=4)
    return page


def write_abstraction_report(cfg: AbstractionConfig, indexes: Mapping[str, str], out: str) -> str:
    """Build the report of the indexes ({model name: index folder}, each profiled) and write it to `out`."""
    page = abstraction_report(indexes, cfg.examples, cfg.images, public_config(cfg))
    write_page(page, out, cfg.overwrite, dict(cfg.storage_options) or None)
    return out
