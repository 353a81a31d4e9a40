"""alignkit annotate for a team (issue 35): blind A/B that stays blind, exports whose computed fields
win, a 4xx with the security headers for every bad request, assignment that finishes the task (leases,
skips, admins, several server processes), a reverse proxy, login without login CSRF, and the CLI."""

import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from alignkit.annotate import AnnotateConfig, prepare_store, run_annotate, served_url
from alignkit.annotate.export import collect, export
from alignkit.annotate.store import Store
from alignkit.eval.stats import binomial_interval
from tests.annotate_server import (ServerThread, browser_login, cookies_of, db, free_port, http,  # noqa: F401
                                   http_full)
from tests.helpers import write_jsonl

SECURITY = {"content-security-policy": "default-src 'none'", "x-content-type-options": "nosniff"}


def assert_secure(hdrs, what=""):
    for name, value in SECURITY.items():
        assert value in hdrs.get(name, ""), (what, name, hdrs.get(name))


# ---------------------------------------------------------------- 1. blind A/B stays blind

def _ab_store(tmp_path, n, seed=7):
    for run, style in (("base", "a"), ("new", "b")):
        (tmp_path / run).mkdir()
        # texts that do not tell the runs apart: random-looking strings of one length
        write_jsonl(tmp_path / run / "samples.jsonl", [
            {"tag": "policy", "prompt": f"p{i}", "completion": hashlib.sha256(f"{style}{i}".encode()).hexdigest()[:20]}
            for i in range(n)])
    store, _ = prepare_store(AnnotateConfig(db=str(tmp_path / "ab.db"), mode="ab",
                                            ab_runs=[str(tmp_path / "base"), str(tmp_path / "new")]))
    return Store(str(tmp_path / "ab.db"), seed=seed)


def test_adversarial_judge_guesses_run_a_at_chance(tmp_path, monkeypatch):
    """A judge who uses every endpoint (page, item, answer, own answers, undo, the item again) and
    every trick the old app fell to guesses which response is run A's no better than a coin (a 95%
    Wilson interval over 100 items contains 0.5, for each strategy); the export's win rate comes from
    the stored mapping and reports the judge's position bias."""
    import random

    import alignkit.annotate.tasks as tasks

    n = 100
    # both draws seeded (the stored order at import, the display orders), so the counts are fixed
    monkeypatch.setattr(tasks, "_RNG", random.Random(3))
    store = _ab_store(tmp_path, n)
    truth = {it["id"]: it for it in store.items()}
    tok = store.add_user("judge")
    runs = {"A": {}, "B": {}}  # the texts each run wrote: what the judge wants to find out
    for it in truth.values():
        for text, src in zip(it["responses"], it["sources"]):
            runs[src][text] = it["id"]
    strategies = ("position_1", "answers_ranks", "undo_order", "id_hash", "page_order")
    correct = {s: 0 for s in strategies}
    with ServerThread(store) as url:
        for _ in range(n):
            page = http("GET", url + "/", token=tok)[1]
            _, item = http("GET", url + "/api/item", token=tok)
            assert set(item) == {"item_id", "prompt", "progress", "responses"}
            assert all(set(r) == {"position", "text"} for r in item["responses"])
            texts = [r["text"] for r in item["responses"]]
            iid = item["item_id"]
            # answer "position 1 best", then read it back as the API reports it
            assert http("POST", url + "/api/answer", {"item_id": iid, "groups": [[1], [2]]}, token=tok)[0] == 200
            mine = [a for a in http("GET", url + "/api/answers", token=tok)[1] if a["item_id"] == iid][0]
            assert set(mine) == {"item_id", "ranks", "all_bad", "skipped", "rationale", "seconds", "created_at"}
            # undo: the item comes back; compare the order, then answer again
            assert http("POST", url + "/api/undo", {}, token=tok)[1] == {"undone": iid}
            again = http("GET", url + "/api/item", token=tok)[1]
            assert again["item_id"] == iid
            texts2 = [r["text"] for r in again["responses"]]
            assert http("POST", url + "/api/answer", {"item_id": iid, "groups": [[1], [2]]}, token=tok)[0] == 200
            # the id: a content hash with sources could be recomputed for each assignment of runs
            plain = {}
            for srcs in (["A", "B"], ["B", "A"]):
                pairs = sorted(zip(texts, srcs))
                blob = json.dumps({"prompt": item["prompt"], "responses": pairs}, sort_keys=True, ensure_ascii=False)
                plain[hashlib.sha256(blob.encode()).hexdigest()[:32]] = srcs
            guesses = {
                "position_1": 0,  # run A is shown first
                "answers_ranks": 0 if mine["ranks"][0] == 1 else 1,  # old leak: ranks[0] was run A's
                "undo_order": 0 if texts2 == texts else 1,  # old leak: a fixed order came back
                "id_hash": plain[iid].index("A") if iid in plain else 0,
                "page_order": 0 if page.find(texts[0]) < page.find(texts[1]) else 1,
            }
            for s, pos in guesses.items():
                correct[s] += runs["A"].get(texts[pos]) == iid
    print("correct guesses per strategy:", correct)
    for s in strategies:
        ci = binomial_interval(correct[s], n)
        assert ci.lo <= 0.5 <= ci.hi, (s, correct[s])
    # the judge always picked position 1: the win rate of B is the share of items where B came first,
    # from the stored mapping, and the position bias shows as 1.0
    ab = collect(store)["ab"]
    answers = store.answers()
    b_first = sum(truth[a["item_id"]]["sources"][a["order"][0]] == "B" for a in answers)
    assert len(answers) == n and ab["win_rate"] == pytest.approx(b_first / n)
    assert ab["first_shown_preferred"] == 1.0 and ab["a_shown_first"] == pytest.approx(1 - b_first / n)
    html = (Path(export(store, str(tmp_path / "out"))["output"]) / "agreement.html").read_text()
    assert "Position bias" in html


