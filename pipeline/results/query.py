"""Reading a job's output: DuckDB views and pyarrow datasets, local or on object storage.

``connect(OUTPUT)`` gives a DuckDB connection with the views ``instances`` and ``images``
over the committed part files (those of shards with a done-marker); ``open_table(OUTPUT, "instances")`` gives a ``pyarrow.dataset.Dataset``
for any other Parquet tool. On object storage DuckDB reads through the same fsspec filesystem
the job wrote with (``register_filesystem``), because DuckDB's own httpfs extension is not in
its wheel and would be downloaded at run time.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.dataset as ds

from maskray.pipeline.errors import OutputError, QueryError
from maskray.pipeline.segment.manifest import MANIFEST_FILE, Manifest
from maskray.pipeline.segment.output import IMAGES, INSTANCES, SCHEMAS, finished_shards, shard_of_part
from maskray.pipeline.segment.plan import Plan
from maskray.pipeline.storage import (
    check_reachable,
    full_url,
    is_local,
    join,
    list_files,
    open_url,
    path_type,
    public_url,
    redact,
    secret_values,
)

TABLES = (INSTANCES, IMAGES)


def _all_part_files(fs, output: str, table: str) -> list[str]:
    # Listed as of now (list_files drops cached listings): a long-lived filesystem must see the parts of now.
    return sorted(p for p in list_files(fs, join(output, table)) if p.endswith(".parquet"))


def _committed_part_files(fs, output: str, table: str, done: set[int] | None = None) -> tuple[list[str], bool]:
    """The part files of shards that have their done-marker (``done``: read now when not given),
    and whether those are all there are. A part without a marker is a shard being written now,
    or one that failed and waits for a rerun; it may lack its other table's part, so readers
    leave it out."""
    parts = _all_part_files(fs, output, table)
    done = finished_shards(fs, output) if done is None else done
    committed = [p for p in parts if shard_of_part(p) in done]
    return committed, len(committed) == len(parts)


def _planned_shards(fs, output: str) -> int:
    plan = Plan(fs, output)
    try:
        return plan.num_shards
    finally:
        plan.close()


@dataclass(frozen=True)
class OutputProgress:
    """How far the job writing a segmentation output has got."""

    url: str  # without credentials
    shards: int | None  # in the plan; None before the plan is written
    committed: int  # shards with their done-marker

    @property
    def finished(self) -> bool:
        return self.shards is not None and self.committed == self.shards

    def describe(self) -> str:
        if self.finished:
            return f"{self.url}: all {self.shards} shards committed"
        planned = f"{self.committed} of {self.shards}" if self.shards is not None else "none of the"
        return (f"{self.url} is unfinished: {planned} shards committed (the job is running, or was stopped: "
                "its command resumes it)")


def output_progress(output_url: str, storage_options: Mapping[str, Any] | None = None) -> OutputProgress:
    """How far the segmentation output at ``output_url`` has got. StorageError when storage cannot
    be used (no bucket, refused credentials, an unreachable endpoint) or nothing is there;
    OutputError when what is there is no segmentation output, saying what it looks like."""
    fs, output = open_url(output_url, storage_options)
    check_reachable(output_url, fs, output, must_exist=True)
    where = public_url(output_url)
    if path_type(fs, output) == "file":
        raise OutputError(f"{where}: a file, not a segmentation output (a folder or prefix that maskray segment wrote)")
    if Manifest.read(fs, output) is None:
        names = {p.rstrip("/").rsplit("/", 1)[-1] for p in list_files(fs, output)}
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        looks = ("a training run's output" if {"settings.json", "checkpoints"} & names else
                 "empty" if not names else f"a folder holding {shown}")
        raise OutputError(f"{where}: not a segmentation output (no {MANIFEST_FILE}; it is {looks}): "
                          "give the OUTPUT that maskray segment wrote")
    shards = _planned_shards(fs, output) if Plan.exists(fs, output) else None
    return OutputProgress(where, shards, len(finished_shards(fs, output)))


def open_table(output_url: str, table: str, storage_options: Mapping[str, Any] | None = None) -> ds.Dataset:
    """The ``table`` (``instances`` or ``images``) of a job's output as a pyarrow dataset."""
    if table not in SCHEMAS:
        raise ValueError(f"no table {table!r} in a maskray output; there are {TABLES}")
    fs, output = open_url(output_url, storage_options)
    return ds.dataset(_committed_part_files(fs, output, table)[0], schema=SCHEMAS[table], format="parquet", filesystem=fs)


