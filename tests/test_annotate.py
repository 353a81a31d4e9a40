"""alignkit annotate: store, access, concurrency, crash safety, rendering, export, agreement, A/B, imports."""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from alignkit.annotate import agreement as A
from alignkit.annotate import prepare_store, run_annotate, AnnotateConfig
from alignkit.annotate.app import render_text
from alignkit.annotate.export import collect, export
from alignkit.annotate.store import Store, item_id, ranks_from_groups
from tests.annotate_server import ServerThread, browser_login, db, free_port, http  # noqa: F401 (db: fixture)
from tests.helpers import write_jsonl

XSS = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


def task_rows(n, k=3):
    return [{"prompt": f"question {i}?", "completions": [f"answer {i}.{j}" for j in range(k)]} for i in range(n)]


# ---------------------------------------------------------------- statistics against hand arithmetic

def test_krippendorff_alpha_by_hand():
    # nominal, units [1,1] [1,0] [0,0]: o_11 = 2, o_10 = o_01 = 1, o_00 = 2; n_1 = n_0 = 3, n = 6
    # D_o = 2/6, D_e = 2 * 3 * 3 / (6 * 5) = 0.6, alpha = 1 - (1/3) / 0.6 = 4/9
    assert A.krippendorff_alpha([[1, 1], [1, 0], [0, 0]], "nominal") == pytest.approx(4 / 9)
    # interval on judgments, units [1,1] [1,-1] [0,1]: n_1 = 4, n_-1 = n_0 = 1, n = 6
    # D_o = (4 + 4 + 1 + 1) / 6, D_e = (2*16 + 2*4 + 2*1) / 30 = 1.4, alpha = 1 - (10/6) / 1.4 = -4/21
    assert A.krippendorff_alpha([[1, 1], [1, -1], [0, 1], [1]], "interval") == pytest.approx(-4 / 21)
    assert A.krippendorff_alpha([[1, 1], [0, 0], [1, 1, 1]]) == pytest.approx(1.0)  # perfect agreement


def test_fleiss_kappa_and_percent_agreement_by_hand():
    # 3 units x 3 raters, 2 categories: P_i = 1, 1/3, 1 -> P_bar = 7/9; p = 5/9, 4/9 -> P_e = 41/81
    # kappa = (7/9 - 41/81) / (1 - 41/81) = 22/40
    assert A.fleiss_kappa([[3, 0], [2, 1], [0, 3]]) == pytest.approx(0.55)
    # pairs of coders: [1,1] agree; [1,-1] not; [0,1,1]: (0,1) (0,1) (1,1) -> 1 of 3; total 2 of 5
    assert A.percent_agreement([[1, 1], [1, -1], [0, 1, 1]]) == pytest.approx(0.4)


def test_borda_majority_soft_labels_by_hand():
    answers = [[1, 2, 3], [2, 1, 3], [1, 1, 3]]  # ranks per response; the third ties 0 and 1
    # Borda per answer: [2,1,0], [1,2,0], [1.5,1.5,0] -> mean [1.5,1.5,0] -> consensus ranks [1,1,3]
    scores, ranks = A.borda(answers)
    assert scores == pytest.approx([1.5, 1.5, 0.0]) and ranks == [1, 1, 3]
    probs = A.pair_probabilities(answers)
    assert probs == pytest.approx({(0, 1): 0.5, (0, 2): 1.0, (1, 2): 1.0})
    copeland, ranks = A.majority(answers)
    assert copeland == pytest.approx([1.5, 1.5, 0.0]) and ranks == [1, 1, 3]
    assert A.majority([[1, 2, 3], [1, 3, 2], [2, 1, 3]])[1] == [1, 2, 3]
    # leave-one-out consensus: others' P(0 over 1) = 0.25 disagrees with mine; (0,2), (1,2) agree
    assert A.consensus_agreement([1, 2, 3], answers[1:]) == (2, 3)