# ---------------------------------------------------------------- 2. exports: computed fields win

def test_export_keeps_the_task_row_fields_under_meta(tmp_path, db):
    row = {"prompt": "Which is right?", "chosen": "the AI's pick", "rejected": "the other one", "soft_label": 0.0,
           "item_id": "row-17", "scores": [9, 9], "annotators": 99, "judge": "gpt-x"}
    f = write_jsonl(tmp_path / "prefs.jsonl", [row])
    store, _ = prepare_store(AnnotateConfig(db=db, task=str(f)))
    tok = store.add_user("ann")
    u = store.user_for_token(tok)
    a = store.current(u)
    other = a.order.index(1) + 1  # display position of "the other one" (response 1)
    assert store.answer(u, a.item_id, groups=[[other], [3 - other]])  # ranked the other way
    res = collect(store)
    meta = {"soft_label": 0.0, "item_id": "row-17", "scores": [9, 9], "annotators": 99, "judge": "gpt-x"}
    [pair] = res["pairs"]
    assert (pair["chosen"], pair["rejected"], pair["soft_label"]) == ("the other one", "the AI's pick", 1.0)
    assert (pair["item_id"], pair["annotators"], pair["meta"]) == (a.item_id, 1, meta)
    [ranking] = res["rankings"]
    assert ranking["responses"] == ["the other one", "the AI's pick"] and ranking["scores"] == [1.0, 0.0]
    assert (ranking["item_id"], ranking["annotators"], ranking["meta"]) == (a.item_id, 1, meta)
    export(store, str(tmp_path / "out"))
    on_disk = json.loads((tmp_path / "out" / "pairs.jsonl").read_text())
    assert on_disk["soft_label"] == 1.0 and on_disk["meta"]["soft_label"] == 0.0


# ---------------------------------------------------------------- 3. bad requests: 4xx + headers

