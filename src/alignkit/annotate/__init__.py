"""Human feedback: ``alignkit annotate``, a ranking web app on a real database (docs/human-feedback.md).

``alignkit annotate [serve]``        import the task (if given) and serve the app on 127.0.0.1
``alignkit annotate add-user NAME``  create an annotator (``--admin``: an admin; ``--name`` for names with
                                     ``=``) and print its one-time login link and its API token
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

from alignkit.annotate.importers import import_labels
from alignkit.annotate.tasks import ab_items, read_task
from alignkit.config import Section, as_config
from alignkit.data.load import DataError

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
    name: Optional[str] = None
    """add-user: the user's name, as a flag (for names containing `=`, which the positional form reads
    as a setting)."""
    overlap: Optional[int] = Field(None, ge=1)
    """How many annotators see each item (stored with the task; default 1)."""
    items_per_annotator: Optional[int] = Field(None, ge=1)
    """How many items each annotator is given (stored with the task; default: as many as there are)."""
    lease_minutes: Optional[float] = Field(None, gt=0)
    """How long an item shown to an annotator stays reserved for them (stored with the task; default
    30). An expired lease frees the slot for someone else; a skip frees it at once."""
    guideline: Optional[str] = None
    """Guideline shown at the top of every page: the text itself or a path to a text file."""
    host: str = "127.0.0.1"
    """Interface to bind. Anything but localhost exposes the app: put it behind HTTPS."""
    port: int = Field(8765, ge=1, le=65535)
    """Port to listen on."""
    public_url: Optional[str] = None
    """The address browsers use, e.g. https://annotate.example.org behind a reverse proxy: trusted as
    the origin of submits and used in login links (default: the address served, stored by `serve`)."""
    workers: int = Field(1, ge=1, le=64)
    """serve: server processes (uvicorn workers); the database keeps the overlap exact across them."""
    max_body: int = Field(1_000_000, ge=1024)
    """serve: largest request body in bytes; a bigger one is refused with 413."""
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
    # deferred: sqlalchemy/starlette load only when the annotation store or server runs
    from alignkit.annotate.store import Store
    store = Store(cfg.db)
    settings: Dict[str, Any] = {}
    if cfg.overlap is not None:
        settings["overlap"] = cfg.overlap
    if cfg.lease_minutes is not None:
        settings["lease_minutes"] = cfg.lease_minutes
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

    missing = [m for m in ("starlette", "uvicorn", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        raise DataError(f"alignkit annotate needs {', '.join(missing)}: pip install 'alignkit[annotate]'")


def url_host(host: str) -> str:
    """A host as it goes in a URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def served_url(host: str, port: int) -> str:
    """The address to print for a server bound to ``host``: a wildcard bind (0.0.0.0, ::) is reached
    through this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        import socket

        host = socket.getfqdn() or "localhost"
    return f"http://{url_host(host)}:{port}"


def login_base(cfg: "AnnotateConfig", store) -> str:
    """Where login links point: --public-url, else the public URL or served address the store kept
    from the last `serve`, else --host/--port."""
    if cfg.public_url:
        return cfg.public_url.rstrip("/")
    s = store.settings()
    return (s.get("public_url") or s.get("served_url") or served_url(cfg.host, cfg.port)).rstrip("/")


def run_annotate(config: Union[AnnotateConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """The Python twin of ``alignkit annotate``."""
    cfg = as_config(AnnotateConfig, config, overrides)
    _check_deps()
    action, rest = (cfg.args[0], cfg.args[1:]) if cfg.args else ("serve", [])
    if action not in ACTIONS:
        raise DataError(f"annotate: unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    if action == "add-user":
        names = rest + ([cfg.name] if cfg.name else [])
        if len(names) != 1:
            raise DataError("usage: alignkit annotate add-user NAME [--admin] [--db FILE] "
                            "(or --name 'NAME' for a name containing '=')")
        # deferred: sqlalchemy/starlette load only when the annotation store or server runs
        from alignkit.annotate.store import Store, StoreError

        store = Store(cfg.db)
        try:
            token = store.add_user(names[0], admin=cfg.admin, max_items=cfg.items)
        except StoreError as e:
            raise DataError(f"add-user: {e}") from None
        code = store.login_code(names[0])
        base = login_base(cfg, store)
        # the store keeps only hashes: this is the one place the link and the token appear
        print(f"login link for {names[0]}{' (admin)' if cfg.admin else ''} (works once, for 7 days): "
              f"{base}/login?code={code}")
        print(f"API token for scripts (Authorization: Bearer ...): {token}")
        return {"user": names[0], "admin": cfg.admin, "login_url": f"{base}/login?code={code}"}
    store, summary = prepare_store(cfg)
    if action == "export":
        # deferred: sqlalchemy/starlette load only when the annotation store or server runs
        from alignkit.annotate.export import export

        return export(store, cfg.output, cfg.aggregate)
    if action == "import":
        if len(rest) != 1:
            raise DataError("usage: alignkit annotate import FILE (a Label Studio or Argilla export)")
        return {**summary, **import_labels(store, rest[0])}
    serve(store, cfg.host, cfg.port, public_url=cfg.public_url, workers=cfg.workers, max_body=cfg.max_body)
    return summary


def serve(store, host: str = "127.0.0.1", port: int = 8765, *, public_url: Optional[str] = None,
          workers: int = 1, max_body: int = 1_000_000) -> None:
    """Serve the app; the address served (and the public URL) are stored for add-user's links."""
    import json
    import os

    # deferred: uvicorn loads only when the server runs
    import uvicorn

    # deferred: sqlalchemy/starlette load only when the annotation store or server runs
    from alignkit.annotate.app import create_app

    address = served_url(host, port)
    store.set_settings(served_url=address, public_url=public_url.rstrip("/") if public_url else None)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"annotate: listening on {host}, not only this machine; use HTTPS in front of it")
    print(f"annotate: serving {store.engine.url.render_as_string(hide_password=True)} on "
          f"{public_url or address}" + (f" (proxied to {address})" if public_url else "")
          + (f" with {workers} worker processes" if workers > 1 else "")
          + " (log in with a link from `alignkit annotate add-user NAME`)", flush=True)
    if workers > 1:  # each worker process builds its own app from the environment
        os.environ["ALIGNKIT_ANNOTATE_SERVE"] = json.dumps({"db": store.url, "public_url": public_url,
                                                            "max_body": max_body})
        uvicorn.run("alignkit.annotate.app:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level="warning")
    else:
        uvicorn.run(create_app(store, public_url, max_body), host=host, port=port, log_level="warning")


__all__ = ["AnnotateConfig", "run_annotate", "prepare_store", "serve", "served_url", "ACTIONS"]
