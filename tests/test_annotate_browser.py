"""A real browser (the system Chromium, driven by Playwright) uses the annotation app end to end.

It logs in with the one-time link (a confirmation page, then a URL without the code), ranks three items (keyboard, mouse with a drag, keyboard with a tie), undoes
one, reloads, then checks the database and the admin export; a response holding ``<script>`` and
``<img onerror>`` must show as text and run nothing. A phone-sized page (390 px) keeps Submit in reach
with 44 px tap targets, shows an error with a retry when the server cannot be reached, asks before a
skip or undo would drop a rationale and before a reload would drop picks, and numbers tied ranks the way
its badges do. Screenshots go to the test's temporary folder, or to docs/images/ with
ALIGNKIT_UPDATE_SCREENSHOTS=1.
"""

import json
import os
import re
from pathlib import Path

import pytest

from alignkit.annotate.store import Store
from tests.annotate_server import ServerThread
from tests.helpers import chromium_path

XSS = "<script>window.__xss = 1; alert('xss')</script><img src=x onerror=\"window.__xss = 2; alert('img')\">"
CODE = "Use a loop:\n```python\nfor i in range(3):\n    print(i < 2 and '<ok>')\n```\nDone."


def login(page, url, store, name):
    """Open the one-time link, confirm, and land on a URL that no longer carries the code."""
    page.goto(f"{url}/login?code={store.login_code(name)}")
    page.locator("#confirm").click()
    page.wait_for_url(re.compile(r".*/(admin)?$"))
    assert "code" not in page.url


def ranking(page):
    """The ranking list as (number shown, display positions) per entry."""
    return page.evaluate("[...document.querySelectorAll('#ranking li')].map(li => [li.value, li.dataset.positions])")


def shots_dir(tmp_path):
    return Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOTS") \
        else tmp_path