def test_every_bad_request_is_a_4xx_with_the_security_headers(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "q", "responses": ["x", "y"]}])
    tok, admin = store.add_user("ann"), store.add_user("boss", admin=True)
    with ServerThread(store, max_body=200_000) as url:
        iid = http("GET", url + "/api/item", token=tok)[1]["item_id"]
        cases = [
            ("POST", "/api/answer", tok, b"[" * 50_000, 400),  # nesting: no RecursionError
            ("POST", "/api/answer", tok, json.dumps({"item_id": iid, "groups": [[[[[[[[[1]]]]]]]]]}).encode(), 400),
            ("POST", "/api/answer", tok, b"{not json", 400),
            ("POST", "/api/answer", tok, json.dumps({"item_id": iid, "groups": [[1], [2]], "mood": "x"}).encode(), 400),
            ("POST", "/api/answer", tok, json.dumps({"item_id": iid, "all_bad": "yes"}).encode(), 400),
            ("POST", "/api/answer", tok, json.dumps({"item_id": iid, "groups": [[1], [2]],
                                                     "rationale": "r" * 10_001}).encode(), 400),
            ("POST", "/api/answer", tok, json.dumps({"item_id": iid, "groups": [[1], [2]],
                                                     "rationale": "r" * 300_000}).encode(), 413),  # over --max-body
            ("POST", "/api/undo", tok, b"[1]", 400),
            ("GET", "/admin?aggregate=x", admin, None, 400),
            ("GET", "/admin/export?kind=pairs&aggregate=x", admin, None, 400),
            ("GET", "/admin/export?kind=everything", admin, None, 400),
            ("GET", "/nowhere", tok, None, 404),
            ("GET", "/api/answer", tok, None, 405),
            ("DELETE", "/", tok, None, 405),
        ]
        for method, path, t, raw, want in cases:
            s, hdrs, body = http_full(method, url + path, token=t, raw=raw,
                                      headers={"Content-Type": "application/json"} if raw else None)
            assert s == want, (path, raw[:40] if raw else None, s, body)
            assert_secure(hdrs, path)
            assert "Traceback" not in json.dumps(body)
        # a body without Content-Length (chunked) over the limit: 413 as well
        import http.client as hc

        conn = hc.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        chunks = [b'{"rationale": "'] + [b"r" * 100_000] * 5 + [b'"}']
        conn.request("POST", "/api/answer", body=iter(chunks),
                     headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"},
                     encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 413 and "nosniff" in r.getheader("x-content-type-options")
        conn.close()
        assert store.answers() == []  # nothing was stored, nothing was cut
        s, _ = http("POST", url + "/api/answer", {"item_id": iid, "groups": [[1], [2]], "rationale": "r" * 10_000},
                    token=tok)
        assert s == 200 and len(store.answers()[0]["rationale"]) == 10_000
        # a server error: a generic message, and the same headers
        store.progress = lambda user: 1 / 0
        s, hdrs, body = http_full("GET", url + "/api/item", token=tok)
        assert s == 500 and "ZeroDivision" not in json.dumps(body)
        assert_secure(hdrs, "500")


# ---------------------------------------------------------------- 4. assignment finishes the task

def test_leases_skips_admins_and_an_idle_annotator_every_item_ends_annotated(db):
    store = Store(db)
    store.add_items([{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(10)])
    lease = 4.0
    store.set_settings(overlap=1, lease_minutes=lease / 60)
    admin = store.add_user("boss", admin=True)
    idle, skipper, worker = (store.add_user(n) for n in ("idle", "sam", "wu"))
    with ServerThread(store) as url:
        # an admin opening the page or asking for an item takes nothing
        s, hdrs, _ = http_full("GET", url + "/", token=admin)
        assert s == 303 and hdrs["location"] == "admin"
        assert http("GET", url + "/api/item", token=admin)[1]["reason"] == "admin"
        # sam skips three items: each skip frees its slot at once
        skipped = []
        for _ in range(3):
            iid = http("GET", url + "/api/item", token=skipper)[1]["item_id"]
            assert http("POST", url + "/api/answer", {"item_id": iid, "skip": True}, token=skipper)[0] == 200
            skipped.append(iid)
        # the idle annotator opens an item and walks away
        idle_item = http("GET", url + "/api/item", token=idle)[1]["item_id"]
        t_idle = time.time()
        # wu answers everything there is; the idle annotator's item is leased, so wu waits for it
        got, waited = [], False
        while True:
            item = http("GET", url + "/api/item", token=worker)[1]
            if item["item_id"] is None:
                if item["reason"] == "leased" and not waited:
                    time.sleep(max(0.0, t_idle + lease + 0.2 - time.time()))  # the lease runs out
                    waited = True
                    continue
                assert item["reason"] == "quota", item  # 10 of 10 answered
                break
            got.append(item["item_id"])
            assert http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[2], [1]]},
                        token=worker)[0] == 200
        assert (waited or time.time() - t_idle > lease) and set(skipped) <= set(got) and idle_item in got and len(got) == 10
        # the idle annotator comes back: its answer is refused (the slot went to wu), nothing stored
        s, body = http("POST", url + "/api/answer", {"item_id": idle_item, "groups": [[1], [2]]}, token=idle)
        assert s == 409 and "not stored" in body["error"]
        assert http("GET", url + "/api/item", token=idle)[1] == {
            "item_id": None, "progress": {"done": 0, "skipped": 0, "total": 10}, "reason": "taken"}
    ranked = [a for a in Store(db).answers() if not a["skipped"]]
    per_item = {}
    for a in ranked:
        per_item[a["item_id"]] = per_item.get(a["item_id"], 0) + 1
    assert len(per_item) == 10 and set(per_item.values()) == {1}  # every item annotated, overlap exact
    with store.engine.connect() as c:
        assert c.exec_driver_sql("SELECT COUNT(*) FROM assignments a JOIN users u ON u.id = a.user_id "
                                 "WHERE u.is_admin").scalar() == 0