def test_win_rate_and_position_bias_by_hand():
    # per-item means [1, .5, .5] -> 2/3; sd = sqrt(((1/3)^2 + 2 (1/6)^2) / 2) = sqrt(1/12); se = sd / sqrt(3)
    res = A.win_rate([[1.0, 1.0], [0.5], [0.0, 1.0]])
    half = 1.959964 * math.sqrt(1 / 12) / math.sqrt(3)
    assert res["win_rate"] == pytest.approx(2 / 3)
    assert res["ci_low"] == pytest.approx(2 / 3 - half) and res["ci_high"] == pytest.approx(2 / 3 + half)
    assert (res["wins"], res["ties"], res["losses"], res["items"]) == (3, 1, 1, 3)
    # shown-earlier wins: answer 1 yes; answer 2 no; answer 3 (order [2,0,1]): (0>1) yes, (0>2) no, (1>2) no
    bias = A.position_bias([([1, 2], [0, 1]), ([2, 1], [0, 1]), ([1, 2, 3], [2, 0, 1])])
    assert bias["first_shown_preferred"] == pytest.approx(2 / 5)
    assert bias["best_at_position_1"] == pytest.approx(1 / 3)
    assert bias["best_at_position_1_chance"] == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 3)


def test_ranks_from_display_groups():
    # shown order [2, 0, 1]: position 2 is response 0 (best), positions 1 and 3 (responses 2, 1) tie
    assert ranks_from_groups([[2], [1, 3]], [2, 0, 1]) == [1, 2, 2]
    with pytest.raises(ValueError, match="exactly once"):
        ranks_from_groups([[1], [1, 2]], [0, 1, 2])


# ---------------------------------------------------------------- store

def test_import_twice_no_duplicates_and_stable_ids(tmp_path):
    rows = task_rows(5)
    f = write_jsonl(tmp_path / "task.jsonl", rows + [{"prompt": "p", "responses": ["same", "same"]}, {"x": 1}])
    db = str(tmp_path / "a.db")
    _, s1 = prepare_store(AnnotateConfig(db=db, task=str(f)))
    # the same items again, responses in another order, as {prompt, responses}, in a directory
    (tmp_path / "sp").mkdir()
    write_jsonl(tmp_path / "sp" / "samples.jsonl", [{"prompt": r["prompt"], "responses": r["completions"][::-1]}
                                                    for r in rows])
    store, s2 = prepare_store(AnnotateConfig(db=db, task=str(tmp_path / "sp")))
    assert s1 == {"added": 5, "present": 0} and s2 == {"added": 0, "present": 5}
    items = store.items()
    assert len(items) == 5 and items[0]["id"] == item_id("question 0?", ["answer 0.2", "answer 0.1", "answer 0.0"])
    assert items[0]["responses"] == ["answer 0.0", "answer 0.1", "answer 0.2"]  # first import's order kept
    s = Store(db)  # a second process opening the same file sees WAL mode
    with s.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_overlap_quota_shuffle_and_undo(db):
    store = Store(db)
    store.add_items([{"prompt": f"q{i}", "responses": ["a", "b", "c", "d"]} for i in range(6)])
    store.set_settings(overlap=2, items_per_annotator=4)
    users = [store.user_for_token(store.add_user(f"u{i}")) for i in range(3)]
    store.add_user("u2", max_items=2)  # a per-annotator quota overrides the task's
    users[2] = store.user_for_token(store.add_user("u2", max_items=2))
    seen = {u.name: [] for u in users}
    for _ in range(5):
        for u in users:
            a = store.current(u)
            if a is not None:
                assert store.current(u).item_id == a.item_id  # the same item until answered
                seen[u.name].append((a.item_id, a.order))
                assert store.answer(u, a.item_id, groups=[[1], [2], [3], [4]])
    assert [len(seen[u.name]) for u in users] == [4, 4, 2]
    per_item = {}
    for v in seen.values():
        for iid, _ in v:
            per_item[iid] = per_item.get(iid, 0) + 1
    assert max(per_item.values()) <= 2 and sum(per_item.values()) == 10
    # orders are per annotator and item, stored with the answer; ranks follow the order shown
    orders = {tuple(o) for v in seen.values() for _, o in v}
    assert len(orders) > 1
    ans = store.answers(users[0].id)
    assert all(a["ranks"][a["order"][0]] == 1 and a["ranks"][a["order"][3]] == 4 for a in ans)
    # undo removes the last answer only, and the same item (same order) comes back
    last = ans[-1]
    assert store.undo(users[0]) == last["item_id"]
    assert len(store.answers(users[0].id)) == 3
    again = store.current(users[0])
    assert again.item_id == last["item_id"] and again.order == last["order"]
    with pytest.raises(PermissionError):
        store.answer(users[2], seen["u1"][0][0] if seen["u1"][0][0] not in [i for i, _ in seen["u2"]]
                     else seen["u1"][1][0], groups=[[1], [2], [3], [4]])


