"""Test helpers for the annotation app: a real uvicorn server in a background thread, a tiny HTTP
client on urllib/http.client, the browser login, and the ``db`` fixture that runs a test on SQLite and
on PostgreSQL (``ALIGNKIT_TEST_PG_URL``, a server URL whose user may create databases; `.ci/run` starts
one and exports it, and with ``CI=true`` a missing URL fails instead of skipping)."""

import http.client as httpclient
import json
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlencode, urlsplit

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(store) as url:`` serves ``create_app(store, **kw)`` on 127.0.0.1."""

    def __init__(self, store, **kw):
        import uvicorn

        from alignkit.annotate.app import create_app

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(store, **kw), host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 20:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def http(method: str, url: str, body=None, token=None, headers=None):
    """(status, parsed JSON or text) of one request; never raises on HTTP errors."""
    status, _, parsed = http_full(method, url, body, token, headers)
    return status, parsed


def http_full(method: str, url: str, body=None, token=None, headers=None, raw: bytes = None):
    """(status, headers dict (lower-case names), parsed JSON or text); redirects are not followed."""
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h["Content-Type"] = "application/json"
    p = urlsplit(url)
    conn = httpclient.HTTPConnection(p.hostname, p.port, timeout=60)
    try:
        conn.request(method, p.path + (f"?{p.query}" if p.query else ""), body=data, headers=h)
        r = conn.getresponse()
        status, hdrs, text = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
        hdrs["set-cookie-all"] = r.headers.get_all("set-cookie") or []
    finally:
        conn.close()
    try:
        return status, hdrs, json.loads(text)
    except json.JSONDecodeError:
        return status, hdrs, text


def cookies_of(hdrs) -> dict:
    return {c.split("=", 1)[0]: c.split("=", 1)[1].split(";", 1)[0] for c in hdrs["set-cookie-all"]}


def browser_login(url: str, store, name: str):
    """Log ``name`` in the way a browser does (link -> confirmation page -> POST): (session cookie
    header dict, CSRF token of the annotation page)."""
    code = store.login_code(name)
    s, hdrs, page = http_full("GET", f"{url}/login?code={code}")
    assert s == 200, page
    nonce = cookies_of(hdrs)["alignkit_login"]
    form = urlencode({"code": code, "nonce": page.split('name="nonce" value="')[1].split('"')[0]}).encode()
    s, hdrs, _ = http_full("POST", f"{url}/login", raw=form, headers={
        "Cookie": f"alignkit_login={nonce}", "Content-Type": "application/x-www-form-urlencoded"})
    assert s == 303, s
    cookie = {"Cookie": f"alignkit_annotate={cookies_of(hdrs)['alignkit_annotate']}"}
    s, page = http("GET", url + "/", headers=cookie)
    csrf = json.loads(page.split('id="state">')[1].split("</script>")[0])["csrf"] if s == 200 and "state" in page else None
    return cookie, csrf


def pg_admin_url() -> str:
    url = os.environ.get("ALIGNKIT_TEST_PG_URL")
    if not url:
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail("CI is set but ALIGNKIT_TEST_PG_URL is not: .ci/run starts PostgreSQL and exports it")
        pytest.skip("no PostgreSQL server: set ALIGNKIT_TEST_PG_URL=postgresql://USER@HOST:PORT/postgres")
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh store URL: a SQLite file, or a new database on the PostgreSQL test server (dropped after)."""
    if request.param == "sqlite":
        yield str(tmp_path / "a.db")
        return
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from alignkit.annotate.store import database_url

    admin = database_url(pg_admin_url())
    name = "alignkit_test_" + secrets.token_hex(6)
    eng = create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with eng.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        eng.dispose()
