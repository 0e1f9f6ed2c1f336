"""``maskray browse``: the results browser, with real parts throughout.

The output is made by ``maskray segment`` itself (the demo model, a local Ray cluster on
127.0.0.1) over synthetic shapes and one broken file; the server is the ``maskray browse``
command (uvicorn on 127.0.0.1, port 0); pages are checked against DuckDB's own answers over the
output and pictures against ``maskray show``'s drawing, pixel for pixel. Then the security rules
(only images the ``images`` table names, a sandboxed read-only SQL filter, no credentials on
any page), a bucket output on the loopback S3 server, the one-line mistakes, and headless
Chromium (Debian's package, ``make browser``) driving the gallery, a label filter and an image
page, each screenshot checked (``MASKRAY_BROWSE_SCREENSHOTS=DIR`` keeps them).
"""

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskray.jobs.cli import main
from maskray.pipeline.results import browse
from maskray.pipeline.results.browse import Browser, allowed_hosts_for, check_where, is_loopback
from maskray.pipeline.results.query import connect
from maskray.pipeline.results.show import draw_image, render_overlay
from maskray.pipeline.train.shapes import write_shapes
from tests.test_user_errors import WEIGHTS, one_line

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
PAGE = 4  # cards per page in these tests (--page-size): several pages of the 11 images


def start_ray():
    import ray

    if not ray.is_initialized():
        from maskray.pipeline.cluster import loopback_only
        from tests.services import RAY_TEST_OPTIONS

        loopback_only()
        ray.init(address="local", **RAY_TEST_OPTIONS)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory) -> Path:
    """``maskray segment`` over ten synthetic shapes images and one broken file, in shards of 4."""
    start_ray()
    root = tmp_path_factory.mktemp("browse")
    write_shapes(str(root / "set"), count=10, seed=7)
    (root / "set" / "images" / "broken.png").write_bytes(b"<html>not an image</html>")
    output = root / "out"
    assert main(["segment", str(root / "set" / "images"), str(output), "--weights", WEIGHTS, "--shard-size", "4",
                 "--no-progress"]) == 0
    return output


def sql(output, query: str, options=None, params=None) -> list[tuple]:
    """DuckDB's own answer over the output (``maskray query``'s views)."""
    return connect(str(output), options).execute(query, params or []).fetchall()


@contextmanager
def serving(output, *extra: str, env: dict | None = None):
    """``maskray browse OUTPUT --port 0 ...`` as a process; yields (its base URL, the process).
    Stopped with SIGINT (Ctrl-C), after which it must say so in one line and exit 130."""
    command = [sys.executable, "-m", "maskray.jobs.browse", str(output), "--port", "0", *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})}, cwd=REPO)
    try:
        line = process.stdout.readline()
        found = re.search(r" at (http://\S+/) \(Ctrl-C to stop\)", line)
        assert found, f"no serving line: {line!r}; stderr: {process.stderr.read() if process.poll() is not None else ''}"
        yield found.group(1), process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 130, (process.returncode, err)
    assert err.strip().splitlines()[-1] == "maskray browse: interrupted: stopped by Ctrl-C", err
    assert "Traceback" not in err


def client(base: str):
    import httpx

    return httpx.Client(base_url=base, timeout=60)


def card_ids(html: str) -> list[int]:
    return [int(i) for i in re.findall(r'class="card[^"]*" href="[^"]*" data-image-id="(\d+)"', html)]


def link(html: str, rel: str) -> str | None:
    found = re.search(rf'<a rel="{rel}" href="([^"]+)"', html)
    return unescape(found.group(1)) if found else None


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# The pages over a local output ---------------------------------------------------------------