# ---------------------------------------------------------------- access

def test_wrong_token_other_annotator_and_plain_annotator_export_are_refused(tmp_path):
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "SECRET PROMPT", "responses": ["SECRET A", "SECRET B"]}])
    alice, bob, admin = store.add_user("alice"), store.add_user("bob"), store.add_user("root", admin=True)
    with ServerThread(store) as url:
        s, item = http("GET", url + "/api/item", token=alice)
        assert s == 200 and item["prompt"] == "SECRET PROMPT"
        assert http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[2], [1]]}, token=alice)[0] == 200

        def refused(status, body):
            assert status in (401, 403), (status, body)
            assert "SECRET" not in json.dumps(body)
        for path in ("/", "/api/item", "/api/answers", "/admin", "/admin/export?kind=pairs"):
            refused(*http("GET", url + path))  # no token
            refused(*http("GET", url + path, token="not-a-token"))  # wrong token
            assert http("GET", url + path, token="not-a-token")[0] == 401
        refused(*http("GET", url + "/login?code=wrong"))
        # a plain annotator asking for the export or the stats: 403
        for path in ("/admin/export?kind=rankings", "/admin/export?kind=answers", "/admin"):
            s, body = http("GET", url + path, token=alice)
            assert s == 403
            refused(s, body)
        # another annotator's answers, and answering an item assigned to someone else
        s, body = http("GET", url + "/api/answers?user=alice", token=bob)
        assert s == 403 and "SECRET" not in json.dumps(body)
        assert http("GET", url + "/api/answers", token=bob) == (200, [])
        s, body = http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[1], [2]]}, token=bob)
        assert s == 403
        # cookie sessions: a write without the page's CSRF token, or from another origin, is refused
        assert http("POST", url + "/api/undo", {}, headers={"Cookie": f"alignkit_annotate={alice}"})[0] == 401
        cookie, csrf = browser_login(url, store, "alice")
        assert http("POST", url + "/api/undo", {}, headers=cookie)[0] == 403
        evil = {**cookie, "X-CSRF-Token": csrf, "Origin": "http://evil.example"}
        assert http("POST", url + "/api/undo", {}, headers=evil)[0] == 403
        assert http("POST", url + "/api/undo", {}, headers={**cookie, "X-CSRF-Token": csrf})[1] == {"undone": item["item_id"]}
        # the admin token exports
        s, body = http("GET", url + "/admin/export?kind=answers", token=admin)
        assert s == 200 and body == ""  # alice's answer was undone
    row = store._get("secret")
    assert row and alice not in json.dumps(store.users())
    with store.engine.connect() as c:  # tokens are stored hashed only
        hashes = [r[0] for r in c.exec_driver_sql("SELECT token_hash FROM users")]
    assert alice not in hashes and all(len(h) == 64 for h in hashes)


