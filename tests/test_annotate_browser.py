"""A real browser (the system Chromium, driven by Playwright) uses the annotation app end to end.

It logs in with the link, ranks three items (keyboard, mouse with a drag, keyboard with a tie), undoes
one, reloads, then checks the database and the admin export; a response holding ``<script>`` and
``<img onerror>`` must show as text and run nothing. Screenshots go to the test's temporary folder, or
to docs/images/ with ALIGNKIT_UPDATE_SCREENSHOTS=1.
"""

import json
import os
from pathlib import Path

import pytest

from alignkit.annotate.store import Store
from tests.annotate_server import ServerThread
from tests.helpers import chromium_path

XSS = "<script>window.__xss = 1; alert('xss')</script><img src=x onerror=\"window.__xss = 2; alert('img')\">"
CODE = "Use a loop:\n```python\nfor i in range(3):\n    print(i < 2 and '<ok>')\n```\nDone."


@pytest.mark.slow
def test_browser_rank_keyboard_mouse_undo_reload_export(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shots = Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOTS") \
        else tmp_path
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
        ctx = browser.new_context(viewport={"width": 1100, "height": 760})
        page = ctx.new_page()
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(f"{url}/login?token={token}")
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
        expect(page.locator("#ranking li")).to_have_text(["Response 3", "Response 1", "Response 2"])
        page.locator("#ranking li").nth(0).drag_to(page.locator("#ranking li").nth(1))
        expect(page.locator("#ranking li")).to_have_text(["Response 1", "Response 3", "Response 2"])
        page.locator("#rationale").fill("3 is a prime too; 1 is more direct")
        page.locator("#submit").click()
        expect(page.locator("#progress-text")).to_have_text("2 / 4")

        # item 3, keyboard with a tie (1 = 3, then 2), then undo it: the same item comes back
        expect(page.locator("#prompt")).to_contain_text("hello")
        item3 = shown()
        for key in ("1", "=", "3", "2"):
            page.keyboard.press(key)
        expect(page.locator("#ranking li")).to_have_text(["Response 1 = Response 3", "Response 2"])
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
        admin_page = browser.new_context(viewport={"width": 1100, "height": 760}).new_page()
        admin_page.goto(f"{url}/login?token={admin}")
        exported = admin_page.request.get(f"{url}/admin/export?kind=rankings")
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

    shots = Path(__file__).resolve().parents[1] / "docs" / "images" if os.environ.get("ALIGNKIT_UPDATE_SCREENSHOTS") \
        else tmp_path
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
        page = browser.new_context(viewport={"width": 1100, "height": 560}).new_page()
        page.goto(f"{url}/login?token={token}")
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