def test_gallery_filters_and_paging_agree_with_duckdb(segmented):
    all_ids = [r[0] for r in sql(segmented, "SELECT image_id FROM images ORDER BY image_id")]
    assert len(all_ids) == 11
    with serving(segmented, "--page-size", str(PAGE)) as (base, _), client(base) as http:
        # Every image once, in image_id order, page by page; then back again.
        pages, url = [], "/"
        while url:
            page = http.get(url)
            assert page.status_code == 200
            pages.append(page.text)
            url = link(page.text, "next")
        assert [len(card_ids(p)) for p in pages] == [4, 4, 3]
        assert [i for p in pages for i in card_ids(p)] == all_ids
        assert "images 9&ndash;11 of 11 matching" in pages[-1]
        previous = http.get(link(pages[-1], "prev")).text
        assert card_ids(previous) == card_ids(pages[1])

        # A label (with the default minimum score 0.5), then a stricter score.
        label = sql(segmented, "SELECT label_name FROM instances WHERE score >= 0.5 GROUP BY 1 ORDER BY count(*) DESC")[0][0]
        [(best,)] = sql(segmented, "SELECT max(score) FROM instances WHERE label_name = ?", params=[label])
        for score in (0.5, np.floor(best * 100) / 100):  # the best of them alone passes the second
            expected = [r[0] for r in sql(segmented, "SELECT DISTINCT image_id FROM instances WHERE label_name = ? "
                                          "AND score >= ? ORDER BY 1", params=[label, score])]
            got, url = [], f"/?label={label}&min_score={score:g}"
            while url:
                text = http.get(url).text
                got += card_ids(text)
                assert re.search(rf'<option value="{label}" selected>', text)
                url = link(text, "next")
            assert got == expected and got, (score, got, expected)

        # The error rows, with their messages.
        [(bad_id, error)] = sql(segmented, "SELECT image_id, error FROM images WHERE status = 'error'")
        text = http.get("/?status=error").text
        assert card_ids(text) == [bad_id]
        assert unescape(re.search(r'class="card error"[^>]*><div class="pic">([^<]*)<', text).group(1)) == error
        assert "broken.png" in text
        assert len(card_ids(http.get("/?status=ok").text)) == PAGE

        # A SQL WHERE over the instances.
        where = "area > 1500 AND box_x1 < 80"
        expected = [r[0] for r in sql(segmented, f"SELECT DISTINCT image_id FROM instances WHERE {where} "
                                      "AND score >= 0.5 ORDER BY 1")][:PAGE]
        assert card_ids(http.get("/", params={"where": where}).text) == expected
        nothing = http.get("/", params={"where": "score > 2"})
        assert nothing.status_code == 200 and card_ids(nothing.text) == [] and "no images match" in nothing.text
        wrong = http.get("/", params={"where": "no_such_column > 1"})
        assert wrong.status_code == 400 and "no_such_column" in wrong.text and card_ids(wrong.text) == []
        assert http.get("/?min_score=2").status_code == 400
        assert http.get("/?after=x").status_code == 400


def test_pictures_are_maskray_shows_drawing(segmented):
    [(image_id, uri)] = sql(segmented, "SELECT image_id, image_uri FROM images WHERE status = 'ok' "
                                       "ORDER BY instances DESC, image_id LIMIT 1")
    instances = sql(segmented, "SELECT instance, label_name, score FROM instances WHERE image_id = ? AND score >= 0.5 "
                               "ORDER BY instance", params=[image_id])
    assert len(instances) >= 2
    with serving(segmented) as (base, _), client(base) as http:
        page = http.get(f"/image/{image_id}")
        assert page.status_code == 200
        rows = re.findall(r'<tr class="instance" data-instance="(\d+)"><td>\d+</td><td><span[^>]*>([^<]*)</span></td>'
                          r'<td>([\d.]+)</td>', page.text)
        assert [(int(i), name, round(float(s), 3)) for i, name, s in rows] == \
            [(i, name, round(s, 3)) for i, name, s in instances]

        # The image page's picture and a thumbnail are show's drawing at their size.
        for size in (browse.IMAGE_SIZE, browse.THUMBNAIL_SIZE):
            served = http.get(f"/picture/{image_id}.png", params={"size": size, "min_score": 0.5})
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            shown, _ = render_overlay(str(segmented), uri, min_score=0.5, max_size=size)
            assert np.array_equal(png(served.content), np.asarray(shown.convert("RGB")))
        # One instance alone (hover), and two (pinned): show's drawing of those instances only.
        con = connect(str(segmented))
        relation = con.execute("SELECT * FROM instances WHERE image_id = ? ORDER BY instance", [image_id])
        rows = [dict(zip([d[0] for d in relation.description], r)) for r in relation.fetchall()]
        everything = png(http.get(f"/picture/{image_id}.png", params={"size": 1024}).content)
        for only in ([1], [0, 1]):
            alone = http.get(f"/picture/{image_id}.png", params={"size": 1024, "only": ",".join(map(str, only))})
            drawn = draw_image(uri, [r for r in rows if r["instance"] in only], max_size=1024)
            assert np.array_equal(png(alone.content), np.asarray(drawn.convert("RGB")))
            assert not np.array_equal(png(alone.content), everything)
        assert http.get(f"/picture/{image_id}.png", params={"only": "x"}).status_code == 400
        # The broken image's page says why; it has no picture.
        [(bad_id,)] = sql(segmented, "SELECT image_id FROM images WHERE status = 'error'")
        assert "not an image" in http.get(f"/image/{bad_id}").text
        assert http.get(f"/picture/{bad_id}.png").status_code == 404