def connect(output_url: str, storage_options: Mapping[str, Any] | None = None, database: str = ":memory:"):
    """A DuckDB connection with views ``instances`` and ``images`` over ``output_url``. An output
    that DuckDB cannot read (a part that is not Parquet, storage that fails under it) raises
    QueryError naming the output."""
    import duckdb

    fs, output = open_url(output_url, storage_options)
    if path_type(fs, output) is None:  # retried, where fs.exists would take a 503 for "not there"
        raise FileNotFoundError(f"{public_url(output_url)}: no such output")
    try:
        con = duckdb.connect(database)
    except duckdb.Error as error:
        raise _query_error(f"cannot open the database {database}", error, storage_options) from None
    try:
        _create_views(con, fs, output)
    except duckdb.Error as error:  # neither ValueError nor OSError: the CLI would print a traceback
        con.close()
        what = f"{public_url(output_url)}: DuckDB cannot read this output"
        raise _query_error(what, error, storage_options) from None
    except BaseException:
        con.close()
        raise
    return con


def _query_error(what: str, error: BaseException, storage_options: Mapping[str, Any] | None) -> QueryError:
    # DuckDB's first line says what failed and in which file; the next ones quote the SQL.
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return QueryError(redact(f"{what} ({reason})", secret_values(storage_options)))


def _create_views(con, fs, output: str) -> None:
    """The views ``instances`` and ``images`` over the committed parts of ``output``."""
    if not is_local(fs):
        con.register_filesystem(fs)

    def url(path: str) -> str:
        return full_url(fs, path) if not is_local(fs) else path

    done = finished_shards(fs, output)
    # DuckDB expands a glob at every query, so a glob stands for the committed parts only when
    # no part can appear later: every shard of the plan is committed.
    finished = Plan.exists(fs, output) and len(done) == _planned_shards(fs, output)
    for table in TABLES:
        committed, everything = _committed_part_files(fs, output, table, done)
        if committed and everything and finished:
            # A glob, not a list: the view stays one line for any number of parts.
            source = f"'{_quote(url(join(output, table, '*.parquet')))}'"
        elif committed:  # a job may still add parts: name the committed ones
            source = "[" + ", ".join(f"'{_quote(url(p))}'" for p in committed) + "]"
        if committed:
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({source})")
        else:  # no part yet: an empty view with the table's columns, so queries still run
            columns = ", ".join(f"CAST(NULL AS {_duckdb_type(f.type)}) AS {f.name}" for f in SCHEMAS[table])
            con.execute(f"CREATE VIEW {table} AS SELECT {columns} WHERE false")


def _quote(text: str) -> str:
    return text.replace("'", "''")


def _duckdb_type(arrow_type) -> str:
    import pyarrow as pa

    return {pa.string(): "VARCHAR", pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.float32(): "FLOAT"}[arrow_type]


def output_totals(output_url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """images, ok, errors and instances in the output (read from the ``images`` table)."""
    import pyarrow.compute as pc

    # Summed in Arrow: a Python object per image would cost the driver gigabytes on a large job.
    table = open_table(output_url, IMAGES, storage_options).to_table(columns=["status", "instances"])
    errors = int(pc.sum(pc.equal(table.column("status"), "error")).as_py() or 0)
    instances = int(pc.sum(table.column("instances")).as_py() or 0)
    return {"images": table.num_rows, "ok": table.num_rows - errors, "errors": errors, "instances": instances}