def test_responses_render_as_text_never_html(tmp_path):
    html = render_text("before\n```python\nif a < b: print('<b>')\n```\n" + XSS)
    assert "<script>" not in html and "<img" not in html
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;&lt;img src=x onerror=" in html
    assert '<pre class="code" data-lang="python"><code>if a &lt; b: print(&#x27;&lt;b&gt;&#x27;)\n</code></pre>' in html
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "<b>bold?</b>", "responses": [XSS, "fine"]}])
    tok = store.add_user("a")
    with ServerThread(store) as url:
        s, page = http("GET", url + "/", token=tok)
        _, headers_page = s, page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "<b>bold?</b>" not in page
    assert "<img" not in page and "window.__xss = 1</script>" not in page


# ---------------------------------------------------------------- concurrency and crashes

def test_eight_annotators_at_once_every_answer_stored_exactly_once(db):
    store = Store(db)
    store.add_items([{"prompt": f"q{i}", "responses": [f"r{i}a", f"r{i}b", f"r{i}c"]} for i in range(200)])
    store.set_settings(overlap=2)
    tokens = [store.add_user(f"ann{i}") for i in range(8)]
    acked = {i: [] for i in range(8)}
    errors = []

    def annotator(i):
        tok = tokens[i]
        try:
            while True:
                s, item = http("GET", url + "/api/item", token=tok)
                assert s == 200, item
                if item["item_id"] is None:
                    return
                body = {"item_id": item["item_id"], "groups": [[1], [2, 3]] if i % 2 else [[3], [1], [2]]}
                s, res = http("POST", url + "/api/answer", body, token=tok)
                assert s == 200 and res["stored"], res
                acked[i].append(item["item_id"])
                if len(acked[i]) % 10 == 0:  # a client retry: stored once, reported as a duplicate
                    assert http("POST", url + "/api/answer", body, token=tok)[1] == {"stored": False, "duplicate": True}
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    with ServerThread(store) as url:
        threads = [threading.Thread(target=annotator, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    answers = Store(db).answers()  # a fresh connection reads what was committed
    assert len(answers) == 400 == sum(len(v) for v in acked.values())
    assert len({(a["user"], a["item_id"]) for a in answers}) == 400
    per_item = {}
    for a in answers:
        per_item[a["item_id"]] = per_item.get(a["item_id"], 0) + 1
    assert len(per_item) == 200 and set(per_item.values()) == {2}
    assert {(a["user"], a["item_id"]) for a in answers} == {(f"ann{i}", iid) for i, v in acked.items() for iid in v}


def _start_cli_server(db, port, tmp_path, workers=1):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                          os.environ.get("PYTHONPATH", "")])}
    # the serve action of `alignkit annotate` without the CLI's start-up (which imports every command)
    code = ("import sys; from alignkit.annotate import run_annotate; "
            "run_annotate(args=['serve'], db=sys.argv[1], port=int(sys.argv[2]), workers=int(sys.argv[3]))")
    proc = subprocess.Popen([sys.executable, "-c", code, db, str(port), str(workers)], env=env, stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT)
    for _ in range(600):
        try:
            if http("GET", f"http://127.0.0.1:{port}/api/item")[0] == 401:
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError((tmp_path / "server.log").read_text())
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("annotate server did not come up")


@pytest.mark.slow
def test_killed_server_keeps_every_saved_answer(tmp_path, db):
    f = write_jsonl(tmp_path / "task.jsonl", task_rows(30))
    prepare_store(AnnotateConfig(db=db, task=str(f)))
    tok = Store(db).add_user("ann")
    port = free_port()
    proc = _start_cli_server(db, port, tmp_path)
    url = f"http://127.0.0.1:{port}"
    saved = []
    try:
        for _ in range(12):
            _, item = http("GET", url + "/api/item", token=tok)
            s, res = http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[1], [2], [3]]}, token=tok)
            assert s == 200 and res["stored"]
            saved.append(item["item_id"])
    finally:
        proc.send_signal(signal.SIGKILL)  # no shutdown hook runs
        proc.wait(10)
    assert [a["item_id"] for a in Store(db).answers()] == saved
    proc = _start_cli_server(db, port, tmp_path)  # restart: the answers are there, work goes on
    try:
        _, item = http("GET", url + "/api/item", token=tok)
        assert item["item_id"] not in saved and item["progress"] == {"done": 12, "skipped": 0, "total": 30}
        assert [a["item_id"] for a in http("GET", url + "/api/answers", token=tok)[1]] == saved
        # add-user's login link points at the address the server was started on
        link = run_annotate(args=["add-user", "late"], db=db)["login_url"]
        assert link.startswith(f"http://127.0.0.1:{port}/login?code=")
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- export, rm data, A/B, imports