def test_the_index_reads_masks_from_the_parts(segmented):
    """The picture's instances (masks included) are the output's rows of that image, exactly."""
    browser = Browser(str(segmented))
    try:
        for image_id, uri in sql(segmented, "SELECT image_id, image_uri FROM images WHERE status = 'ok'"):
            rows = browser.instances(browser.image(image_id))
            expected = sql(segmented, "SELECT instance, label, score, mask_counts FROM instances WHERE image_id = ? "
                                      "ORDER BY instance", params=[image_id])
            assert [(r["instance"], r["label"], r["score"], r["mask_counts"]) for r in rows] == expected
            assert all(r["image_uri"] == uri for r in rows)
        assert browser.total == 11 and browser.errors == 1
        assert browser.total_instances == sql(segmented, "SELECT count(*) FROM instances")[0][0]
    finally:
        browser.close()
    assert not os.path.exists(browser.folder)  # the index is removed with the browser


# Security --------------------------------------------------------------------------------------


def test_only_images_of_the_images_table_are_served(segmented, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "red").save(secret)
    [(max_id,)] = sql(segmented, "SELECT max(image_id) FROM images")
    with serving(segmented) as (base, _), client(base) as http:
        for path in [f"/picture/{max_id + 1}.png", "/picture/-1.png", f"/image/{max_id + 1}", "/image/-1",
                     f"/picture/{secret}", f"/picture/file://{secret}", "/picture/..%2F..%2Fetc%2Fpasswd",
                     "/picture/../../etc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd",
                     f"/static/{secret.name}", "/picture/0.png/../../../etc/passwd", "/picture/0x1.png"]:
            answer = http.get(path)
            assert answer.status_code == 404, (path, answer.status_code)
            assert answer.headers.get("content-type", "").split(";")[0] != "image/png"
        # Naming a file in the query changes nothing: image 0 is image 0.
        plain = http.get("/picture/0.png").content
        assert http.get("/picture/0.png", params={"uri": f"file://{secret}", "path": str(secret)}).content == plain
        assert http.post("/picture/0.png").status_code == 405
        assert http.put("/").status_code == 405
        # A page that names another host (DNS rebinding) is refused; the pages keep to themselves.
        assert http.get("/", headers={"host": "evil.example:80"}).status_code == 400
        page = http.get("/")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "img-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("where, says", [
    ("1) UNION ALL SELECT * FROM instances WHERE (1", "not one SQL expression"),
    ("true; COPY (SELECT 1) TO 'out.csv'", "not one SQL expression"),
    ("true; ATTACH 'x.db' AS x", "not one SQL expression"),
    ("true; CREATE TABLE t AS SELECT 1", "not one SQL expression"),
    ("(SELECT count(*) FROM read_parquet('{other}')) > 0", "file system operations are disabled"),
    ("(SELECT count(*) FROM read_parquet('{part}')) > 0", "file system operations are disabled"),
    ("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0", "file system operations are disabled"),
    ("(SELECT count(*) FROM query('COPY (SELECT 1) TO ''{written}''')) > 0", "single SELECT"),
    ("(SELECT count(*) FROM query('ATTACH ''{written}'' AS x')) > 0", "single SELECT"),
])
def test_sql_filters_cannot_read_elsewhere_or_write(segmented, tmp_path, where, says):
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image_id": [0]}), other)
    part = sorted((segmented / "instances").glob("*.parquet"))[0]
    written = tmp_path / "written.csv"
    before = sorted(p.name for p in segmented.rglob("*"))
    where = where.format(other=other, part=part, written=written)
    browser = Browser(str(segmented))
    try:
        with pytest.raises(browse.FilterError, match=says):
            browser.page(where=where)
        # The connection itself is read-only, reaches no file, and cannot be unlocked.
        for statement in ["CREATE TABLE t (a INTEGER)", "INSERT INTO images (image_id) VALUES (99)",
                          f"COPY images TO '{written}'", f"ATTACH '{tmp_path / 'x.db'}' AS x",
                          "SET enable_external_access = true", "INSTALL httpfs", "LOAD httpfs"]:
            with pytest.raises(browse.FilterError):
                browser._sql(statement)
    finally:
        browser.close()
    assert not written.exists() and not (tmp_path / "x.db").exists()
    assert sorted(p.name for p in segmented.rglob("*")) == before


