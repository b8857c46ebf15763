"""One self-contained HTML page: inline CSS, PNGs inline as data: URIs, no script, nothing fetched; it opens from disk.

What each part shows is also written on it for machines (the tests, a later script): a plot's `<figure>` carries
`data-plot` and the numbers it drew as JSON in `data-values`; an image tile carries `data-feature` and
`data-image`. The `<meta name="generator">` marker is how `write_page` recognizes a report of ours, the only
existing file it replaces (and only when asked).
"""

from __future__ import annotations

import base64
import datetime
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec

from actstore.outputs import check_output
from actstore.store import filesystem, put_bytes

__all__ = ["GENERATOR", "MARKER", "Page", "Tile", "check_out", "data_uri", "tiles", "write_page"]

GENERATOR = "actstore report"
MARKER = f'<meta name="generator" content="{GENERATOR}">'
"""In every report's head; an existing file without it is never replaced."""
_HEAD_BYTES = 4096
"""How much of an existing file is read to find the marker (it is in the first lines)."""

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1360px; padding: 0 16px; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 16px; }
h1 { font-size: 22px; margin: 0 0 8px; } h2 { font-size: 18px; margin: 28px 0 8px; } h3 { font-size: 15px; margin: 16px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
figure.plot { display: inline-block; margin: 8px 16px 8px 0; vertical-align: top; }
figure.plot figcaption, figure.tile figcaption { color: #555; font-size: 12px; }
.tiles { display: flex; flex-wrap: wrap; gap: 6px; }
figure.tile { margin: 0; text-align: center; }
figure.tile img { display: block; }
.missing { display: flex; align-items: center; justify-content: center; background: #eee; color: #777;
           font-size: 11px; padding: 4px; box-sizing: border-box; }
.note { color: #8a4b00; background: #fff6e0; padding: 6px 10px; border-radius: 4px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; }
th { background: #f4f4f4; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 16px;
        border-top: 1px solid #ddd; padding-top: 6px; }
pre { background: #f6f6f6; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(frozen=True)
class Tile:
    """One image of a feature (a PNG of size x size), or why it could not be shown."""

    feature: int
    image: int
    caption: str
    size: int
    png: bytes | None = None
    missing: str | None = None

    def html(self) -> str:
        attrs = f'class="tile" data-feature="{self.feature}" data-image="{self.image}"'
        if self.png is None:
            body = (f'<div class="missing" style="width:{self.size}px;height:{self.size}px">'
                    f'image {self.image}: {_e(self.missing)}</div>')
        else:
            body = (f'<img src="{data_uri(self.png)}" width="{self.size}" height="{self.size}" '
                    f'alt="image {self.image}, feature {self.feature}">')
        return f"<figure {attrs}>{body}<figcaption>{_e(self.caption)}</figcaption></figure>"


class Page:
    """The report under construction: a header of facts, then sections of text, plots, tables and tiles."""

    def __init__(self, title: str, kind: str, facts: Sequence[tuple[str, Any]], config: dict[str, Any]) -> None:
        self.title, self.kind = title, kind
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        self.parts = [f"<header><h1>{_e(title)}</h1>", self._facts([*facts, ("written", when)]),
                      "<details><summary>report config</summary><pre>"
                      + _e(json.dumps(config, indent=1)) + "</pre></details></header>"]

    @staticmethod
    def _facts(facts: Iterable[tuple[str, Any]]) -> str:
        return '<dl class="facts">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"

    def heading(self, text: str, level: int = 2, **data: Any) -> None:
        self.parts.append(f"<h{level}{_data(data)}>{_e(text)}</h{level}>")

    def text(self, text: str, note: bool = False) -> None:
        self.parts.append(f'<p{" class=note" if note else ""}>{_e(text)}</p>')

    def facts(self, facts: Sequence[tuple[str, Any]]) -> None:
        self.parts.append(self._facts(facts))

    def plot(self, name: str, png: bytes, size: tuple[int, int], caption: str, values: dict[str, Any],
             **data: Any) -> None:
        """A figure: the PNG, its caption, and the numbers it shows (data-values, JSON)."""
        w, h = size
        self.parts.append(
            f'<figure class="plot" data-plot="{_e(name)}"{_data(data)} data-values="{_e(json.dumps(values))}">'
            f'<img src="{data_uri(png)}" width="{w}" height="{h}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], **data: Any) -> None:
        head = "".join(f"<th>{_e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
        self.parts.append(f"<table{_data(data)}><tr>{head}</tr>{body}</table>")

    def raw(self, markup: str) -> None:
        """Markup built by this package's helpers (Tile.html, tiles)."""
        self.parts.append(markup)

    def html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n" + MARKER + "\n"
                f'<meta name="report-kind" content="{_e(self.kind)}">\n<title>{_e(self.title)}</title>'
                f"<style>{_CSS}</style></head>\n<body data-kind=\"{_e(self.kind)}\">\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


def tiles(items: Iterable[Tile], **data: Any) -> str:
    """A wrapping row of tiles."""
    return f'<div class="tiles"{_data(data)}>' + "".join(t.html() for t in items) + "</div>"


def _data(data: dict[str, Any]) -> str:
    return "".join(f' data-{k.replace("_", "-")}="{_e(v)}"' for k, v in data.items())


def check_out(url: str, overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """`url` may be written: nothing is there, or a report of ours and `overwrite`; else a one-line ConfigError.
    Checked before the work starts, so a refused run costs nothing."""
    check_output(url, "an actstore report", _is_report, overwrite, storage_options, file=True)


def _is_report(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """A file with our MARKER in its head."""
    if not fs.isfile(path):
        return False
    with fs.open(path, "rb") as f:
        return MARKER.encode() in f.read(_HEAD_BYTES)


def write_page(page: Page, url: str, overwrite: bool, storage_options: dict[str, Any] | None = None) -> None:
    """Write the page whole (a temporary sibling renamed into place, locally), after check_out."""
    check_out(url, overwrite, storage_options)
    fs, path = filesystem(url, storage_options)
    put_bytes(fs, path, page.html().encode())
