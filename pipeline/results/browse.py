"""``maskray browse``: a web gallery of a segmentation output (Starlette), in the manner of
FiftyOne's app: cards of images drawn with their masks (``show.draw_image``, the drawing of
``maskray show``), filters (label, minimum score, status, a SQL WHERE over ``instances``), and
an image page listing its instances, each mask shown alone on hover and pinned on click.

How it stays fast over a million images: at start, the output's committed ``images`` rows and
its ``instances`` rows without the masks' RLE are copied, in one DuckDB statement each, into an
index (a DuckDB file in a private temporary folder, sorted by ``image_id``); every page query
runs there, with keyset paging on ``image_id`` (``after=``, ``before=``), so page 20,000
costs what page 1 does. A picture is drawn on demand from its shard's instances part (read
once for the whole page, ``PartCache``) and kept in an in-memory LRU of PNGs (``PictureCache``).
Nothing is ever written into the output.

The rules it keeps:

- It serves only the images that the output's ``images`` table names: a picture is asked for
  by ``image_id`` (an integer route), and its URI is read from the index, never from the client;
  no route serves a file or object by name.
- Queries, the user's WHERE filter included, run on a DuckDB connection opened read-only on
  the index, with file access switched off altogether (``enable_external_access``; the index's
  tables need none), no extension installed or loaded, the configuration locked, and a time
  limit; the filter must parse as one SQL expression (``check_where``): no statement (COPY,
  ATTACH, ...) can be written into it.
- Every text from the output (label names, URIs, error messages) is HTML-escaped, pages carry a
  Content-Security-Policy without external sources, requests naming another host are refused
  (DNS rebinding), and error text is redacted of the storage options' secrets, which never
  reach a page.
"""

from __future__ import annotations

import html
import io
import ipaddress
import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from maskray.pipeline.results.query import _committed_part_files, _duckdb_type, _quote
from maskray.pipeline.results.show import DEFAULT_MIN_SCORE, draw_image, label_colour, text_colour_on
from maskray.pipeline.segment.output import IMAGES, INSTANCES, SCHEMAS, part_path
from maskray.pipeline.storage import (
    MISSING,
    full_url,
    is_local,
    open_url,
    path_type,
    public_url,
    read_bytes,
    redact,
    secret_values,
)

PAGE_SIZE = 50
THUMBNAIL_SIZE = 320  # longest side of a card's picture, pixels
IMAGE_SIZE = 1024  # longest side of the image page's picture
MAX_PICTURE_SIZE = 2048
CACHE_BYTES = 256 * 1024**2  # PNGs kept in memory (a thumbnail is some 30-150 kB)
PART_CACHE_ENTRIES = 8  # instances parts kept decoded (a page's cards come from one or two shards)
QUERY_SECONDS = 20.0  # a filter running longer is interrupted
IMAGE_COLUMNS = ("image_id", "image_uri", "width", "height", "instances", "status", "error", "shard")
MASK_COLUMNS = ("mask_counts",)  # left out of the index: the pictures read them from the parts