def test_a_filter_that_runs_too_long_is_stopped(segmented, monkeypatch):
    monkeypatch.setattr(browse, "QUERY_SECONDS", 0.5)
    browser = Browser(str(segmented))
    try:
        started = time.monotonic()
        with pytest.raises(browse.FilterError, match="longer than 0.5 s"):
            browser.page(where="(SELECT count(*) FROM range(1000000000000) t(x) WHERE x % 7 = 1) > 0")
        assert time.monotonic() - started < 10
        assert browser.page()["matches"] == 11  # and the browser goes on
    finally:
        browser.close()


def test_check_where_takes_one_expression_only():
    assert check_where("label_name = 'a--b' AND score > 0.5") == "label_name = 'a--b' AND score > 0.5"
    for bad in ["", "1) OR (1", "a; b", "SELECT 1", "true) UNION SELECT (1"]:
        with pytest.raises(browse.FilterError):
            check_where(bad)


def test_hosts():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "8.8.8.8", "no-such-host.invalid"))
    assert allowed_hosts_for("127.0.0.1") == {"127.0.0.1", "localhost", "[::1]"}
    assert allowed_hosts_for("0.0.0.0") is None  # reached by names unknown here: any, after the warning


def test_it_listens_on_loopback_only(segmented):
    import psutil

    with serving(segmented) as (base, process):
        assert base.startswith("http://127.0.0.1:")
        listening = [c for c in psutil.Process(process.pid).net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    with serving(segmented, "--host", "localhost") as (base, process):
        assert client(base).get("/").status_code == 200


# A bucket output ------------------------------------------------------------------------------


@pytest.mark.slow
def test_bucket_output_and_no_credentials_on_any_page(s3, tmp_path):
    fs = s3.filesystem()
    write_shapes(str(tmp_path / "set"), count=5, seed=3)
    for image in sorted((tmp_path / "set" / "images").iterdir()):
        fs.put_file(str(image), f"{s3.name}/photos/{image.name}")
    fs.pipe_file(f"{s3.name}/photos/empty.png", b"")
    options_file = tmp_path / "s3.json"
    options_file.write_text(json.dumps(s3.storage_options))
    start_ray()
    assert main(["segment", s3.url("photos"), s3.url("out"), "--weights", WEIGHTS, "--shard-size", "3",
                 "--no-progress", "--storage-options", f"@{options_file}"]) == 0
    options = s3.storage_options
    ids = [r[0] for r in sql(s3.url("out"), "SELECT image_id FROM images ORDER BY 1", options)]
    [(ok_id, uri)] = sql(s3.url("out"), "SELECT image_id, image_uri FROM images WHERE status = 'ok' "
                                        "ORDER BY image_id LIMIT 1", options)
    assert uri.startswith(f"s3://{s3.name}/photos/")
    secrets = [options["key"], options["secret"]]
    served = []
    with serving(s3.url("out"), "--storage-options", f"@{options_file}") as (base, _), client(base) as http:
        gallery = http.get("/")
        assert card_ids(gallery.text) == ids
        served.append(gallery)
        for image_id in ids:
            served.append(http.get(f"/image/{image_id}"))
        thumb = http.get(f"/picture/{ok_id}.png")
        assert thumb.status_code == 200
        shown, _ = render_overlay(s3.url("out"), uri, options, min_score=0.5, max_size=browse.THUMBNAIL_SIZE)
        assert np.array_equal(png(thumb.content), np.asarray(shown.convert("RGB")))
        served += [thumb, http.get("/?status=error"), http.get("/", params={"where": "nonsense ("}),
                   http.get("/", params={"where": f"(SELECT 1 FROM read_parquet('s3://{s3.name}/out/images/x')) = 1"})]
        # An image deleted since: its picture is a 404 that names it, without the credentials.
        fs.rm(uri.removeprefix("s3://"))
        gone = http.get(f"/picture/{ok_id}.png", params={"size": 100})
        assert gone.status_code == 404 and "no such file" in gone.text
        served.append(gone)
    for answer in served:
        everything = answer.content + repr(answer.headers).encode()
        for secret in secrets:
            assert secret.encode() not in everything, answer.url


# Mistakes ------------------------------------------------------------------------------------------


def test_bad_outputs_and_ports_are_one_line(segmented, tmp_path, capsys):
    assert main(["browse", str(tmp_path / "nothing")]) == 2
    assert "nothing" in one_line(capsys, "browse")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("x")
    assert main(["browse", str(tmp_path / "folder")]) == 2
    assert "not a segmentation output" in one_line(capsys, "browse")
    with pytest.raises(SystemExit) as stopped:  # argparse's mistake: one line too
        main(["browse", str(segmented), "--port", "70000"])
    assert stopped.value.code == 2 and "--port: a port must be a whole number in 0..65535" in one_line(capsys, "browse")
    with serving(segmented) as (base, _):
        port = base.rsplit(":", 1)[1].strip("/")
        assert main(["browse", str(segmented), "--port", port]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in one_line(capsys, "browse")


# In a real browser ----------------------------------------------------------------------------------


def screenshot(page, name: str, tmp_path) -> np.ndarray:
    """The page's screenshot as pixels, kept in MASKRAY_BROWSE_SCREENSHOTS if that is set; it
    must be no blank page: many colours, and not one colour over most of it."""
    data = page.screenshot(full_page=False)
    keep = os.environ.get("MASKRAY_BROWSE_SCREENSHOTS")
    for folder in [tmp_path, *([Path(keep)] if keep else [])]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"browse-{name}.png").write_bytes(data)
    pixels = png(data)
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    assert len(colours) > 500 and counts.max() < 0.8 * counts.sum(), (name, len(colours), counts.max() / counts.sum())
    return pixels


def has_colour(pixels: np.ndarray, colour: str, at_least: int = 200) -> bool:
    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).max(axis=2) <= 8).sum()) >= at_least


