"""Human feedback: `alignkit annotate` (serve, add-user NAME, export, import FILE); docs/human-feedback.md."""

from alignkit.cli import Command, register_command

register_command(Command(
    "annotate", "alignkit.annotate:AnnotateConfig", "alignkit.annotate:run_annotate",
    "Rank responses in a local web app (or judge two eval runs blind, --mode ab): "
    "`annotate [serve]`, `annotate add-user NAME [--admin]` (or --name NAME), `annotate export`, `annotate import FILE`.",
    {"db": "db", "task": "task", "mode": "mode", "ab_run": "ab_runs", "overlap": "overlap",
     "items_per_annotator": "items_per_annotator", "guideline": "guideline", "host": "host", "port": "port",
     "public_url": "public_url", "url": "public_url", "workers": "workers", "max_body": "max_body",
     "lease_minutes": "lease_minutes", "name": "name",
     "admin": "admin", "items": "items", "output": "output", "aggregate": "aggregate"},
    positional="args"))
