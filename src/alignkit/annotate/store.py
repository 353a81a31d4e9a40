"""The annotation store: items, annotators, assignments and answers in one SQLAlchemy database.

SQLite is the embedded default (a file path); any SQLAlchemy URL works (``postgresql://...``).
On SQLite the store turns on WAL (readers never block the writer), ``synchronous=FULL`` (a committed
answer survives a crash or power cut) and a busy timeout. Every answer is one transaction; a
``UNIQUE(user, item)`` constraint makes a repeated submission a no-op, so an answer is stored exactly
once however often a client retries. Writes in one server process are serialized by a lock (SQLite has
one writer anyway), which also keeps the overlap count of an item exact.

Tables
- ``meta``: settings (mode, overlap, items per annotator, guideline) and the secret that seeds the
  per-annotator shuffles.
- ``items``: ``id`` = a hash of the content (prompt and the sorted responses), so importing a file twice
  or a re-ordered copy of it adds nothing; ``responses`` keep the order of the first import.
- ``users``: name, ``token_hash`` (SHA-256 of a 256-bit random token; the token itself is never
  stored), admin flag, optional per-annotator quota.
- ``assignments``: the order in which an annotator sees an item's responses (``order[p]`` = index of
  the response at display position p), fixed when the item is first shown; kept for position bias.
- ``answers``: ``ranks[i]`` = rank of response i (1 = best, equal numbers = tie), ``all_bad``,
  ``skipped``, rationale, the order shown and the seconds spent.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, insert, select, update)
from sqlalchemy.exc import IntegrityError

metadata = MetaData()
meta_t = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
items_t = Table(
    "items", metadata,
    Column("id", String(32), primary_key=True),
    Column("seq", Integer, nullable=False, index=True),  # import order
    Column("prompt", Text, nullable=False),  # JSON: a string or a message list
    Column("responses", Text, nullable=False),  # JSON list of strings
    Column("sources", Text),  # JSON list (A/B mode: which run each response came from)
    Column("extra", Text),  # JSON: the row's other fields
)
users_t = Table(
    "users", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("is_admin", Boolean, nullable=False, default=False),
    Column("max_items", Integer),
    Column("created_at", Float, nullable=False),
)
assignments_t = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("item_id", String(32), ForeignKey("items.id"), nullable=False, index=True),
    Column("display_order", Text, nullable=False),  # JSON list: response index at each display position
    Column("shown_at", Float, nullable=False),
    UniqueConstraint("user_id", "item_id", name="one_assignment"),
)
answers_t = Table(
    "answers", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("item_id", String(32), ForeignKey("items.id"), nullable=False, index=True),
    Column("ranks", Text),  # JSON list per response index (1 = best); null when skipped
    Column("all_bad", Boolean, nullable=False, default=False),
    Column("skipped", Boolean, nullable=False, default=False),
    Column("rationale", Text),
    Column("display_order", Text, nullable=False),
    Column("seconds", Float),
    Column("created_at", Float, nullable=False),
    UniqueConstraint("user_id", "item_id", name="one_answer"),
)

DEFAULT_SETTINGS = {"mode": "rank", "overlap": 1, "items_per_annotator": None, "guideline": "", "ab": None}


class StoreError(ValueError):
    """A request the store refuses (unknown item, not assigned, malformed ranking)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def item_id(prompt: Any, responses: Sequence[str], sources: Optional[Sequence[str]] = None) -> str:
    """Stable id from content: the prompt and the *sorted* responses (and their sources in A/B mode),
    so the same item imported twice, or in another response order, gets the same id."""
    pairs = sorted(zip(responses, sources or [""] * len(responses)))
    blob = json.dumps({"prompt": prompt, "responses": pairs}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def database_url(db: str) -> str:
    """A SQLAlchemy URL as given, or a file path turned into a SQLite URL (its folder is created)."""
    if "://" in db:
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@dataclass
class User:
    id: int
    name: str
    is_admin: bool
    max_items: Optional[int]


@dataclass
class Assignment:
    item_id: str
    prompt: Any
    responses: List[str]  # in the item's own order
    order: List[int]  # response index at each display position

    @property
    def shown(self) -> List[str]:
        return [self.responses[i] for i in self.order]


def ranks_from_groups(groups: Sequence[Sequence[int]], order: Sequence[int]) -> List[int]:
    """Display-position tie groups, best first (``[[2], [1, 3]]``: position 2 best, 1 and 3 tied after
    it; positions count from 1), -> ranks per response index (1 = best, a tie shares the better rank)."""
    k = len(order)
    seen = [p for g in groups for p in g]
    if sorted(seen) != list(range(1, k + 1)):
        raise StoreError(f"a ranking must place each of the {k} responses exactly once, got {list(groups)}")
    ranks = [0] * k
    place = 1
    for g in groups:
        for p in g:
            ranks[order[p - 1]] = place
        place += len(g)
    return ranks


class Store:
    """All reads and writes of the annotation app; thread-safe, one transaction per write."""

    def __init__(self, db: str):
        self.url = database_url(db)
        sqlite = self.url.startswith("sqlite")
        kwargs: Dict[str, Any] = {}
        if sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(self.url, **kwargs)
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # every pooled connection
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()
        self._lock = threading.RLock()
        metadata.create_all(self.engine)
        with self._lock, self.engine.begin() as c:
            if c.execute(select(meta_t.c.value).where(meta_t.c.key == "secret")).first() is None:
                c.execute(insert(meta_t).values(key="secret", value=secrets.token_hex(16)))
        self._secret = self._get("secret")

    # ------------------------------------------------------------ settings
    def _get(self, key: str) -> Optional[str]:
        with self.engine.connect() as c:
            row = c.execute(select(meta_t.c.value).where(meta_t.c.key == key)).first()
        return row[0] if row else None

    def settings(self) -> Dict[str, Any]:
        out = dict(DEFAULT_SETTINGS)
        with self.engine.connect() as c:
            for k, v in c.execute(select(meta_t.c.key, meta_t.c.value)):
                if k in out:
                    out[k] = json.loads(v)
        return out

    def set_settings(self, **values: Any) -> None:
        unknown = set(values) - set(DEFAULT_SETTINGS)
        if unknown:
            raise StoreError(f"unknown settings {sorted(unknown)}")
        with self._lock, self.engine.begin() as c:
            for k, v in values.items():
                if c.execute(select(meta_t.c.key).where(meta_t.c.key == k)).first() is None:
                    c.execute(insert(meta_t).values(key=k, value=json.dumps(v)))
                else:
                    c.execute(update(meta_t).where(meta_t.c.key == k).values(value=json.dumps(v)))

    # ------------------------------------------------------------ items
    def add_items(self, rows: Iterable[Dict[str, Any]]) -> Dict[str, int]:
        """Insert ``{prompt, responses, sources?, extra?}`` rows; ones already present (same content id)
        are skipped. One transaction for the whole import. Returns ``{"added", "present"}``."""
        added = present = 0
        with self._lock, self.engine.begin() as c:
            seq = c.execute(select(func.coalesce(func.max(items_t.c.seq), 0))).scalar_one()
            for r in rows:
                iid = item_id(r["prompt"], r["responses"], r.get("sources"))
                if c.execute(select(items_t.c.id).where(items_t.c.id == iid)).first() is not None:
                    present += 1
                    continue
                seq += 1
                c.execute(insert(items_t).values(
                    id=iid, seq=seq, prompt=json.dumps(r["prompt"], ensure_ascii=False),
                    responses=json.dumps(list(r["responses"]), ensure_ascii=False),
                    sources=json.dumps(list(r["sources"])) if r.get("sources") else None,
                    extra=json.dumps(r.get("extra") or {}, ensure_ascii=False, default=str)))
                added += 1
        return {"added": added, "present": present}

    def items(self, iid: Optional[str] = None) -> List[Dict[str, Any]]:
        """All items in import order (or the one with id ``iid``) as dicts."""
        q = select(items_t).order_by(items_t.c.seq)
        if iid is not None:
            q = q.where(items_t.c.id == iid)
        with self.engine.connect() as c:
            rows = c.execute(q).mappings().all()
        return [{"id": r["id"], "prompt": json.loads(r["prompt"]), "responses": json.loads(r["responses"]),
                 "sources": json.loads(r["sources"]) if r["sources"] else None,
                 "extra": json.loads(r["extra"] or "{}")} for r in rows]

    # ------------------------------------------------------------ users
    def add_user(self, name: str, *, admin: bool = False, max_items: Optional[int] = None) -> str:
        """Create an annotator (or admin) and return its token; only the token's hash is stored.
        Adding an existing name gives it a new token (the old one stops working)."""
        token = secrets.token_urlsafe(32)
        with self._lock, self.engine.begin() as c:
            row = c.execute(select(users_t.c.id).where(users_t.c.name == name)).first()
            values = dict(token_hash=hash_token(token), is_admin=admin, max_items=max_items)
            if row is None:
                c.execute(insert(users_t).values(name=name, created_at=time.time(), **values))
            else:
                c.execute(update(users_t).where(users_t.c.id == row[0]).values(**values))
        return token

    def user_for_token(self, token: Optional[str]) -> Optional[User]:
        if not token:
            return None
        with self.engine.connect() as c:
            r = c.execute(select(users_t).where(users_t.c.token_hash == hash_token(token))).mappings().first()
        return User(r["id"], r["name"], bool(r["is_admin"]), r["max_items"]) if r else None

    def users(self) -> Dict[int, str]:
        with self.engine.connect() as c:
            return {r.id: r.name for r in c.execute(select(users_t.c.id, users_t.c.name))}

    # ------------------------------------------------------------ assignment
    def _order(self, user_id: int, iid: str, k: int) -> List[int]:
        seed = hashlib.sha256(f"{self._secret}:{user_id}:{iid}".encode()).digest()
        order = list(range(k))
        random.Random(seed).shuffle(order)
        return order

    def quota(self, user: User) -> int:
        """How many items this annotator is meant to see: its own quota, else the task's, else all."""
        s = self.settings()
        with self.engine.connect() as c:
            n_items = c.execute(select(func.count()).select_from(items_t)).scalar_one()
        cap = user.max_items if user.max_items is not None else s["items_per_annotator"]
        return n_items if cap is None else min(int(cap), n_items)

    def current(self, user: User) -> Optional[Assignment]:
        """The item this annotator works on now: an open assignment, else a newly assigned item (fewest
        annotators first, below the overlap, within the quota), else None (done)."""
        with self._lock, self.engine.begin() as c:
            answered = select(answers_t.c.item_id).where(answers_t.c.user_id == user.id)
            open_a = c.execute(select(assignments_t).where(
                assignments_t.c.user_id == user.id, assignments_t.c.item_id.not_in(answered))
                .order_by(assignments_t.c.id.desc()).limit(1)).mappings().first()  # newest: an undone one
            if open_a is None:
                mine = c.execute(select(func.count()).select_from(assignments_t)
                                 .where(assignments_t.c.user_id == user.id)).scalar_one()
                if mine >= self.quota(user):
                    return None
                overlap = int(self.settings()["overlap"])
                taken = (select(assignments_t.c.item_id, func.count().label("n"))
                         .group_by(assignments_t.c.item_id).subquery())
                mine_q = select(assignments_t.c.item_id).where(assignments_t.c.user_id == user.id)
                n = func.coalesce(taken.c.n, 0)
                row = c.execute(select(items_t.c.id, items_t.c.responses)
                                .select_from(items_t.outerjoin(taken, taken.c.item_id == items_t.c.id))
                                .where(n < overlap, items_t.c.id.not_in(mine_q))
                                .order_by(n, items_t.c.seq).limit(1)).first()
                if row is None:
                    return None
                order = self._order(user.id, row[0], len(json.loads(row[1])))
                c.execute(insert(assignments_t).values(user_id=user.id, item_id=row[0], shown_at=time.time(),
                                                       display_order=json.dumps(order)))
                open_a = c.execute(select(assignments_t).where(assignments_t.c.user_id == user.id,
                                                               assignments_t.c.item_id == row[0])).mappings().first()
            item = c.execute(select(items_t).where(items_t.c.id == open_a["item_id"])).mappings().first()
        return Assignment(item["id"], json.loads(item["prompt"]), json.loads(item["responses"]),
                          json.loads(open_a["display_order"]))

    # ------------------------------------------------------------ answers
    def answer(self, user: User, iid: str, *, groups: Optional[Sequence[Sequence[int]]] = None,
               all_bad: bool = False, skip: bool = False, rationale: str = "") -> bool:
        """Store one answer in one transaction. ``groups``: display-position tie groups, best first; with
        ``all_bad`` and no groups every response ties. True when stored, False when this annotator had
        already answered the item (a retry: nothing changes). Refuses items not assigned to the user."""
        with self._lock, self.engine.begin() as c:
            a = c.execute(select(assignments_t).where(assignments_t.c.user_id == user.id,
                                                      assignments_t.c.item_id == iid)).mappings().first()
            if a is None:
                raise PermissionError("this item is not assigned to you")
            order = json.loads(a["display_order"])
            if skip:
                ranks = None
            elif groups:
                ranks = ranks_from_groups(groups, order)
            elif all_bad:
                ranks = [1] * len(order)
            else:
                raise StoreError("an answer needs a ranking, all_bad or skip")
            now = time.time()
            try:
                with c.begin_nested():
                    c.execute(insert(answers_t).values(
                        user_id=user.id, item_id=iid, ranks=json.dumps(ranks) if ranks is not None else None,
                        all_bad=bool(all_bad), skipped=bool(skip), rationale=(rationale or "")[:10000],
                        display_order=a["display_order"], seconds=now - a["shown_at"], created_at=now))
            except IntegrityError:
                return False
        return True

    def undo(self, user: User) -> Optional[str]:
        """Delete this annotator's most recent answer; its item becomes the current one again (same
        order). Returns the item id, or None when there is nothing to undo."""
        with self._lock, self.engine.begin() as c:
            last = c.execute(select(answers_t.c.id, answers_t.c.item_id).where(answers_t.c.user_id == user.id)
                             .order_by(answers_t.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            c.execute(answers_t.delete().where(answers_t.c.id == last[0]))
            # the item goes back to the front of the queue and its clock restarts
            c.execute(assignments_t.delete().where(assignments_t.c.user_id == user.id,
                                                   assignments_t.c.item_id == last[1]))
            c.execute(insert(assignments_t).values(user_id=user.id, item_id=last[1], shown_at=time.time(),
                                                   display_order=json.dumps(self._order(user.id, last[1],
                                                                                        self._k(c, last[1])))))
        return last[1]

    @staticmethod
    def _k(c, iid: str) -> int:
        return len(json.loads(c.execute(select(items_t.c.responses).where(items_t.c.id == iid)).scalar_one()))

    def progress(self, user: User) -> Dict[str, int]:
        with self.engine.connect() as c:
            done = c.execute(select(func.count()).select_from(answers_t)
                             .where(answers_t.c.user_id == user.id)).scalar_one()
        return {"done": int(done), "total": max(self.quota(user), int(done))}

    def answers(self, user_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """Answers (all, or one annotator's) with the user's name, oldest first."""
        q = select(answers_t, users_t.c.name).join(users_t, users_t.c.id == answers_t.c.user_id)
        if user_id is not None:
            q = q.where(answers_t.c.user_id == user_id)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(answers_t.c.id)).mappings().all()
        return [{"user": r["name"], "user_id": r["user_id"], "item_id": r["item_id"],
                 "ranks": json.loads(r["ranks"]) if r["ranks"] else None, "all_bad": bool(r["all_bad"]),
                 "skipped": bool(r["skipped"]), "rationale": r["rationale"] or "",
                 "order": json.loads(r["display_order"]), "seconds": r["seconds"], "created_at": r["created_at"]}
                for r in rows]

    def import_answer(self, user_name: str, iid: str, ranks: Optional[List[int]], *, order: Sequence[int],
                      all_bad: bool = False, rationale: str = "", seconds: Optional[float] = None) -> bool:
        """Store an answer made elsewhere (Label Studio, Argilla) for an existing item; the annotator is
        created without a usable token. False when that annotator already answered the item."""
        with self._lock, self.engine.begin() as c:
            row = c.execute(select(users_t.c.id).where(users_t.c.name == user_name)).first()
            if row is None:
                uid = c.execute(insert(users_t).values(name=user_name, token_hash=hash_token(secrets.token_hex(32)),
                                                       is_admin=False, created_at=time.time())).inserted_primary_key[0]
            else:
                uid = row[0]
            now = time.time()
            try:
                with c.begin_nested():
                    c.execute(insert(assignments_t).values(user_id=uid, item_id=iid, shown_at=now,
                                                           display_order=json.dumps(list(order))))
            except IntegrityError:
                pass
            try:
                with c.begin_nested():
                    c.execute(insert(answers_t).values(
                        user_id=uid, item_id=iid, ranks=json.dumps(ranks) if ranks is not None else None,
                        all_bad=all_bad, skipped=ranks is None, rationale=rationale,
                        display_order=json.dumps(list(order)), seconds=seconds, created_at=now))
            except IntegrityError:
                return False
        return True

    def close(self) -> None:
        self.engine.dispose()
