"""``maskray query OUTPUT "SQL"``: DuckDB over a segmentation output, with the views
``instances`` (one row per instance) and ``images`` (one row per input image). An output that
is still being written (or was stopped) is answered from its committed shards, with a note of
how far it has got."""

import argparse
import sys

from maskray.jobs.arguments import add_storage_options_argument
from maskray.jobs.cli import reports_user_errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a segmentation output (any fsspec URL)")
    parser.add_argument("sql", metavar="SQL", help='e.g. "SELECT label_name, count(*) FROM instances GROUP BY 1"')
    parser.add_argument("--max-rows", type=int, default=50, help="rows to print at most (default 50)")
    parser.add_argument("--csv", action="store_true", help="print all rows as CSV instead of a table")
    add_storage_options_argument(parser)


@reports_user_errors
def run(args: argparse.Namespace) -> int:
    import duckdb

    from maskray.pipeline.errors import QueryError
    from maskray.pipeline.results.query import connect, output_progress

    progress = output_progress(args.output, args.storage_options)  # no output there: one line, before DuckDB
    con = connect(args.output, args.storage_options)
    try:
        relation = con.sql(args.sql)
    except duckdb.Error as error:  # the SQL's mistake, or an output DuckDB cannot read
        # DuckDB says what is wrong and may hint (Did you mean "instances"?); the SQL it quotes
        # back ("LINE 1: ...", a caret under it) is left out.
        said = [line.strip() for line in str(error).splitlines()
                if line.strip() and not line.startswith("LINE ") and set(line.strip()) != {"^"}]
        raise QueryError(f"the SQL cannot run: {' '.join(said) or type(error).__name__}") from None
    if relation is not None:  # None: a statement without a result
        if args.csv:
            import csv

            writer = csv.writer(sys.stdout)
            writer.writerow(relation.columns)
            writer.writerows(relation.fetchall())
        else:
            relation.show(max_rows=args.max_rows, max_width=200)
    if not progress.finished:  # the answer covers the committed shards only: say so, where it is seen last
        print(f"maskray query: note: {progress.describe()}; this answer covers the committed shards",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    from maskray.jobs.cli import main

    sys.exit(main(["query", *sys.argv[1:]]))
