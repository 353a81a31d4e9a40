"""Human feedback: ``alignkit annotate``, a ranking web app on a real database (docs/human-feedback.md).

``alignkit annotate [serve]``        import the task (if given) and serve the app on 127.0.0.1
``alignkit annotate add-user NAME``  create an annotator (``--admin``: an admin) and print its login link
``alignkit annotate export``         rankings.jsonl, pairs.jsonl, agreement report, A/B win rate
``alignkit annotate import FILE``    bring answers made in Label Studio or Argilla into the store

Modules: :mod:`~alignkit.annotate.store` (SQLAlchemy store), :mod:`~alignkit.annotate.tasks` (task files,
A/B items), :mod:`~alignkit.annotate.app` (Starlette app), :mod:`~alignkit.annotate.agreement`
(aggregation and agreement statistics), :mod:`~alignkit.annotate.export`,
:mod:`~alignkit.annotate.importers` (Label Studio / Argilla).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field

from alignkit.config import Section, as_config

ACTIONS = ("serve", "add-user", "export", "import")


class AnnotateConfig(Section):
    """Human annotation of rankings (and blind A/B evaluation) in a local web app."""

    command: Literal["annotate"] = "annotate"
    args: List[str] = []
    """What to do: `serve` (the default), `add-user NAME`, `export`, or `import FILE` (a Label Studio or
    Argilla export of a ranking task)."""
    db: str = "annotations/annotations.db"
    """The store: a SQLite file path (WAL mode), or any SQLAlchemy URL (e.g. postgresql://user@host/db)."""
    task: Optional[str] = None
    """Task file to import before serving: sample-pairs output (file or directory), {prompt, responses}
    or {prompt, chosen, rejected} rows. Importing the same items again adds nothing."""
    mode: Literal["rank", "ab"] = "rank"
    """rank: rank 2+ responses per prompt; ab: blind A/B evaluation of two eval runs (ab_runs)."""
    ab_runs: List[str] = []
    """A/B mode: two `alignkit eval` output directories [A, B] (e.g. base and DPO); their samples are
    paired by prompt and shown in a shuffled order without saying which run wrote which."""
    overlap: Optional[int] = Field(None, ge=1)
    """How many annotators see each item (stored with the task; default 1)."""
    items_per_annotator: Optional[int] = Field(None, ge=1)
    """How many items each annotator is given (stored with the task; default: as many as there are)."""
    guideline: Optional[str] = None
    """Guideline shown at the top of every page: the text itself or a path to a text file."""
    host: str = "127.0.0.1"
    """Interface to bind. Anything but localhost exposes the app: put it behind HTTPS."""
    port: int = Field(8765, ge=1, le=65535)
    """Port to listen on."""
    url: Optional[str] = None
    """Base URL printed in login links (default http://HOST:PORT)."""
    admin: bool = False
    """add-user: create an admin (may export and see the statistics)."""
    items: Optional[int] = Field(None, ge=1)
    """add-user: this annotator's own number of items (overrides items_per_annotator)."""
    output: str = "annotations/export"
    """export: directory for rankings.jsonl, pairs.jsonl, answers.jsonl, agreement.json/.html."""
    aggregate: Literal["borda", "majority"] = "borda"
    """export: how several annotators' rankings of an item become one (Borda count or pairwise majority)."""


def _guideline(text: str) -> str:
    p = Path(text)
    try:
        if len(text) < 4096 and p.is_file():
            return p.read_text(encoding="utf-8")
    except OSError:
        pass
    return text


def prepare_store(cfg: AnnotateConfig):
    """Open the store, save the settings given and import the task (rank mode) or the A/B items."""
    from alignkit.annotate.store import Store
    from alignkit.annotate.tasks import ab_items, read_task
    from alignkit.data.load import DataError

    store = Store(cfg.db)
    settings: Dict[str, Any] = {}
    if cfg.overlap is not None:
        settings["overlap"] = cfg.overlap
    if cfg.items_per_annotator is not None:
        settings["items_per_annotator"] = cfg.items_per_annotator
    if cfg.guideline is not None:
        settings["guideline"] = _guideline(cfg.guideline)
    summary: Dict[str, Any] = {}
    if cfg.mode == "ab" or cfg.ab_runs:
        if len(cfg.ab_runs) != 2:
            raise DataError("A/B mode needs two eval run directories: --ab-run BASE_EVAL --ab-run NEW_EVAL")
        items, counts = ab_items(*cfg.ab_runs)
        settings.update(mode="ab", ab={"runs": [str(Path(r).resolve()) for r in cfg.ab_runs], **counts})
        summary.update(counts)
        summary.update(store.add_items(items))
    elif cfg.task:
        items, report = read_task(cfg.task)
        for line in report.summary_lines():
            print(line)
        summary.update(store.add_items(items))
    if settings:
        store.set_settings(**settings)
    return store, summary


def _check_deps() -> None:
    import importlib.util

    from alignkit.data.load import DataError

    missing = [m for m in ("starlette", "uvicorn", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataError(f"alignkit annotate needs {', '.join(missing)}: pip install 'alignkit[annotate]'")


def run_annotate(config: Union[AnnotateConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """The Python twin of ``alignkit annotate``."""
    from alignkit.data.load import DataError

    cfg = as_config(AnnotateConfig, config, overrides)
    _check_deps()
    action, rest = (cfg.args[0], cfg.args[1:]) if cfg.args else ("serve", [])
    if action not in ACTIONS:
        raise DataError(f"annotate: unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    base = cfg.url or f"http://{cfg.host}:{cfg.port}"
    if action == "add-user":
        if len(rest) != 1:
            raise DataError("usage: alignkit annotate add-user NAME [--admin] [--db FILE]")
        from alignkit.annotate.store import Store

        token = Store(cfg.db).add_user(rest[0], admin=cfg.admin, max_items=cfg.items)
        # the link is the only place the token ever appears; the store keeps its hash
        print(f"login link for {rest[0]}{' (admin)' if cfg.admin else ''}: {base}/login?token={token}")
        return {"user": rest[0], "admin": cfg.admin}
    store, summary = prepare_store(cfg)
    if action == "export":
        from alignkit.annotate.export import export

        return export(store, cfg.output, cfg.aggregate)
    if action == "import":
        if len(rest) != 1:
            raise DataError("usage: alignkit annotate import FILE (a Label Studio or Argilla export)")
        from alignkit.annotate.importers import import_labels

        return {**summary, **import_labels(store, rest[0])}
    serve(store, cfg.host, cfg.port)
    return summary


def serve(store, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    from alignkit.annotate.app import create_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"annotate: listening on {host}, not only this machine; use HTTPS in front of it")
    print(f"annotate: serving {store.url} on http://{host}:{port} (log in with a link from "
          "`alignkit annotate add-user NAME`)", flush=True)
    uvicorn.run(create_app(store), host=host, port=port, log_level="warning")


__all__ = ["AnnotateConfig", "run_annotate", "prepare_store", "serve", "ACTIONS"]