@pytest.mark.slow
def test_browser_rank_keyboard_mouse_undo_reload_export(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = shots_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": "Print the numbers below 3 in Python.", "responses": [CODE, XSS, "print(0, 1, 2)"]},
                     {"prompt": "Name a prime number.", "responses": ["4", "7", "Seven, or 7."]},
                     {"prompt": "Say hello politely.", "responses": ["Hello!", "yo", "Good day to you."]},
                     {"prompt": "What is 2 + 2?", "responses": ["4", "5", "22"]}])
    store.set_settings(overlap=2, guideline="Rank the responses best first: correct, then helpful, then concise. "
                                 "Ties are fine when two are equally good.")
    token, admin = store.add_user("ada"), store.add_user("boss", admin=True)
    with ServerThread(store) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 800})
        page = ctx.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        login(page, url, store, "ada")
        expect(page.locator("#guideline")).to_contain_text("Rank the responses best first")
        expect(page.locator("#progress-text")).to_have_text("0 / 4")

        def shown():
            return [page.locator(f"#resp-{i} .body").inner_text() for i in (1, 2, 3)]

        # item 1, keyboard: the XSS text shows as text, nothing ran
        expect(page.locator("#prompt")).to_contain_text("numbers below 3")
        cards = shown()
        assert any("<script>window.__xss = 1" in c for c in cards) and any("onerror=" in c for c in cards)
        assert page.evaluate("window.__xss") is None and not dialogs
        assert page.locator("#responses img").count() == 0 and page.locator("#responses script").count() == 0
        assert page.locator("#responses pre.code").count() == 1  # the code block is kept as a block
        page.keyboard.press("2")
        page.keyboard.press("1")
        page.screenshot(path=str(shots / "annotate-ranking.png"))
        page.keyboard.press("3")
        expect(page.locator("#ranking li")).to_have_count(3)
        page.keyboard.press("Enter")
        expect(page.locator("#progress-text")).to_have_text("1 / 4")

        # item 2, mouse: click 3, 1, 2, then drag the top entry below the second; submit by click
        expect(page.locator("#prompt")).to_contain_text("prime")
        item2 = shown()
        for i in (3, 1, 2):
            page.locator(f"#resp-{i}").click()
        expect(page.locator("#ranking li")).to_have_count(3)
        assert ranking(page) == [[1, "3"], [2, "1"], [3, "2"]]
        page.locator("#ranking li").nth(0).drag_to(page.locator("#ranking li").nth(1))
        expect(page.locator("#ranking li").nth(0)).to_contain_text("Response 1")
        assert ranking(page) == [[1, "1"], [2, "3"], [3, "2"]]
        # each entry shows a snippet of its response
        expect(page.locator("#ranking li").nth(0)).to_contain_text(f"Response 1 \u201c{item2[0]}\u201d")
        page.locator("#rationale").fill("3 is a prime too; 1 is more direct")
        page.locator("#submit").click()
        expect(page.locator("#progress-text")).to_have_text("2 / 4")

        # item 3, keyboard with a tie (1 = 3, then 2), then undo it: the same item comes back
        expect(page.locator("#prompt")).to_contain_text("hello")
        item3 = shown()
        for key in ("1", "=", "3", "2"):
            page.keyboard.press(key)
        expect(page.locator("#ranking li")).to_have_count(2)
        assert ranking(page) == [[1, "1,3"], [3, "2"]]  # the tie shares number 1; the next is 3, as the badges
        assert [page.locator(f"#resp-{i} .badge").inner_text() for i in (1, 2, 3)] == ["#1 (tie)", "#3", "#1 (tie)"]
        page.keyboard.press("Enter")
        expect(page.locator("#progress-text")).to_have_text("3 / 4")
        page.keyboard.press("u")
        expect(page.locator("#progress-text")).to_have_text("2 / 4")
        expect(page.locator("#prompt")).to_contain_text("hello")
        assert shown() == item3  # the same order as before
        for key in ("3", "2", "1"):
            page.keyboard.press(key)
        page.keyboard.press("Enter")
        expect(page.locator("#progress-text")).to_have_text("3 / 4")

        # reload: the server still shows 3 done and the fourth item
        page.reload()
        expect(page.locator("#progress-text")).to_have_text("3 / 4")
        expect(page.locator("#prompt")).to_contain_text("2 + 2")
        page.screenshot(path=str(shots / "annotate-progress.png"))
        # this annotator may not export
        assert page.request.get(f"{url}/admin/export?kind=rankings").status == 403

        # the admin exports (only ada has answered so far) ...
        admin_page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
        login(admin_page, url, store, "boss")
        assert admin_page.url.endswith("/admin")
        href = admin_page.locator("#export-rankings").get_attribute("href")  # the page links to the exports
        assert [admin_page.locator(f"#export-{k}").count() for k in ("rankings", "pairs", "answers")] == [1, 1, 1]
        exported = admin_page.request.get(f"{url}/{href.replace('&amp;', '&')}")
        assert exported.status == 200
        rankings = [json.loads(line) for line in exported.text().splitlines()]
        # ... and, after a second annotator (through the store), looks at the agreement statistics
        bob = store.user_for_token(store.add_user("bob"))
        while (a := store.current(bob)) is not None:
            store.answer(bob, a.item_id, groups=[[2], [1], [3]])
        admin_page.goto(f"{url}/admin")
        expect(admin_page.locator("h1")).to_contain_text("annotation report")
        expect(admin_page.locator("body")).to_contain_text("bob")
        admin_page.screenshot(path=str(shots / "annotate-admin.png"), full_page=True)
        browser.close()

    # the database holds exactly the three final answers; ranks follow the display positions pressed
    answers = [a for a in Store(str(tmp_path / "a.db")).answers() if a["user"] == "ada"]
    items = {it["id"]: it for it in store.items()}
    by_prompt = {items[a["item_id"]]["prompt"]: a for a in answers}
    assert len(answers) == 3 and len(by_prompt) == 3

    def check(prompt, rank_at_position, texts=None):
        a = by_prompt[prompt]
        assert [a["ranks"][a["order"][p]] for p in range(3)] == rank_at_position
        if texts is not None:  # what the page showed at each position is that response
            assert [items[a["item_id"]]["responses"][a["order"][p]] for p in range(3)] == texts
        return [items[a["item_id"]]["responses"][i] for i in sorted(range(3), key=lambda i: a["ranks"][i])]

    best_first = [check("Print the numbers below 3 in Python.", [2, 1, 3]),  # keys 2, 1, 3
                  check("Name a prime number.", [1, 3, 2], item2),  # clicks 3, 1, 2, then dragged to 1, 3, 2
                  check("Say hello politely.", [3, 2, 1], item3)]  # after the undo: keys 3, 2, 1
    assert by_prompt["Name a prime number."]["rationale"] == "3 is a prime too; 1 is more direct"
    assert [r["responses"] for r in rankings] == best_first