def _answer_all(store, tok, ranker):
    u = store.user_for_token(tok)
    while (a := store.current(u)) is not None:
        ranks = ranker(a)  # ranks per response index
        by_rank = {}
        for pos, resp in enumerate(a.order, start=1):
            by_rank.setdefault(ranks[resp], []).append(pos)
        store.answer(u, a.item_id, groups=[by_rank[r] for r in sorted(by_rank)])


def test_export_rankings_pairs_soft_labels_and_report(tmp_path, db):
    store = Store(db)
    store.add_items([{"prompt": f"q{i}", "responses": [f"good {i}", f"ok {i}", f"bad {i}"]} for i in range(4)])
    store.set_settings(overlap=3)
    toks = [store.add_user(n) for n in ("a", "b", "c")]
    _answer_all(store, toks[0], lambda a: [1, 2, 3])
    _answer_all(store, toks[1], lambda a: [1, 2, 3])
    _answer_all(store, toks[2], lambda a: [2, 1, 3])  # c swaps good and ok
    s = export(store, str(tmp_path / "out"))
    rankings = [json.loads(line) for line in (tmp_path / "out" / "rankings.jsonl").read_text().splitlines()]
    pairs = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert s["rankings"] == 4 and rankings[0]["responses"] == ["good 0", "ok 0", "bad 0"]
    assert rankings[0]["scores"] == pytest.approx([(2 + 2 + 1) / 3, (1 + 1 + 2) / 3, 0.0], abs=1e-4)
    good_ok = [p for p in pairs if p["chosen"] == "good 0" and p["rejected"] == "ok 0"]
    assert len(pairs) == 12 and good_ok[0]["soft_label"] == pytest.approx(2 / 3)
    # per item, the 3 pairs: a and b agree everywhere, c differs on one -> percent agreement (1 + 1/3 + 1 + 1)/... over units
    assert s["agreement/pairwise_agreement"] == pytest.approx((4 * (1 + 1 + 1 / 3)) / 12)
    report = json.loads((tmp_path / "out" / "agreement.json").read_text())
    by_name = {r["annotator"]: r for r in report["annotators"]}
    assert by_name["a"]["agreement_with_consensus"] == pytest.approx(1.0)
    assert by_name["c"]["agreement_with_consensus"] == pytest.approx(2 / 3)
    html = (tmp_path / "out" / "agreement.html").read_text()
    assert "krippendorff_alpha" in html and "<style>" in html and "<script" not in html
    # alignkit rm / dpo read both files
    from alignkit.data.formats import parse_rows
    from alignkit.data.load import DataReport, read_rows

    for name in ("rankings.jsonl", "pairs.jsonl"):
        rep = DataReport(name)
        ex = parse_rows(read_rows(str(tmp_path / "out" / name))[1], "preference", rep)
        assert len(ex) == 12 and not rep.n_dropped


