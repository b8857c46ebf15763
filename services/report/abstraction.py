"""The report of abstraction profiles (`actstore abstraction --report PATH.html`): models side by side.

The profile figure (per depth of the hierarchy, one bar per model: the share of its placed features there), the
table `actstore abstraction` prints, and for each model a few example features per depth with their level and top
images (services.report.index.feature_section, which shows the level of an index that has one).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from actstore.config import public_config
from actstore.errors import ConfigError
from services.abstraction import Abstraction, AbstractionConfig, profile_table
from services.api.reader import IndexReader
from services.report.index import feature_section
from services.report.page import Page, write_page
from services.report.plots import DPI, Plot

__all__ = ["abstraction_report", "examples", "profile_plot", "write_abstraction_report"]


def profile_plot(shares: Mapping[str, Sequence[float]], depths: Sequence[str], title: str) -> Plot:
    """Models side by side: per depth (a group), one bar per model, the share of its placed features at that depth
    (each model's bars sum to 1). Drawn as services.report.plots draws its figures (Agg canvas, no pyplot)."""
    fig = Figure(figsize=(max(6.4, 1.2 + 0.5 * len(depths) * max(len(shares), 1)), 3.8), dpi=DPI,
                 layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(shares), 1)
    x = np.arange(len(depths))
    for j, (model, share) in enumerate(shares.items()):
        padded = np.zeros(len(depths))
        padded[:len(share)] = share
        ax.bar(x - 0.4 + width * (j + 0.5), padded, width=width, label=model)
    ax.set_xticks(x, depths)
    ax.set(title=title, xlabel="depth in the hierarchy (0: its roots)", ylabel="share of placed features", ylim=(0, 1))
    ax.legend(fontsize=8, title="model")
    buf, canvas = io.BytesIO(), FigureCanvasAgg(fig)
    canvas.print_png(buf)
    w, h = canvas.get_width_height()
    return buf.getvalue(), (int(w), int(h)), {"depths": list(depths),
                                              "share": {m: list(map(float, s)) for m, s in shares.items()}}


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
