"""The annotation store: items, annotators, sessions, assignments and answers in one SQLAlchemy database.

SQLite is the embedded default (a file path, created 0600); any SQLAlchemy URL works
(``postgresql://user@host/db`` uses psycopg 3 when it is the driver installed). On SQLite the store turns
on WAL (readers never block the writer), ``synchronous=FULL`` (a committed answer survives a crash or
power cut) and a busy timeout. Every write is one transaction; a ``UNIQUE(user, item)`` constraint makes
a repeated submission a no-op, so an answer is stored exactly once however often a client retries.

Assignment is enforced by the database, so it stays exact with several server processes: a write
transaction is ``BEGIN IMMEDIATE`` on SQLite (one writer at a time, across processes); on PostgreSQL the
claim locks the candidate item row (``SELECT ... FOR UPDATE SKIP LOCKED``) and recounts its slots after
the lock. An item's slots in use = its ranked answers + its live leases (``assignments.leased_until`` in
the future). Showing an item leases it for ``lease_minutes``; an expired lease frees the slot (the
annotator keeps the item only if the slot is still free); a skip frees it at once; admins never take one.

Tables
- ``meta``: settings (mode, overlap, items per annotator, lease, guideline, served address) and the
  secret that keys A/B item ids and CSRF tokens.
- ``items``: ``id`` = a hash of the content (prompt and the sorted responses; in A/B mode keyed with
  the store's secret, so a judge cannot recompute it to learn which run wrote which), so importing a file
  twice or a re-ordered copy of it adds nothing; ``responses`` keep the order of the first import.
- ``users``: name, ``token_hash`` (SHA-256 of a 256-bit random API token; the token itself is never
  stored), admin flag, optional per-annotator quota.
- ``logins``: one-time login codes (hashed) that the login page exchanges for a session.
- ``sessions``: browser sessions (hashed cookie values).
- ``assignments``: the order in which an annotator sees an item's responses (``order[p]`` = index of
  the response at display position p), drawn at random when the item is first shown and kept (also
  through an undo); ``leased_until`` while unanswered.
- ``answers``: ``ranks[i]`` = rank of response i (1 = best, equal numbers = tie), ``all_bad``,
  ``skipped``, rationale, the order shown and the seconds spent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text,
                        UniqueConstraint, create_engine, event, func, inspect, insert, select, update)
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
logins_t = Table(
    "logins", metadata,
    Column("code_hash", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float),
)
sessions_t = Table(
    "sessions", metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
)
assignments_t = Table(
    "assignments", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user_id", Integer, ForeignKey("users.id"), nullable=False),
    Column("item_id", String(32), ForeignKey("items.id"), nullable=False, index=True),
    Column("display_order", Text, nullable=False),  # JSON list: response index at each display position
    Column("shown_at", Float, nullable=False),
    Column("leased_until", Float),  # set while unanswered; the slot is held while it is in the future
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

DEFAULT_SETTINGS = {"mode": "rank", "overlap": 1, "items_per_annotator": None, "guideline": "", "ab": None,
                    "lease_minutes": 30.0, "served_url": None, "public_url": None}
MAX_RATIONALE = 10000  # characters; a longer rationale is refused (400), never cut
LOGIN_CODE_DAYS = 7.0  # a login link works once, within this many days


class StoreError(ValueError):
    """A request the store refuses (unknown item, not assigned, malformed ranking)."""


class LeaseLost(StoreError):
    """An answer to an item whose lease expired and whose slot another annotator has taken since."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def item_id(prompt: Any, responses: Sequence[str], sources: Optional[Sequence[str]] = None,
            key: Optional[str] = None) -> str:
    """Stable id from content: the prompt and the *sorted* responses (and their sources in A/B mode),
    so the same item imported twice, or in another response order, gets the same id. With ``key`` (A/B
    mode: the store's secret) the id is an HMAC, so whoever sees the texts cannot recompute it for each
    assignment of sources and learn which run wrote which."""
    pairs = sorted(zip(responses, sources or [""] * len(responses)))
    blob = json.dumps({"prompt": prompt, "responses": pairs}, sort_keys=True, ensure_ascii=False).encode("utf-8")
    if key:
        return hmac.new(key.encode(), blob, hashlib.sha256).hexdigest()[:32]
    return hashlib.sha256(blob).hexdigest()[:32]