def test_ab_mode_win_rate_reaches_compare(tmp_path):
    from alignkit.eval.report import compare_runs

    for run, style in (("base", "short"), ("dpo", "long and helpful")):
        d = tmp_path / run
        d.mkdir()
        write_jsonl(d / "samples.jsonl", [{"tag": "policy", "prompt": f"p{i}", "completion": f"{style} {i}"}
                                          for i in range(6)] + [{"tag": "policy", "prompt": "same", "completion": "x"}])
        (d / "summary.json").write_text(json.dumps({"command": "eval", "rewards/mean": 0.1}))
        (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/rewards/mean": 0.1}) + "\n")
    db = str(tmp_path / "ab.db")
    store, summ = prepare_store(AnnotateConfig(db=db, mode="ab", ab_runs=[str(tmp_path / "base"), str(tmp_path / "dpo")],
                                               overlap=2))
    assert summ["added"] == 6 and summ["identical"] == 1
    toks = [store.add_user("x"), store.add_user("y")]
    src = {it["id"]: it["sources"] for it in store.items()}
    # the stored response order is drawn at import too: rank by source
    def best(a, run):
        return [1 if s == run else 2 for s in src[a.item_id]]
    # x always prefers B; y prefers B on p0-p3, ties p4, prefers A on p5
    _answer_all(store, toks[0], lambda a: best(a, "B"))
    verdict = {"p4": "tie", "p5": "A"}
    _answer_all(store, toks[1], lambda a: [1, 1] if verdict.get(a.prompt) == "tie" else best(a, verdict.get(a.prompt, "B")))
    s = run_annotate(args=["export"], db=db, output=str(tmp_path / "out"))
    # items: p0-p3 [1,1], p4 [1,.5], p5 [1,0], identical [.5] -> means 1,1,1,1,.75,.5,.5
    means = [1, 1, 1, 1, 0.75, 0.5, 0.5]
    assert s["human/win_rate"] == pytest.approx(sum(means) / 7)
    ab = json.loads((tmp_path / "out" / "human_eval.json").read_text())
    assert ab["ties"] == 2 and ab["losses"] == 1 and ab["wins"] == 10 and ab["ci_low"] < ab["win_rate"] < ab["ci_high"]
    dpo = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    base = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert dpo["human/win_rate"] == pytest.approx(sum(means) / 7) and dpo["rewards/mean"] == 0.1
    assert base["human/win_rate"] == pytest.approx(1 - sum(means) / 7)
    html = compare_runs([tmp_path / "base", tmp_path / "dpo"], tmp_path / "cmp.html").read_text()
    assert "human/win_rate" in html and f"{sum(means) / 7:.4g}"[:4] in html


def test_import_label_studio_and_argilla(tmp_path):
    ls = [{"id": 1, "data": {"prompt": "q1", "items": [{"id": "a", "body": "first"}, {"id": "b", "body": "second"},
                                                        {"id": "c", "body": "third"}]},
           "annotations": [{"completed_by": 7, "lead_time": 3.5,
                            "result": [{"type": "ranker", "value": {"ranker": {"rank": ["b", "a", "c"]}}}]}]},
          {"id": 2, "data": {"prompt": "q2", "left": "L", "right": "R"},
           "annotations": [{"completed_by": {"email": "x@y"}, "result": [{"type": "pairwise", "value": {"selected": "right"}}]}]}]
    (tmp_path / "ls.json").write_text(json.dumps(ls))
    argilla = [{"fields": {"prompt": "q1", "r1": "first", "r2": "second", "r3": "third"},
                "responses": {"ranking": [{"user_id": "u9", "status": "submitted",
                                           "value": [{"value": "r1", "rank": 1}, {"value": "r2", "rank": 1},
                                                     {"value": "r3", "rank": 2}]}]}}]
    write_jsonl(tmp_path / "argilla.jsonl", argilla)
    db = str(tmp_path / "a.db")
    s1 = run_annotate(args=["import", str(tmp_path / "ls.json")], db=db)
    s2 = run_annotate(args=["import", str(tmp_path / "argilla.jsonl")], db=db)
    again = run_annotate(args=["import", str(tmp_path / "ls.json")], db=db)
    assert (s1["format"], s1["items_added"], s1["answers_imported"]) == ("label_studio", 2, 2)
    assert (s2["format"], s2["items_added"], s2["answers_imported"]) == ("argilla", 0, 1)  # same item q1
    assert again["answers_imported"] == 0 and again["answers_present"] == 2
    ans = {a["user"]: a["ranks"] for a in Store(db).answers()}
    assert ans == {"labelstudio:7": [2, 1, 3], "labelstudio:x@y": [2, 1], "argilla:u9": [1, 1, 3]}  # competition ranks
    res = collect(Store(db))
    assert [r["responses"] for r in res["rankings"]] == [["second", "first", "third"], ["R", "L"]]


@pytest.mark.slow
def test_sample_annotate_rm_then_blind_ab_end_to_end(tmp_path, tiny_model):
    """The path of docs/human-feedback.md with tiny models: sample-pairs -> annotate (HTTP) -> export ->
    rm on the rankings -> eval of two policies -> blind A/B in the app -> win rate in compare.html."""
    from alignkit.cli import build_cli
    from alignkit.eval.evaluate import evaluate
    from alignkit.eval.report import compare_runs
    from alignkit.labeling import sample_pairs
    from alignkit.testing import save_tiny_model
    from alignkit.train.reward import train_rm

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in ("hi", "yes", "no", "ok")])
    sample_pairs(model={"name_or_path": str(tiny_model)}, data={"path": str(prompts)}, n=3,
                 generation={"max_new_tokens": 6}, output=str(tmp_path / "samples"))
    db = str(tmp_path / "ann.db")
    cli = build_cli()
    cli.main(["annotate", "add-user", "alice", "--db", db], standalone_mode=False)  # prints the login link
    store, summ = prepare_store(AnnotateConfig(db=db, task=str(tmp_path / "samples"), overlap=2))
    assert summ["added"] == 4
    toks = [store.add_user("a"), store.add_user("b")]
    with ServerThread(store) as url:
        for tok in toks:
            while (item := http("GET", url + "/api/item", token=tok)[1])["item_id"]:
                k = len(item["responses"])
                # both annotators prefer longer answers, then the alphabetically first: one strict order
                text = {r["position"]: r["text"] for r in item["responses"]}
                longest = sorted(range(1, k + 1), key=lambda p: (-len(text[p]), text[p]))
                assert http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[p] for p in longest]},
                            token=tok)[0] == 200
    cli.main(["annotate", "export", "--db", db, "--output", str(tmp_path / "export")], standalone_mode=False)
    s = train_rm(**{"model.name_or_path": str(tiny_model), "data.path": str(tmp_path / "export" / "rankings.jsonl"),
                    "train.epochs": 1, "train.batch_size": 2, "log.progress": False, "rm.loss": "plackett_luce",
                    "log.samples": 0}, output=str(tmp_path / "rm"))
    n_rankings = len((tmp_path / "export" / "rankings.jsonl").read_text().splitlines())
    assert n_rankings >= 1 and (tmp_path / "rm" / "model" / "config.json").is_file()
    assert json.loads((tmp_path / "rm" / "data_report.json").read_text())  # the rankings were read as data
    other = save_tiny_model(tmp_path / "other", seed=3)
    for name, model in (("base", tiny_model), ("new", other)):
        evaluate(model={"name_or_path": str(model)}, reference=str(tiny_model), data={"path": str(prompts)},
                 samples=1, generation={"max_new_tokens": 6}, output=str(tmp_path / name))
    ab_db = str(tmp_path / "ab.db")
    ab_store, summ = prepare_store(AnnotateConfig(db=ab_db, mode="ab", ab_runs=[str(tmp_path / "base"),
                                                                                str(tmp_path / "new")]))
    judge = ab_store.add_user("judge")
    with ServerThread(ab_store) as url:
        while (item := http("GET", url + "/api/item", token=judge)[1])["item_id"]:
            assert set(item) == {"item_id", "prompt", "progress", "responses"}  # which run wrote what: never sent
            assert all(set(r) == {"position", "text"} for r in item["responses"])
            http("POST", url + "/api/answer", {"item_id": item["item_id"], "groups": [[1], [2]]}, token=judge)
    res = run_annotate(args=["export"], db=ab_db, output=str(tmp_path / "ab_export"))
    assert 0.0 <= res["human/win_rate"] <= 1.0
    html = compare_runs([tmp_path / "base", tmp_path / "new"], tmp_path / "compare.html").read_text()
    assert "human/win_rate" in html and "eval" in html