def test_undo_of_a_skip_and_an_expired_lease_that_is_still_free(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": f"q{i}", "responses": ["x", "y"]} for i in range(2)])
    store.set_settings(overlap=1, lease_minutes=0.5 / 60)
    a, b = (store.user_for_token(store.add_user(n)) for n in ("a", "b"))
    first = store.current(a)
    time.sleep(0.6)  # expired, but nobody took it: a keeps the item, and its answer counts
    assert store.current(a).item_id == first.item_id
    time.sleep(0.6)
    assert store.answer(a, first.item_id, groups=[[1], [2]])
    second = store.current(a)
    assert store.answer(a, second.item_id, skip=True)  # frees the slot ...
    assert store.current(b).item_id == second.item_id  # ... which b takes
    assert store.undo(a) == second.item_id  # a's undo of the skip cannot take it back
    assert store.current(a) is None and store.why_nothing(a)["reason"] == "leased"


@pytest.mark.slow
def test_two_server_processes_store_every_answer_once_with_exact_overlap(tmp_path, db):
    """`alignkit annotate --workers 2`: 6 annotators at once against two uvicorn worker processes on
    one database; overlap 2 stays exact and every acknowledged answer is stored once."""
    from tests.test_annotate import _start_cli_server

    store = Store(db)
    store.add_items([{"prompt": f"q{i}", "responses": [f"r{i}a", f"r{i}b", f"r{i}c"]} for i in range(40)])
    store.set_settings(overlap=2)
    tokens = [store.add_user(f"ann{i}") for i in range(6)]
    port = free_port()
    proc = _start_cli_server(db, port, tmp_path, workers=2)
    url = f"http://127.0.0.1:{port}"
    acked = {i: [] for i in range(6)}
    errors = []

    def annotator(i):
        try:
            while True:
                s, item = http("GET", url + "/api/item", token=tokens[i])
                assert s == 200, item
                if item["item_id"] is None:
                    return
                s, res = http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[1], [2], [3]]},
                              token=tokens[i])
                assert s == 200 and res["stored"], res
                acked[i].append(item["item_id"])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    try:
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        threads = [threading.Thread(target=annotator, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    finally:
        proc.terminate()
        proc.wait(20)
    assert len(workers) >= 2, workers  # two worker processes (and, on some platforms, a helper)
    assert not errors, errors[:3]
    answers = Store(db).answers()
    assert sorted((a["user"], a["item_id"]) for a in answers) == sorted(
        (f"ann{i}", iid) for i, v in acked.items() for iid in v)
    per_item = {}
    for a in answers:
        per_item[a["item_id"]] = per_item.get(a["item_id"], 0) + 1
    assert len(answers) == 80 and set(per_item.values()) == {2} and len(per_item) == 40


# ---------------------------------------------------------------- 6. behind a proxy

def test_behind_a_proxy_that_rewrites_host(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "q", "responses": ["x", "y"]}, {"prompt": "r", "responses": ["x", "z"]}])
    store.add_user("ann")
    public = "https://annotate.example.org"
    for public_url, want in ((None, 403), (public, 200)):
        with ServerThread(store, public_url=public_url) as url:
            cookie, csrf = browser_login(url, store, "ann")
            iid = http("GET", url + "/api/item", headers=cookie)[1]["item_id"]
            # what nginx's default proxy_pass forwards: the browser's Origin, Host rewritten to the upstream
            proxied = {**cookie, "X-CSRF-Token": csrf, "Origin": public, "Host": url.split("//")[1]}
            s, body = http("POST", url + "/api/answer", {"item_id": iid, "groups": [[1], [2]]}, headers=proxied)
            assert s == want, body
            if public_url:  # another site is still refused
                s, _ = http("POST", url + "/api/undo", {}, headers={**proxied, "Origin": "https://evil.example"})
                assert s == 403
    # add-user's links use the public URL the server was started with (stored) or --public-url
    store.set_settings(served_url="http://127.0.0.1:9999", public_url=public)
    assert run_annotate(args=["add-user", "bob"], db=str(tmp_path / "a.db"))["login_url"].startswith(public + "/login?code=")
    link = run_annotate(args=["add-user", "eve"], db=str(tmp_path / "a.db"), public_url="https://x.test/")["login_url"]
    assert link.startswith("https://x.test/login?code=")


