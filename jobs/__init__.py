"""Entry points: the `maskray` command (maskray.jobs.cli) and the jobs users submit to a Ray cluster."""