@pytest.mark.slow
def test_browser_blind_ab_judgment(tmp_path):
    """A/B mode in the browser: two responses, no hint of which run wrote which; key 2 then Enter."""
    from playwright.sync_api import expect, sync_playwright

    from alignkit.annotate import AnnotateConfig, prepare_store
    from tests.helpers import write_jsonl

    shots = shots_dir(tmp_path)
    answers = {"base": "Paris.", "dpo": "The capital of France is Paris, on the Seine."}
    for run, text in answers.items():
        (tmp_path / run).mkdir()
        write_jsonl(tmp_path / run / "samples.jsonl", [{"tag": "policy", "prompt": "What is the capital of France?",
                                                        "completion": text}])
    store, _ = prepare_store(AnnotateConfig(db=str(tmp_path / "ab.db"), mode="ab", guideline="Which answer is more "
                                            "helpful? You are not told which model wrote which.",
                                            ab_runs=[str(tmp_path / "base"), str(tmp_path / "dpo")]))
    token = store.add_user("judge")
    with ServerThread(store) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        page = browser.new_context(viewport={"width": 1280, "height": 600}).new_page()
        login(page, url, store, "judge")
        expect(page.locator("h1")).to_contain_text("blind A/B")
        html = page.content()
        assert "base" not in html and "dpo" not in html and '"A"' not in html  # nothing tells the runs apart
        shown = [page.locator(f"#resp-{i} .body").inner_text() for i in (1, 2)]
        assert sorted(shown) == sorted(answers.values())
        page.keyboard.press(str(shown.index(answers["dpo"]) + 1))
        page.screenshot(path=str(shots / "annotate-ab.png"))
        page.keyboard.press("Enter")
        expect(page.locator("#done")).to_be_visible()
        browser.close()
    from alignkit.annotate.export import collect

    ab = collect(Store(str(tmp_path / "ab.db")))["ab"]
    assert (ab["wins"], ab["losses"], ab["win_rate"]) == (1, 0, 1.0)  # B (dpo) won the one judgment


LONG = ["A careful answer. " * 30, "Another long answer that goes on. " * 25, "A third, also long. " * 30]