class FilterError(ValueError):
    """A filter that cannot run (a bad WHERE, a score out of range)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) is this machine only: every address it resolves to
    is a loopback one."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%", 1)[0]).is_loopback for a in addresses)


def check_where(where: str) -> str:
    """``where`` as DuckDB reads it back, if it is one SQL expression (else FilterError): a
    statement (``; COPY ...``, ``ATTACH``) or a clause that closes the WHERE's parenthesis
    (``1) UNION SELECT (1``) does not parse as one."""
    import duckdb

    if not where.strip():
        raise FilterError("the WHERE filter is empty")
    try:
        expression = duckdb.SQLExpression(where)
    except duckdb.Error as error:
        raise FilterError(f"the WHERE filter is not one SQL expression: {_first_line(error)}") from None
    return str(expression)


def _first_line(error: BaseException) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


class PictureCache:
    """Bytes by key, the least recently used dropped past ``budget`` bytes; thread-safe."""

    def __init__(self, budget: int = CACHE_BYTES):
        self.budget, self.size, self._items, self._lock = budget, 0, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        return None

    def put(self, key, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                self.size -= len(self._items.pop(key))
            self._items[key] = value
            self.size += len(value)
            while self.size > self.budget and len(self._items) > 1:
                self.size -= len(self._items.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._items)


class PartCache:
    """The instances part of a shard, read whole once (a page's thumbnails mostly share one),
    as a pyarrow table; the least recently used of ``entries`` dropped; one read per part at a
    time."""

    def __init__(self, fs, output: str, entries: int = PART_CACHE_ENTRIES):
        self.fs, self.output, self.entries = fs, output, entries
        self._items: OrderedDict = OrderedDict()
        self._lock, self._reading = threading.Lock(), {}

    def get(self, shard: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        with self._lock:
            if shard in self._items:
                self._items.move_to_end(shard)
                return self._items[shard]
            reading = self._reading.setdefault(shard, threading.Lock())
        with reading:
            with self._lock:
                if shard in self._items:
                    return self._items[shard]
            path = part_path(self.output, INSTANCES, shard)
            url = full_url(self.fs, path) if not is_local(self.fs) else path
            try:
                data = read_bytes(self.fs, path, public_url(url))
            except MISSING:
                raise FileNotFoundError(f"{public_url(url)}: no such file (removed since browse started)") from None
            table = pq.read_table(pa.BufferReader(data), schema=SCHEMAS[INSTANCES])
            with self._lock:
                self._items[shard] = table
                self._reading.pop(shard, None)
                while len(self._items) > self.entries:
                    self._items.popitem(last=False)
            return table


def build_index(fs, output: str, database: str) -> None:
    """The DuckDB file ``database`` with the tables ``images`` (the committed images rows, and
    each one's ``shard``) and ``instances`` (the committed instances rows without the masks'
    RLE), sorted by ``image_id``, read through ``fs`` (DuckDB's own reader over fsspec)."""
    import duckdb

    con = duckdb.connect(database)
    try:
        if not is_local(fs):
            con.register_filesystem(fs)

        def source(table: str) -> str | None:
            committed, _ = _committed_part_files(fs, output, table)
            if not committed:
                return None
            urls = [full_url(fs, p) if not is_local(fs) else p for p in committed]
            return "[" + ", ".join(f"'{_quote(u)}'" for u in urls) + "]"

        def empty(table: str, columns) -> str:
            fields = {f.name: f for f in SCHEMAS[table]}
            return "SELECT " + ", ".join(
                f"CAST(NULL AS {_duckdb_type(fields[c].type) if c in fields else 'INTEGER'}) AS {c}"
                for c in columns) + " WHERE false"

        images = source(IMAGES)
        con.execute("CREATE TABLE images AS " + (
            f"SELECT {', '.join(IMAGE_COLUMNS[:-1])}, "
            rf"CAST(regexp_extract(filename, 'part-(\d+)\.parquet$', 1) AS INTEGER) AS shard "
            f"FROM read_parquet({images}, filename = true) ORDER BY image_id" if images else empty(IMAGES, IMAGE_COLUMNS)))
        instances = source(INSTANCES)
        kept = [f.name for f in SCHEMAS[INSTANCES] if f.name not in MASK_COLUMNS]
        con.execute("CREATE TABLE instances AS " + (
            f"SELECT {', '.join(kept)} FROM read_parquet({instances}) ORDER BY image_id, instance"
            if instances else empty(INSTANCES, kept)))
        con.execute("CREATE TABLE labels AS SELECT label_name, min(label) AS label, count(*) AS instances "
                    "FROM instances WHERE label_name IS NOT NULL GROUP BY 1 ORDER BY 1")
        con.execute("CHECKPOINT")
    finally:
        con.close()


def open_sandboxed(database: str, temporary: str):
    """A read-only DuckDB connection to ``database`` that can reach no file (its tables are its
    own), install or load no extension, and never change that (configuration locked)."""
    import duckdb

    con = duckdb.connect(database, read_only=True, config={"temp_directory": temporary})
    for setting in ("enable_external_access = false", "autoinstall_known_extensions = false",
                    "autoload_known_extensions = false", "lock_configuration = true"):
        con.execute("SET " + setting)
    return con


class Browser:
    """The queries and pictures behind the pages, over one output (its committed shards when
    the browser was made)."""

    def __init__(self, output_url: str, storage_options: Mapping[str, Any] | None = None, page_size: int = PAGE_SIZE):
        self.output_url, self.storage_options, self.page_size = output_url, storage_options, page_size
        self.where_shown = public_url(output_url)
        self._secrets = secret_values(storage_options)
        self.fs, self.output = open_url(output_url, storage_options)
        if path_type(self.fs, self.output) is None:
            raise FileNotFoundError(f"{self.where_shown}: no such output")
        self.folder = tempfile.mkdtemp(prefix="maskray-browse-")  # mode 0700: the index is the user's alone
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)
        import duckdb

        database = os.path.join(self.folder, "index.duckdb")
        try:
            build_index(self.fs, self.output, database)
        except duckdb.Error as error:
            self.close()
            from maskray.pipeline.errors import QueryError

            raise QueryError(self.redact(f"{self.where_shown}: DuckDB cannot read this output "
                                         f"({_first_line(error)})")) from None
        except BaseException:
            self.close()
            raise
        os.makedirs(os.path.join(self.folder, "spill"))
        self.con = open_sandboxed(database, os.path.join(self.folder, "spill"))
        self.cache, self.parts = PictureCache(), PartCache(self.fs, self.output)
        self.labels = [(name, label) for name, label, _ in self._sql("SELECT * FROM labels ORDER BY label_name")]
        [(self.total, self.errors)] = self._sql("SELECT count(*), count(*) FILTER (status = 'error') FROM images")
        [(self.total_instances,)] = self._sql("SELECT count(*) FROM instances")

    def close(self) -> None:
        con = getattr(self, "con", None)
        if con is not None:
            con.close()
            self.con = None
        self._finalizer()

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _sql(self, sql: str, params: list | None = None, timeout: float | None = None) -> list[tuple]:
        import duckdb

        timeout = QUERY_SECONDS if timeout is None else timeout
        cursor = self.con.cursor()  # one per call: requests run on several threads
        timer = threading.Timer(timeout, cursor.interrupt)
        timer.start()
        try:
            return cursor.execute(sql, params or []).fetchall()
        except duckdb.InterruptException:
            raise FilterError(f"the query ran longer than {timeout:g} s and was stopped") from None
        except duckdb.Error as error:
            raise FilterError(self.redact(_first_line(error))) from None
        finally:
            timer.cancel()
            cursor.close()

    def _matching(self, label: str, min_score: float, status: str, where: str) -> tuple[list[str], list]:
        """The conditions on ``images`` of a filter, and their parameters."""
        conditions, params = [], []
        if status:
            if status not in ("ok", "error"):
                raise FilterError(f"status must be ok or error, got {status!r}")
            conditions.append("status = ?")
            params.append(status)
        if label or where:
            inner, inner_params = ["score >= ?"], [min_score]
            if label:
                inner.append("label_name = ?")
                inner_params.append(label)
            if where:
                inner.append(f"({check_where(where)})")
            conditions.append("image_id IN (SELECT image_id FROM instances WHERE " + " AND ".join(inner) + ")")
            params += inner_params
        return conditions, params

    def page(self, label: str = "", min_score: float = DEFAULT_MIN_SCORE, status: str = "", where: str = "",
             after: int | None = None, before: int | None = None, limit: int | None = None) -> dict:
        """One page of matching images in image_id order: after ``after``, or else the page
        before ``before``, or else the first. ``cards`` (``images`` rows, each with ``labels``:
        its instances' (label_name, label, best score, count) scoring >= min_score), ``matches``
        (all the filter's images), ``first`` (the position of the page's first card, from 0),
        and whether pages come ``before`` and ``after`` it."""
        limit = self.page_size if limit is None else limit
        conditions, params = self._matching(label, min_score, status, where)
        where_sql = (" WHERE " + " AND ".join(conditions)) if conditions else ""
        [(matches,)] = self._sql("SELECT count(*) FROM images" + where_sql, params)
        keyset, order = [], "ASC"
        if after is not None:
            keyset, key = ["image_id > ?"], [after]
        elif before is not None:
            keyset, key, order = ["image_id < ?"], [before], "DESC"
        else:
            key = []
        sql = ("SELECT " + ", ".join(IMAGE_COLUMNS) + " FROM images"
               + (" WHERE " + " AND ".join(conditions + keyset) if conditions + keyset else "")
               + f" ORDER BY image_id {order} LIMIT {int(limit) + 1}")
        rows = self._sql(sql, params + key)
        further = len(rows) > limit
        rows = rows[:limit]
        if order == "DESC":
            rows.reverse()
        cards = [dict(zip(IMAGE_COLUMNS, r)) for r in rows]
        first = 0
        if cards:
            [(first,)] = self._sql("SELECT count(*) FROM images WHERE " + " AND ".join(conditions + ["image_id < ?"]),
                                   params + [cards[0]["image_id"]])
        ids = [c["image_id"] for c in cards if c["status"] == "ok"]
        chips: dict[int, list] = {}
        if ids:
            for image_id, name, lab, best, count in self._sql(
                    "SELECT image_id, label_name, min(label), max(score), count(*) FROM instances "
                    "WHERE image_id BETWEEN ? AND ? AND list_contains(?, image_id) AND score >= ? "
                    "GROUP BY 1, 2 ORDER BY 4 DESC", [min(ids), max(ids), ids, min_score]):
                chips.setdefault(image_id, []).append((name, lab, best, count))
        for c in cards:
            c["labels"] = chips.get(c["image_id"], [])
        return {"cards": cards, "matches": matches, "first": first,
                "before": bool(cards) and first > 0,
                "after": bool(cards) and (further if order == "ASC" else first + len(cards) < matches)}

    def image(self, image_id: int) -> dict | None:
        rows = self._sql("SELECT " + ", ".join(IMAGE_COLUMNS) + " FROM images WHERE image_id = ?", [image_id])
        return dict(zip(IMAGE_COLUMNS, rows[0])) if rows else None

    def instances(self, row: dict) -> list[dict]:
        """The instances rows of the image ``row`` (of ``image``), masks (``mask_counts``)
        included, by ``instance``; read from its shard's part, which the index names."""
        import pyarrow.compute as pc

        if row["status"] != "ok" or row["shard"] is None:
            return []
        table = self.parts.get(int(row["shard"]))
        return table.filter(pc.equal(table.column("image_id"), row["image_id"])).sort_by("instance").to_pylist()

    def picture(self, image_id: int, size: int, min_score: float, only: tuple[int, ...] | None = None) -> bytes | None:
        """The PNG of image ``image_id`` drawn with its instances scoring >= ``min_score`` (or only
        the instances ``only``), longest side at most ``size``; None when the images table names
        no such image, or one that could not be segmented."""
        key = (image_id, size, min_score, only)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        row = self.image(image_id)
        if row is None or row["status"] != "ok":
            return None
        rows = self.instances(row)
        rows = [r for r in rows if r["instance"] in only] if only is not None else \
            [r for r in rows if r["score"] >= min_score]
        picture = draw_image(row["image_uri"], rows, self.storage_options, scale=None, max_size=size)
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
        self.cache.put(key, data)
        return data


# Pages ------------------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: dark; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; background: #16181d; color: #e4e6eb; }
a { color: #ff8c42; }
header { display: flex; gap: 16px; align-items: center; padding: 10px 18px; background: #20232a;
         border-bottom: 1px solid #2e323b; flex-wrap: wrap; }
header h1 { font-size: 17px; margin: 0 6px 0 0; }
header h1 a { color: #ff8c42; text-decoration: none; }
header .where { color: #9aa0aa; font-size: 12px; }
form { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; }
input, select, button { background: #2b2f38; color: #e4e6eb; border: 1px solid #3b404b; border-radius: 6px;
         padding: 5px 8px; font: inherit; }
button { background: #ff8c42; color: #16181d; border: none; font-weight: 600; cursor: pointer; }
.summary { padding: 10px 18px 0; color: #9aa0aa; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: 14px; padding: 14px 18px; }
.card { background: #20232a; border: 1px solid #2e323b; border-radius: 10px; overflow: hidden;
        text-decoration: none; color: inherit; display: flex; flex-direction: column; }
.card:hover { border-color: #ff8c42; }
.card .pic { aspect-ratio: 4 / 3; background: #0f1115; overflow: hidden; }
.card .pic img { display: block; width: 100%; height: 100%; object-fit: contain; }
.card .meta { padding: 8px 10px; }
.card .name { font-size: 12px; color: #9aa0aa; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin-top: 6px; }
.chip { border-radius: 10px; padding: 1px 8px; font-size: 12px; font-weight: 600; white-space: nowrap; }
.chip small { font-weight: 400; opacity: 0.8; }
.card.error .pic { color: #ff6b6b; padding: 12px; font-size: 13px; text-align: center; overflow-wrap: anywhere;
                   display: flex; align-items: center; justify-content: center; box-sizing: border-box; }
.status-error { color: #ff6b6b; }
.pager { padding: 0 18px 24px; display: flex; gap: 16px; }
.problem { margin: 18px; padding: 10px 14px; background: #3a1f24; border: 1px solid #ff6b6b; border-radius: 8px; }
.viewer { display: flex; gap: 18px; padding: 18px; align-items: flex-start; flex-wrap: wrap; }
.viewer img { max-width: min(1024px, 100%); border-radius: 8px; background: #0f1115; }
.viewer .side { flex: 1 1 360px; min-width: 320px; }
.viewer .side p { margin-top: 0; color: #9aa0aa; }
table { border-collapse: collapse; min-width: 320px; }
td, th { padding: 5px 10px; border-bottom: 1px solid #2e323b; text-align: left; }
tr.instance { cursor: pointer; }
tr.instance:hover, tr.instance.on { background: #2b2f38; }
tr.instance.on td:first-child { box-shadow: inset 3px 0 #ff8c42; }
.empty { padding: 40px; color: #9aa0aa; }
"""


def _e(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _chip(name, label, score=None, count: int = 1) -> str:
    colour = label_colour(label)
    text = _e(name if name is not None else label) + (f" {score:.2f}" if score is not None else "")
    text += f" <small>&times;{count}</small>" if count > 1 else ""
    return f'<span class="chip" style="background:{colour};color:{text_colour_on(colour)}">{text}</span>'


def _document(title: str, body: str) -> str:
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body>{body}</body></html>")


def _header(browser: Browser, extra: str = "") -> str:
    return (f'<header><h1><a href="/">maskray browse</a></h1><span class="where">{_e(browser.where_shown)}</span>'
            f"{extra}</header>")


def _int(text: str | None, name: str) -> int | None:
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise FilterError(f"{name} must be a whole number, got {text!r}") from None


def score_param(text: str | None) -> float:
    if text in ("", None):
        return DEFAULT_MIN_SCORE
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise FilterError(f"min_score must be a number between 0 and 1, got {text!r}")
    return value


def gallery_html(browser: Browser, params: Mapping[str, str]) -> tuple[str, int]:
    label, status, where = params.get("label", ""), params.get("status", ""), params.get("where", "").strip()
    problem, page, min_score = None, {"cards": [], "matches": 0, "first": 0, "before": False, "after": False}, \
        DEFAULT_MIN_SCORE
    try:
        min_score = score_param(params.get("min_score"))
        page = browser.page(label, min_score, status, where, _int(params.get("after"), "after"),
                            _int(params.get("before"), "before"))
    except FilterError as error:
        problem = str(error)
    cards = page["cards"]
    options = "".join(f'<option value="{_e(n)}"{" selected" if n == label else ""}>{_e(n)}</option>'
                      for n, _ in browser.labels)
    statuses = "".join(f'<option value="{v}"{" selected" if v == status else ""}>{t}</option>'
                       for v, t in (("", "any status"), ("ok", "ok"), ("error", "error")))
    form = (f'<form method="get" action="/"><select name="label" aria-label="label">'
            f'<option value="">all labels</option>{options}</select>'
            f'<label>score &ge; <input name="min_score" type="number" step="0.05" min="0" max="1" '
            f'value="{min_score:g}" style="width:70px"></label><select name="status" aria-label="status">{statuses}</select>'
            f'<input name="where" aria-label="SQL WHERE over instances" '
            f'placeholder="SQL WHERE over instances, e.g. area &gt; 500" value="{_e(where)}" style="width:320px">'
            f'<button type="submit">Filter</button></form>')
    keep = {k: v for k, v in (("label", label), ("min_score", "" if min_score == DEFAULT_MIN_SCORE else f"{min_score:g}"),
                              ("status", status), ("where", where)) if v != ""}
    items = []
    for c in cards:
        image_id = int(c["image_id"])
        link = f"/image/{image_id}" + (f"?{urlencode({'min_score': f'{min_score:g}'})}" if "min_score" in keep else "")
        name = _e(c["image_uri"].rsplit("/", 1)[-1])
        if c["status"] == "ok":
            thumb = f"/picture/{image_id}.png?" + urlencode({"size": THUMBNAIL_SIZE, "min_score": f"{min_score:g}"})
            chips = "".join(_chip(n, lab, best, count) for n, lab, best, count in c["labels"])
            items.append(f'<a class="card" href="{link}" data-image-id="{image_id}"><div class="pic">'
                         f'<img loading="lazy" src="{thumb}" alt="{name}"></div><div class="meta">'
                         f'<div class="name" title="{_e(c["image_uri"])}">{name}</div>'
                         f'<div>{c["width"]}&times;{c["height"]} &middot; {c["instances"]} instances</div>'
                         f'<div class="chips">{chips}</div></div></a>')
        else:
            items.append(f'<a class="card error" href="{link}" data-image-id="{image_id}"><div class="pic">'
                         f'{_e(browser.redact(c["error"] or "error"))}</div><div class="meta">'
                         f'<div class="name" title="{_e(c["image_uri"])}">{name}</div>'
                         f'<div class="status-error">error</div></div></a>')
    pager = []
    if page["before"]:
        pager.append(f'<a href="/?{urlencode(keep)}">&laquo; first</a>')
        pager.append(f'<a rel="prev" href="/?{urlencode({**keep, "before": cards[0]["image_id"]})}">&larr; previous</a>')
    if page["after"]:
        pager.append(f'<a rel="next" href="/?{urlencode({**keep, "after": cards[-1]["image_id"]})}">next &rarr;</a>')
    shown = (f'images {page["first"] + 1}&ndash;{page["first"] + len(cards)} of {page["matches"]:,} matching'
             if cards else f'0 of {page["matches"]:,} matching')
    summary = (f'<div class="summary">{shown} &middot; the output: {browser.total:,} images '
               f'({browser.errors:,} errors), {browser.total_instances:,} instances</div>')
    body = (_header(browser, form)
            + (f'<div class="problem">{_e(problem)}</div>' if problem else summary)
            + (f'<div class="grid">{"".join(items)}</div>' if items else
               ('' if problem else '<div class="empty">no images match</div>'))
            + f'<div class="pager">{" ".join(pager)}</div>')
    return _document(f"maskray browse: {len(cards)} cards", body), 400 if problem else 200


def image_html(browser: Browser, image_id: int, params: Mapping[str, str], nonce: str) -> tuple[str, int]:
    row = browser.image(image_id)
    if row is None:
        return _document("no such image", _header(browser)
                         + f'<div class="problem">no image {image_id} in this output</div>'), 404
    min_score = score_param(params.get("min_score"))
    uri = _e(row["image_uri"])
    header = _header(browser, f'<span class="where">{uri}</span>')
    if row["status"] != "ok":
        return _document(f"{row['image_uri']}: error", header
                         + f'<div class="problem">could not be segmented: {_e(browser.redact(row["error"] or ""))}</div>'), 200
    instances = [r for r in browser.instances(row) if r["score"] >= min_score]
    base = f"/picture/{image_id}.png?" + urlencode({"size": IMAGE_SIZE, "min_score": f"{min_score:g}"})
    rows = "".join(f'<tr class="instance" data-instance="{int(r["instance"])}"><td>{int(r["instance"])}</td>'
                   f'<td>{_chip(r["label_name"], r["label"])}</td><td>{r["score"]:.3f}</td><td>{int(r["area"] or 0)}</td>'
                   f'<td>{r["box_x1"]:.0f}, {r["box_y1"]:.0f}, {r["box_x2"]:.0f}, {r["box_y2"]:.0f}</td></tr>'
                   for r in instances)
    script = f"""<script nonce="{nonce}">
const base = {_js(base)}, pinned = new Set(), picture = document.getElementById("picture");
function show(ids) {{ picture.src = ids.length ? base + "&only=" + ids.join(",") : base;
  picture.dataset.shown = ids.join(","); }}
document.querySelectorAll("tr.instance").forEach(tr => {{
  const id = tr.dataset.instance;
  tr.addEventListener("mouseenter", () => show([id]));
  tr.addEventListener("mouseleave", () => show([...pinned]));
  tr.addEventListener("click", () => {{ pinned.has(id) ? pinned.delete(id) : pinned.add(id);
    tr.classList.toggle("on", pinned.has(id)); show([...pinned]); }});
}});
</script>"""
    body = (header + f'<div class="viewer"><img id="picture" src="{base}" alt="{uri}" data-shown=""><div class="side">'
            f'<p>{row["width"]}&times;{row["height"]} &middot; {len(instances)} instances scoring &ge; {min_score:g}'
            f' &middot; hover an instance to see its mask alone, click to pin it</p>'
            f'<table><tr><th>#</th><th>label</th><th>score</th><th>area</th><th>box x1, y1, x2, y2</th></tr>{rows}</table>'
            f'</div></div>{script}')
    title = f"maskray browse: {row['image_uri'].rsplit('/', 1)[-1]}: {len(instances)} instances"
    return _document(title, body), 200


def _js(text: str) -> str:
    return json.dumps(text).replace("<", "\\u003c")


class GuardMiddleware:
    """Refuses requests whose Host is not one this server answers to (a DNS-rebinding page
    would name its own) and puts the security headers on every response."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import PlainTextResponse

        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1").lower()
        name = host.rsplit("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if self.allowed_hosts is not None and name not in self.allowed_hosts:
            return await PlainTextResponse("unknown host", 400)(scope, receive, send)
        nonce = secrets.token_urlsafe(16)
        scope["maskray.nonce"] = nonce
        policy = (f"default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; "
                  "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", policy.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def allowed_hosts_for(host: str, port: int | None = None) -> set[str] | None:
    """The Host names a server bound to ``host`` answers to: the loopback names for a loopback
    address (and ``host`` itself); None (any) for another address, reached by names unknown here."""
    if not is_loopback(host):
        return None
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return {"127.0.0.1", "localhost", "[::1]", shown.lower()}


def make_app(browser: Browser, allowed_hosts: set[str] | None = frozenset({"127.0.0.1", "localhost", "[::1]"})):
    """The Starlette app serving ``browser``'s pages; only GET routes, none of them naming a file."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.responses import HTMLResponse, Response
    from starlette.routing import Route

    def gallery(request):
        text, status = gallery_html(browser, request.query_params)
        return HTMLResponse(text, status)

    def image(request):
        try:
            text, status = image_html(browser, request.path_params["image_id"], request.query_params,
                                      request.scope["maskray.nonce"])
        except (FilterError, OSError) as error:
            text = _document("cannot show this image", _header(browser)
                             + f'<div class="problem">{_e(browser.redact(str(error)))}</div>')
            status = 400 if isinstance(error, FilterError) else 404
        return HTMLResponse(text, status)

    def picture(request):
        params = request.query_params
        try:
            size = min(max(_int(params.get("size"), "size") or THUMBNAIL_SIZE, 16), MAX_PICTURE_SIZE)
            min_score = score_param(params.get("min_score"))
            only = tuple(sorted({int(i) for i in params["only"].split(",") if i})) if params.get("only") else None
            data = browser.picture(request.path_params["image_id"], size, min_score, only)
        except ValueError as error:  # a bad parameter
            return Response(browser.redact(str(error)), 400, media_type="text/plain")
        except OSError as error:  # the image (or its part) gone from storage, or unreadable
            return Response(browser.redact(str(error)), 404, media_type="text/plain")
        if data is None:
            return Response("no such image", 404, media_type="text/plain")
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return Starlette(routes=[
        Route("/", gallery, methods=["GET"]),
        Route("/image/{image_id:int}", image, methods=["GET"]),
        Route("/picture/{image_id:int}.png", picture, methods=["GET"]),
    ], middleware=[Middleware(GuardMiddleware, allowed_hosts=allowed_hosts)])