def database_url(db: str) -> str:
    """A SQLAlchemy URL as given (``postgresql://`` picks psycopg 3 when psycopg2 is absent), or a file
    path turned into a SQLite URL (its folder is created, the file itself 0600)."""
    if "://" in db:
        for plain in ("postgresql://", "postgres://"):
            if db.startswith(plain):
                import importlib.util

                if importlib.util.find_spec("psycopg2") is None and importlib.util.find_spec("psycopg") is not None:
                    return "postgresql+psycopg://" + db[len(plain):]
        return db
    path = Path(db).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # owner-only from the start: the database holds rationales and token hashes
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
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
    """All reads and writes of the annotation app; safe across threads and processes, one transaction
    per write. ``seed`` fixes the display-order draws (tests); by default they come from the OS."""

    def __init__(self, db: str, seed: Optional[int] = None):
        self.url = database_url(db)
        self.sqlite = self.url.startswith("sqlite")
        self.postgres = self.url.startswith("postgres")
        kwargs: Dict[str, Any] = {}
        if self.sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(self.url, **kwargs)
        if self.sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # every pooled connection
                dbapi_conn.isolation_level = None  # the driver's own BEGIN off: we emit ours (below)
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=FULL")
                cur.execute("PRAGMA busy_timeout=30000")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(self.engine, "begin")
            def _begin(conn):  # a write takes SQLite's write lock up front, so its reads are current
                conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")
        self._lock = threading.RLock()  # SQLite: one writer per process anyway; saves busy-waiting
        self._rng = random.Random(seed) if seed is not None else secrets.SystemRandom()
        with self._write() as c:
            metadata.create_all(c)
        self._migrate()
        with self._write() as c:
            if c.execute(select(meta_t.c.value).where(meta_t.c.key == "secret")).first() is None:
                c.execute(insert(meta_t).values(key="secret", value=secrets.token_hex(16)))
        self._secret = self._get("secret")

    def _migrate(self) -> None:
        """Stores made by an older alignkit: add the lease column (open assignments get a fresh lease)."""
        cols = {c["name"] for c in inspect(self.engine).get_columns("assignments")}
        if "leased_until" not in cols:
            with self._write() as c:
                c.exec_driver_sql("ALTER TABLE assignments ADD COLUMN leased_until FLOAT")
                answered = select(answers_t.c.item_id).where(answers_t.c.user_id == assignments_t.c.user_id)
                c.execute(update(assignments_t).where(assignments_t.c.item_id.not_in(answered))
                          .values(leased_until=time.time() + 60 * DEFAULT_SETTINGS["lease_minutes"]))

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction: ``BEGIN IMMEDIATE`` on SQLite, a plain transaction elsewhere (claims
        lock their rows)."""
        if self.sqlite:
            with self._lock, self.engine.connect() as c:
                c.execution_options(immediate=True)
                with c.begin():
                    yield c
        else:
            with self.engine.begin() as c:
                yield c

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
        with self._write() as c:
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
        with self._write() as c:
            seq = c.execute(select(func.coalesce(func.max(items_t.c.seq), 0))).scalar_one()
            for r in rows:
                iid = item_id(r["prompt"], r["responses"], r.get("sources"),
                              key=self._secret if r.get("sources") else None)
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

    # ------------------------------------------------------------ users, login codes, sessions
    def add_user(self, name: str, *, admin: bool = False, max_items: Optional[int] = None) -> str:
        """Create an annotator (or admin) and return its API token; only the token's hash is stored.
        Adding an existing name gives it a new token: the old one, its login codes and its browser
        sessions stop working."""
        if not name or len(name) > 200 or name != name.strip():
            raise StoreError(f"a user name is 1-200 characters without leading or trailing spaces, got {name!r}")
        token = secrets.token_urlsafe(32)
        with self._write() as c:
            row = c.execute(select(users_t.c.id).where(users_t.c.name == name)).first()
            values = dict(token_hash=hash_token(token), is_admin=admin, max_items=max_items)
            if row is None:
                c.execute(insert(users_t).values(name=name, created_at=time.time(), **values))
            else:
                c.execute(update(users_t).where(users_t.c.id == row[0]).values(**values))
                c.execute(sessions_t.delete().where(sessions_t.c.user_id == row[0]))
                c.execute(logins_t.delete().where(logins_t.c.user_id == row[0]))
        return token

    def login_code(self, name: str, days: float = LOGIN_CODE_DAYS) -> str:
        """A one-time login code for an existing user (the login link carries it); valid ``days``."""
        code = secrets.token_urlsafe(32)
        with self._write() as c:
            row = c.execute(select(users_t.c.id).where(users_t.c.name == name)).first()
            if row is None:
                raise StoreError(f"no user named {name!r}")
            c.execute(insert(logins_t).values(code_hash=hash_token(code), user_id=row[0],
                                              expires_at=time.time() + days * 86400))
        return code

    def _user_row(self, c, where) -> Optional[User]:
        r = c.execute(select(users_t).where(where)).mappings().first()
        return User(r["id"], r["name"], bool(r["is_admin"]), r["max_items"]) if r else None

    def user_for_code(self, code: Optional[str]) -> Optional[User]:
        """The user a login code belongs to while it is unused and unexpired (nothing is consumed)."""
        if not code:
            return None
        with self.engine.connect() as c:
            r = c.execute(select(logins_t).where(logins_t.c.code_hash == hash_token(code))).mappings().first()
            if r is None or r["used_at"] is not None or r["expires_at"] < time.time():
                return None
            return self._user_row(c, users_t.c.id == r["user_id"])

    def redeem_code(self, code: str) -> Optional[tuple]:
        """Exchange a login code, once, for a new browser session: (user, session value) or None."""
        now = time.time()
        with self._write() as c:
            res = c.execute(update(logins_t).where(logins_t.c.code_hash == hash_token(code or ""),
                                                   logins_t.c.used_at.is_(None), logins_t.c.expires_at >= now)
                            .values(used_at=now).returning(logins_t.c.user_id)).first()
            if res is None:
                return None
            session = secrets.token_urlsafe(32)
            c.execute(insert(sessions_t).values(id_hash=hash_token(session), user_id=res[0], created_at=now))
            return self._user_row(c, users_t.c.id == res[0]), session

    def user_for_session(self, session: Optional[str]) -> Optional[User]:
        if not session:
            return None
        with self.engine.connect() as c:
            uid = c.execute(select(sessions_t.c.user_id).where(sessions_t.c.id_hash == hash_token(session))).first()
            return self._user_row(c, users_t.c.id == uid[0]) if uid else None

    def end_session(self, session: str) -> None:
        with self._write() as c:
            c.execute(sessions_t.delete().where(sessions_t.c.id_hash == hash_token(session)))

    def user_for_token(self, token: Optional[str]) -> Optional[User]:
        if not token:
            return None
        with self.engine.connect() as c:
            return self._user_row(c, users_t.c.token_hash == hash_token(token))

    def users(self) -> Dict[int, str]:
        with self.engine.connect() as c:
            return {r.id: r.name for r in c.execute(select(users_t.c.id, users_t.c.name))}

    # ------------------------------------------------------------ assignment
    def _draw_order(self, k: int) -> List[int]:
        order = list(range(k))
        self._rng.shuffle(order)
        return order

    def quota(self, user: User) -> int:
        """How many items this annotator is meant to answer: its own quota, else the task's, else all."""
        s = self.settings()
        with self.engine.connect() as c:
            n_items = c.execute(select(func.count()).select_from(items_t)).scalar_one()
        cap = user.max_items if user.max_items is not None else s["items_per_annotator"]
        return n_items if cap is None else min(int(cap), n_items)

    @staticmethod
    def _taken(iid_col, now: float, exclude_user: Optional[int] = None):
        """Slots of an item in use: ranked answers plus live leases (of others than ``exclude_user``)."""
        ans = select(func.count()).select_from(answers_t).where(answers_t.c.item_id == iid_col,
                                                                answers_t.c.skipped.is_(False))
        lease = select(func.count()).select_from(assignments_t).where(assignments_t.c.item_id == iid_col,
                                                                      assignments_t.c.leased_until >= now)
        if exclude_user is not None:
            ans = ans.where(answers_t.c.user_id != exclude_user)
            lease = lease.where(assignments_t.c.user_id != exclude_user)
        return ans.scalar_subquery() + lease.scalar_subquery()

    def _lock_item(self, c, iid: str) -> None:
        if self.postgres:  # claims of one item queue here; the recount that follows sees the winner's row
            c.execute(select(items_t.c.id).where(items_t.c.id == iid).with_for_update())

    def _slot_free(self, c, user: User, iid: str, overlap: int, now: float) -> bool:
        self._lock_item(c, iid)
        return c.execute(select(self._taken(iid, now, exclude_user=user.id))).scalar_one() < overlap

    def current(self, user: User) -> Optional[Assignment]:
        """The item this annotator works on now: an open assignment (its lease renewed; an expired one
        only while its slot is still free), else a newly claimed item (fewest annotators first, below
        the overlap, within the quota), else None. Admins are never given items."""
        if user.is_admin:
            return None
        s = self.settings()
        overlap, lease = int(s["overlap"]), 60.0 * float(s["lease_minutes"])
        quota = self.quota(user)
        with self._write() as c:
            now = time.time()
            if self.postgres:  # one claim at a time per annotator (two tabs, two server processes)
                c.execute(select(users_t.c.id).where(users_t.c.id == user.id).with_for_update())
            open_rows = c.execute(select(assignments_t).where(
                assignments_t.c.user_id == user.id, assignments_t.c.leased_until.is_not(None))
                .order_by(assignments_t.c.shown_at.desc(), assignments_t.c.id.desc())).mappings().all()
            chosen = None
            for a in open_rows:
                if a["leased_until"] >= now or self._slot_free(c, user, a["item_id"], overlap, now):
                    chosen = a
                    break
                # the lease ran out and the slot went to someone else: the item leaves this queue
                c.execute(assignments_t.delete().where(assignments_t.c.id == a["id"]))
            if chosen is None:
                done = c.execute(select(func.count()).select_from(answers_t).where(
                    answers_t.c.user_id == user.id, answers_t.c.skipped.is_(False))).scalar_one()
                if done >= quota:
                    return None
                mine_a = select(assignments_t.c.item_id).where(assignments_t.c.user_id == user.id)
                mine_b = select(answers_t.c.item_id).where(answers_t.c.user_id == user.id)
                taken = self._taken(items_t.c.id, now)
                tried: List[str] = []
                skip_locked = True
                for _ in range(64):
                    q = (select(items_t.c.id, items_t.c.responses)
                         .where(taken < overlap, items_t.c.id.not_in(mine_a), items_t.c.id.not_in(mine_b))
                         .order_by(taken, items_t.c.seq).limit(1))
                    if tried:
                        q = q.where(items_t.c.id.not_in(tried))
                    if self.postgres:  # skip rows another process is claiming; last resort: wait for them
                        q = q.with_for_update(of=items_t, skip_locked=skip_locked)
                    row = c.execute(q).first()
                    if row is None:
                        if self.postgres and skip_locked:
                            skip_locked = False  # all candidates locked: wait for them, then recount
                            continue
                        return None
                    # recount under the row lock (PostgreSQL: a newer snapshot than the search's)
                    if c.execute(select(self._taken(row[0], now))).scalar_one() < overlap:
                        break
                    tried.append(row[0])
                else:
                    return None
                c.execute(insert(assignments_t).values(
                    user_id=user.id, item_id=row[0], shown_at=now, leased_until=now + lease,
                    display_order=json.dumps(self._draw_order(len(json.loads(row[1]))))))
                chosen = c.execute(select(assignments_t).where(assignments_t.c.user_id == user.id,
                                                               assignments_t.c.item_id == row[0])).mappings().first()
            else:
                c.execute(update(assignments_t).where(assignments_t.c.id == chosen["id"])
                          .values(leased_until=max(now + lease, chosen["leased_until"])))
            item = c.execute(select(items_t).where(items_t.c.id == chosen["item_id"])).mappings().first()
        return Assignment(item["id"], json.loads(item["prompt"]), json.loads(item["responses"]),
                          json.loads(chosen["display_order"]))

    def why_nothing(self, user: User) -> Dict[str, Any]:
        """Why :meth:`current` has nothing for this annotator: ``reason`` is admin, quota (its items are
        answered), finished (every item answered or skipped by it), taken (the other items have their
        annotators) or leased (others hold the rest; ``retry_minutes`` until the first lease ends)."""
        prog = self.progress(user)
        if user.is_admin:
            return {"reason": "admin", **prog}
        if prog["done"] >= prog["total"]:
            return {"reason": "quota", **prog}
        now = time.time()
        s = self.settings()
        with self.engine.connect() as c:
            mine = select(answers_t.c.item_id).where(answers_t.c.user_id == user.id)
            left = c.execute(select(items_t.c.id).where(items_t.c.id.not_in(mine))).all()
            if not left:
                return {"reason": "finished", **prog}
            leased = c.execute(select(func.min(assignments_t.c.leased_until)).where(
                assignments_t.c.item_id.in_([r[0] for r in left]), assignments_t.c.leased_until >= now,
                assignments_t.c.user_id != user.id)).scalar_one()
        if leased is not None:
            return {"reason": "leased", "retry_minutes": max(1, int((leased - now) / 60 + 0.999)),
                    "overlap": int(s["overlap"]), **prog}
        return {"reason": "taken", "overlap": int(s["overlap"]), **prog}

    # ------------------------------------------------------------ answers
    def answer(self, user: User, iid: str, *, groups: Optional[Sequence[Sequence[int]]] = None,
               all_bad: bool = False, skip: bool = False, rationale: str = "") -> bool:
        """Store one answer in one transaction. ``groups``: display-position tie groups, best first; with
        ``all_bad`` and no groups every response ties. True when stored, False when this annotator had
        already answered the item (a retry: nothing changes). Refuses items not assigned to the user,
        rationales over :data:`MAX_RATIONALE` characters, and (:class:`LeaseLost`) a ranking whose lease
        ran out after another annotator took the slot. A skip frees the item's slot."""
        if rationale and len(rationale) > MAX_RATIONALE:
            raise StoreError(f"the rationale has {len(rationale)} characters; the limit is {MAX_RATIONALE}")
        overlap = int(self.settings()["overlap"])
        with self._write() as c:
            a = c.execute(select(assignments_t).where(assignments_t.c.user_id == user.id,
                                                      assignments_t.c.item_id == iid)).mappings().first()
            if a is None:
                raise PermissionError("this item is not assigned to you")
            if c.execute(select(answers_t.c.id).where(answers_t.c.user_id == user.id,
                                                      answers_t.c.item_id == iid)).first() is not None:
                return False
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
            if ranks is not None and (a["leased_until"] is None or a["leased_until"] < now) \
                    and not self._slot_free(c, user, iid, overlap, now):
                raise LeaseLost("this item's lease ran out and another annotator has taken it; "
                                "your answer was not stored (reload for your next item)")
            try:
                with c.begin_nested():
                    c.execute(insert(answers_t).values(
                        user_id=user.id, item_id=iid, ranks=json.dumps(ranks) if ranks is not None else None,
                        all_bad=bool(all_bad), skipped=bool(skip), rationale=rationale or "",
                        display_order=a["display_order"], seconds=now - a["shown_at"], created_at=now))
            except IntegrityError:
                return False
            c.execute(update(assignments_t).where(assignments_t.c.id == a["id"]).values(leased_until=None))
        return True

    def undo(self, user: User) -> Optional[str]:
        """Delete this annotator's most recent answer; its item becomes the current one again, in the
        same order (a skipped item only while a slot is free). Returns the item id, or None when there
        is nothing to undo."""
        s = self.settings()
        overlap, lease = int(s["overlap"]), 60.0 * float(s["lease_minutes"])
        with self._write() as c:
            last = c.execute(select(answers_t.c.id, answers_t.c.item_id, answers_t.c.skipped)
                             .where(answers_t.c.user_id == user.id)
                             .order_by(answers_t.c.id.desc()).limit(1)).first()
            if last is None:
                return None
            now = time.time()
            c.execute(answers_t.delete().where(answers_t.c.id == last[0]))
            mine = (assignments_t.c.user_id == user.id) & (assignments_t.c.item_id == last[1])
            if last[2] and not self._slot_free(c, user, last[1], overlap, now):
                c.execute(assignments_t.delete().where(mine))  # a skipped item others have taken since
            else:  # back to the front of the queue, its clock restarted, the order kept
                c.execute(update(assignments_t).where(mine).values(shown_at=now, leased_until=now + lease))
        return last[1]

    def progress(self, user: User) -> Dict[str, int]:
        with self.engine.connect() as c:
            n = dict(c.execute(select(answers_t.c.skipped, func.count()).where(answers_t.c.user_id == user.id)
                               .group_by(answers_t.c.skipped)).all())
        done, skipped = int(n.get(False, 0)), int(n.get(True, 0))
        return {"done": done, "skipped": skipped, "total": max(self.quota(user), done)}

    def answers(self, user_id: Optional[int] = None) -> List[Dict[str, Any]]:
        """Answers (all, or one annotator's) with the user's name, oldest first; ``ranks`` per stored
        response (admins and exports only: in A/B mode these say which run was ranked where)."""
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

    def own_answers(self, user: User) -> List[Dict[str, Any]]:
        """An annotator's own answers as that annotator saw them: ``ranks`` per display position
        (``ranks[p]`` = rank given to the response shown at position p + 1). No stored order and no
        stored response index leave the server, so a blind A/B judge learns nothing new from them."""
        out = []
        for a in self.answers(user.id):
            pos_ranks = [a["ranks"][i] for i in a["order"]] if a["ranks"] is not None else None
            out.append({"item_id": a["item_id"], "ranks": pos_ranks, "all_bad": a["all_bad"],
                        "skipped": a["skipped"], "rationale": a["rationale"], "seconds": a["seconds"],
                        "created_at": a["created_at"]})
        return out

    def import_answer(self, user_name: str, iid: str, ranks: Optional[List[int]], *, order: Sequence[int],
                      all_bad: bool = False, rationale: str = "", seconds: Optional[float] = None) -> bool:
        """Store an answer made elsewhere (Label Studio, Argilla) for an existing item; the annotator is
        created without a usable token. False when that annotator already answered the item."""
        with self._write() as c:
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