@pytest.mark.slow
def test_browser_phone_layout_retry_confirmations_and_done_pages(tmp_path):
    """390 px wide: the viewport meta, Submit reachable without scrolling past the responses, 44 px tap
    targets, tie numbering, a failed submit shown with a retry, skip asking before it drops a rationale,
    undo on the done page, a warning before leaving with picks, and the "nothing left for you" page."""
    from playwright.sync_api import expect, sync_playwright

    shots = shots_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    store = Store(str(tmp_path / "a.db"))
    store.add_items([{"prompt": f"Question {i}: explain it briefly.", "responses": [f"{t} ({i})" for t in LONG]}
                     for i in range(3)])
    store.set_settings(overlap=1, guideline="Rank best first; ties are fine.")
    store.add_user("pat")
    store.add_user("late")
    with ServerThread(store) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                                  device_scale_factor=2)
        page = ctx.new_page()
        dialogs = []
        answer_dialog = {"accept": False}

        def on_dialog(d):
            dialogs.append((d.type, d.message))
            d.accept() if answer_dialog["accept"] else d.dismiss()
        page.on("dialog", on_dialog)
        login(page, url, store, "pat")
        assert page.locator('meta[name="viewport"]').get_attribute("content").startswith("width=device-width")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # laid out at the phone's width
        # Submit is on screen at once, though the responses run past the bottom
        box = page.locator("#submit").bounding_box()
        last = page.locator("#resp-3").bounding_box()
        assert box["y"] + box["height"] <= 844 and last["y"] + last["height"] > 844
        sizes = page.evaluate("[...document.querySelectorAll('button')].filter(b => b.offsetParent)"
                              ".map(b => [b.id, b.getBoundingClientRect().width, b.getBoundingClientRect().height])")
        assert sizes and all(w >= 44 and h >= 44 for _, w, h in sizes), sizes
        # tap 2, Tie (its on state is visible), tap 3, tap 1: ranks 1, 1, 3 in the list and the badges
        page.locator("#resp-2").tap()
        page.locator("#tie").tap()
        expect(page.locator("#tie")).to_have_class(re.compile(r"\bon\b"))
        assert page.locator("#tie").get_attribute("aria-pressed") == "true"
        page.locator("#resp-3").tap()
        expect(page.locator("#tie")).not_to_have_class(re.compile(r"\bon\b"))
        page.locator("#resp-1").tap()
        assert ranking(page) == [[1, "2,3"], [3, "1"]]
        second = " ".join(page.locator("#resp-2 .body").inner_text().split())[:40]
        expect(page.locator("#ranking li").nth(0)).to_contain_text(f"Response 2 \u201c{second}")
        page.locator("#ranking").scroll_into_view_if_needed()
        page.screenshot(path=str(shots / "annotate-phone-ranking.png"))
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(shots / "annotate-phone.png"))
        # the server cannot be reached: a visible error and a retry that works once it is back
        page.route("**/api/answer", lambda route: route.abort())
        page.locator("#submit").tap()
        expect(page.locator("#msg")).to_contain_text("Could not reach the server")
        expect(page.locator("#retry")).to_be_visible()
        page.screenshot(path=str(shots / "annotate-phone-error.png"))
        assert store.answers() == []
        page.unroute("**/api/answer")
        page.locator("#retry").tap()
        expect(page.locator("#progress-text")).to_have_text("1 / 3")
        # a rationale typed, then `s` outside the box: a confirmation, and dismissing it keeps everything
        page.locator("#rationale").fill("the second one is clearer")
        page.locator("#prompt").click()
        page.keyboard.press("s")
        expect(page.locator("#rationale")).to_have_value("the second one is clearer")
        assert dialogs and dialogs[-1][0] == "confirm" and "Skip this item?" in dialogs[-1][1]
        assert len(store.answers()) == 1
        answer_dialog["accept"] = True
        page.keyboard.press("s")
        expect(page.locator("#rationale")).to_have_value("")  # the next item
        assert [a["skipped"] for a in store.answers()] == [False, True]
        # the last item by keys, then the done page: it says why, and `u` brings the item back
        for key in ("1", "2", "Enter"):
            page.keyboard.press(key)
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#done-why")).to_contain_text("You answered 2 items and skipped 1")
        page.keyboard.press("u")
        expect(page.locator("#progress-text")).to_have_text("1 / 3")
        expect(page.locator("#prompt")).to_be_visible()
        # picks made, then leaving the page: the browser asks first
        page.keyboard.press("2")
        answer_dialog["accept"] = False
        n = len(dialogs)
        page.close(run_before_unload=True)  # dismissed: the page stays
        for _ in range(50):
            if len(dialogs) > n:
                break
            page.wait_for_timeout(100)
        assert [t for t, _ in dialogs[n:]] == ["beforeunload"], dialogs
        for key in ("1", "Enter"):
            page.keyboard.press(key)
        expect(page.locator("#done")).to_be_visible()
        # someone else takes the skipped item; an annotator added now finds every item taken
        fill = store.user_for_token(store.add_user("fill"))
        store.answer(fill, store.current(fill).item_id, groups=[[1], [2], [3]])
        late = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True).new_page()
        login(late, url, store, "late")
        expect(late.locator("#done h2")).to_have_text("Nothing left for you in this task.")
        expect(late.locator("#done-why")).to_contain_text("You answered 0 items. Every item already has its 1 annotator")
        assert late.locator("#undo").count() == 0  # nothing to undo: no button
        late.screenshot(path=str(shots / "annotate-done.png"))
        browser.close()
