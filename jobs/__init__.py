"""Entry points: the `maskray` command (jobs.cli) and the jobs users submit to a Ray cluster."""