# ---------------------------------------------------------------- 7. login without login CSRF

def test_login_link_is_exchanged_once_and_cross_site_cannot_switch_a_session(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "q", "responses": ["x", "y"]}])
    store.add_user("alice")
    store.add_user("mallory")
    with ServerThread(store) as url:
        alice_cookie, _ = browser_login(url, store, "alice")
        code = store.login_code("mallory")
        # a cross-site page sends alice's browser to mallory's link: a confirmation page, nothing switched
        s, hdrs, page = http_full("GET", f"{url}/login?code={code}", headers=alice_cookie)
        assert s == 200 and "Log in as mallory?" in page and "logged in as <b>alice</b>" in page
        assert "alignkit_annotate" not in cookies_of(hdrs)
        assert_secure(hdrs)
        assert "alice" in http("GET", url + "/", headers=alice_cookie)[1]
        # ... and the auto-submitted cross-site form: no SameSite=Strict nonce cookie, a foreign Origin
        nonce_in_page = page.split('name="nonce" value="')[1].split('"')[0]
        form = urlencode({"code": code, "nonce": nonce_in_page}).encode()
        ctype = {"Content-Type": "application/x-www-form-urlencoded"}
        for extra in ({**alice_cookie}, {"Cookie": f"alignkit_login={nonce_in_page}", "Origin": "https://evil.example"}):
            s, hdrs, _ = http_full("POST", f"{url}/login", raw=form, headers={**ctype, **extra})
            assert s == 403 and "alignkit_annotate" not in cookies_of(hdrs)
        assert store.user_for_code(code).name == "mallory"  # still unused
        # a nonce cookie from another confirmation page does not match this form's
        other = cookies_of(http_full("GET", f"{url}/login?code={code}")[1])["alignkit_login"]
        s, _, _ = http_full("POST", f"{url}/login", raw=form, headers={**ctype, "Cookie": f"alignkit_login={other}"})
        assert s == 403 and other != nonce_in_page
        # the real confirmation: one exchange, a redirect to a URL without the code, then the link is dead
        s, hdrs, page = http_full("GET", f"{url}/login?code={code}")
        nonce = cookies_of(hdrs)["alignkit_login"]
        form = urlencode({"code": code, "nonce": page.split('name="nonce" value="')[1].split('"')[0]}).encode()
        s, hdrs, _ = http_full("POST", f"{url}/login", raw=form, headers={**ctype, "Cookie": f"alignkit_login={nonce}"})
        assert s == 303 and hdrs["location"] == "./"
        [set_session] = [c for c in hdrs["set-cookie-all"] if c.startswith("alignkit_annotate=")]
        assert "HttpOnly" in set_session and "samesite=strict" in set_session.lower()
        session = cookies_of(hdrs)["alignkit_annotate"]
        assert session != code and "mallory" in http("GET", url + "/", headers={"Cookie": f"alignkit_annotate={session}"})[1]
        s, page = http("GET", f"{url}/login?code={code}")
        assert s == 401 and "already used" in page
        s, hdrs, _ = http_full("POST", f"{url}/login", raw=form, headers={**ctype, "Cookie": f"alignkit_login={nonce}"})
        assert s == 401  # replaying the exchange: the code is spent
        # the old link format (the API token in the URL) is refused
        s, page = http("GET", f"{url}/login?token={store.add_user('old')}")
        assert s == 400 and "new link" in page
        # a new token for a name ends its browser sessions
        store.add_user("mallory")
        assert http("GET", url + "/api/item", headers={"Cookie": f"alignkit_annotate={session}"})[0] == 401