@pytest.mark.slow
def test_in_chromium(segmented, tmp_path):
    from playwright.sync_api import sync_playwright

    from maskray.pipeline.results.show import label_colour

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no {CHROMIUM}: `make browser` (.ci/install-browser) installs Debian's chromium")
    labels = dict(sql(segmented, "SELECT label_name, min(label) FROM instances WHERE score >= 0.5 GROUP BY 1"))
    label = sql(segmented, "SELECT label_name FROM instances WHERE score >= 0.5 GROUP BY 1 ORDER BY count(*) DESC")[0][0]
    with_label = sql(segmented, "SELECT count(DISTINCT image_id) FROM instances WHERE label_name = ? AND score >= 0.5",
                     params=[label])[0][0]
    with serving(segmented, "--page-size", "8") as (base, _), sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = chromium.new_page(viewport={"width": 1280, "height": 900})
            page.goto(base)
            page.wait_for_load_state("networkidle")
            assert page.locator(".card").count() == 8
            thumbnails = page.locator(".card img")
            assert thumbnails.count() == 8  # the broken image is past the first page
            assert all(thumbnails.nth(i).evaluate("i => i.complete && i.naturalWidth > 0") for i in range(8))
            gallery = screenshot(page, "gallery", tmp_path)
            # The thumbnails are drawn: the masks' label colours are on the screen.
            assert sum(has_colour(gallery, label_colour(i)) for i in labels.values()) >= 2

            page.select_option("select[name=label]", label)
            page.click("button[type=submit]")
            page.wait_for_load_state("networkidle")
            assert f"label={label}" in page.url
            assert page.locator(".card").count() == min(8, with_label)
            assert page.locator(".summary").inner_text().startswith(f"images 1–{min(8, with_label)} of {with_label} matching")
            filtered = screenshot(page, "filtered", tmp_path)
            assert has_colour(filtered, label_colour(labels[label]))

            page.locator(".card").first.click()
            page.wait_for_load_state("networkidle")
            assert "/image/" in page.url
            rows = page.locator("tr.instance")
            assert rows.count() >= 1
            picture = page.locator("#picture")
            assert picture.evaluate("i => i.complete && i.naturalWidth > 0")
            whole = screenshot(page, "image", tmp_path)
            # Hovering an instance shows its mask alone; a click pins it.
            rows.first.hover()
            page.wait_for_function("() => document.getElementById('picture').src.includes('only=')"
                                   " && document.getElementById('picture').complete")
            page.wait_for_load_state("networkidle")
            alone = screenshot(page, "image-hover", tmp_path)
            assert not np.array_equal(alone, whole)
            rows.first.click()
            page.mouse.move(5, 5)
            page.wait_for_load_state("networkidle")
            assert "on" in rows.first.get_attribute("class")
            assert picture.get_attribute("data-shown") == rows.first.get_attribute("data-instance")
        finally:
            chromium.close()