# ---------------------------------------------------------------- 9. CLI

def test_cli_names_with_equals_links_ipv6_task_label_and_private_db(tmp_path, capsys):
    from alignkit.cli import build_cli

    db = str(tmp_path / "new" / "ann.db")
    cli = build_cli()
    cli.main(["annotate", "add-user", "--name", "team=red", "--db", db], standalone_mode=False)
    out = capsys.readouterr().out
    assert "login link for team=red (works once, for 7 days): http://127.0.0.1:8765/login?code=" in out
    assert "API token for scripts" in out
    assert Store(db).users() and "team=red" in Store(db).users().values()
    for path in (db, db + "-wal"):  # owner-only: rationales and token hashes live here
        if os.path.exists(path):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert served_url("::1", 8765) == "http://[::1]:8765"
    assert served_url("127.0.0.1", 80) == "http://127.0.0.1:80"
    wild = served_url("0.0.0.0", 8765)
    assert not wild.startswith("http://0.0.0.0") and wild.endswith(":8765")
    assert ":::" not in served_url("::", 1) and served_url("::", 1).endswith(":1")  # not http://:::1
    cli.main(["annotate", "add-user", "ipv6", "--db", db, "--host", "::1", "--port", "9000"], standalone_mode=False)
    assert "http://[::1]:9000/login?code=" in capsys.readouterr().out
    f = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "q", "responses": ["a", "b"]}, {"prompt": "bad"}])
    prepare_store(AnnotateConfig(db=db, task=str(f)))
    out = capsys.readouterr().out
    assert out.startswith("task data: ") and "train data" not in out and "dropped 1" in out
