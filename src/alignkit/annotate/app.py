"""The annotation web app (Starlette): server-rendered pages plus a little plain JavaScript.

Access: every request carries a token, from the login link (``/login?token=...`` sets an HttpOnly,
SameSite=Strict cookie) or an ``Authorization: Bearer`` header. No or an unknown token: 401 and no
data. A known token without the right (an annotator on an admin page, an item assigned to someone
else, another annotator's answers): 403. State-changing requests authenticated by the cookie must carry
the page's CSRF token (``X-CSRF-Token``, an HMAC of the session) and, when the browser sends one, a
same-origin ``Origin``; bearer requests cannot be forged cross-site, so they need neither.

Text from the task (prompts, responses) is escaped everywhere; fenced code blocks become ``<pre>``
blocks of escaped text. A Content-Security-Policy that allows only the page's own nonce'd script is a
second line of defence: an ``<img onerror=...>`` in a response is shown as text and could not run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from html import escape
from typing import Any, Optional
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from alignkit.annotate.store import Assignment, Store, StoreError, User

COOKIE = "alignkit_annotate"
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)


def render_text(text: str) -> str:
    """Escaped HTML for model text: fenced code blocks kept as ``<pre><code>``, the rest as
    whitespace-preserving text. Nothing from ``text`` is ever interpreted as markup."""
    out, pos = [], 0
    for m in _FENCE.finditer(text):
        if m.start() > pos:
            out.append(f'<div class="text">{escape(text[pos:m.start()])}</div>')
        lang = escape(m.group(1).strip())
        out.append(f'<pre class="code" data-lang="{lang}"><code>{escape(m.group(2))}</code></pre>')
        pos = m.end()
    if pos < len(text):
        out.append(f'<div class="text">{escape(text[pos:])}</div>')
    return "".join(out)


def render_prompt(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "".join(f'<div class="msg"><span class="role">{escape(str(m.get("role", "")))}</span>'
                       f'{render_text(str(m.get("content", "")))}</div>' for m in prompt)
    return render_text(str(prompt))


CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#fff;border-bottom:1px solid #ddd;padding:10px 20px;display:flex;gap:16px;align-items:center}
header h1{font-size:18px;margin:0}header .who{color:#666;font-size:13px}
progress{width:240px;height:14px}main{max-width:1280px;margin:16px auto;padding:0 16px}
.guideline{background:#eef6ff;border-left:4px solid #1c7ed6;padding:8px 12px;white-space:pre-wrap;font-size:14px}
.prompt{background:#fff;border:1px solid #ddd;padding:10px 14px;margin:12px 0}
.msg .role{font-weight:600;color:#555;margin-right:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:2px solid #ddd;border-radius:6px;padding:10px;cursor:pointer;position:relative}
.card:hover{border-color:#74c0fc}.card.ranked{border-color:#2b8a3e;background:#f4fbf5}
.card h3{font-size:14px;margin:0 0 6px}.badge{position:absolute;top:8px;right:10px;font-weight:700;color:#2b8a3e}
.text{white-space:pre-wrap;word-break:break-word;font-size:14px}
pre.code{background:#f1f3f5;padding:8px;overflow:auto;font-size:13px}
.panel{background:#fff;border:1px solid #ddd;padding:10px 14px;margin:12px 0}
#ranking li{padding:4px 8px;margin:3px 0;background:#f4fbf5;border:1px solid #b2f2bb;cursor:grab;list-style-position:inside}
button{font-size:14px;padding:6px 12px;margin:2px}.keys{color:#666;font-size:12px}
#msg{color:#c92a2a;min-height:1.2em}.allbad{background:#fff4e5 !important}
textarea{width:100%;min-height:48px}
"""

JS = r"""
(function(){
const D = JSON.parse(document.getElementById('state').textContent);
const K = D.k; let groups = []; let tieNext = false; let allBad = false;
const $ = (s) => document.querySelector(s);
function ranked(){ return groups.flat(); }
function say(t){ $('#msg').textContent = t; }
function render(){
  document.querySelectorAll('.card').forEach(c => {
    const p = +c.dataset.pos; const gi = groups.findIndex(g => g.includes(p));
    let place = 1; for (let i = 0; i < gi; i++) place += groups[i].length;
    c.classList.toggle('ranked', gi >= 0);
    c.querySelector('.badge').textContent = gi >= 0 ? ('#' + place + (groups[gi].length > 1 ? ' (tie)' : '')) : '';
  });
  const ol = $('#ranking'); ol.textContent = '';
  groups.forEach((g, i) => {
    const li = document.createElement('li'); li.draggable = true; li.dataset.index = i;
    li.textContent = g.map(p => 'Response ' + p).join(' = ');
    li.addEventListener('dragstart', e => e.dataTransfer.setData('text/plain', String(i)));
    li.addEventListener('dragover', e => e.preventDefault());
    li.addEventListener('drop', e => { e.preventDefault();
      const from = +e.dataTransfer.getData('text/plain'); const to = i;
      const [g2] = groups.splice(from, 1); groups.splice(to, 0, g2); render(); });
    ol.appendChild(li);
  });
  $('#tie').classList.toggle('on', tieNext);
  $('#tie').textContent = tieNext ? 'Tie: next pick ties (=)' : 'Tie with previous (=)';
  document.body.classList.toggle('allbad', allBad);
  $('#allbad').textContent = allBad ? 'All bad: ON (0)' : 'All bad (0)';
}
function pick(p){
  if (p < 1 || p > K || ranked().includes(p)) return;
  if (tieNext && groups.length) groups[groups.length - 1].push(p); else groups.push([p]);
  tieNext = false; say(''); render();
}
async function post(url, body){
  const r = await fetch(url, {method: 'POST', credentials: 'same-origin',
    headers: {'Content-Type': 'application/json', 'X-CSRF-Token': D.csrf}, body: JSON.stringify(body || {})});
  if (!r.ok) { let t = r.status + ''; try { t += ': ' + (await r.json()).error; } catch (e) {} say(t); return null; }
  return r.json();
}
async function submit(){
  if (!D.item) return;
  if (!allBad && K - ranked().length === 1) { const last = [...Array(K).keys()].map(i => i + 1).find(p => !ranked().includes(p)); groups.push([last]); render(); }
  if (!allBad && ranked().length < K) { say('Rank every response (or mark all bad).'); return; }
  const res = await post('api/answer', {item_id: D.item, groups: ranked().length ? groups : null, all_bad: allBad,
                                        rationale: $('#rationale').value});
  if (res) location.reload();
}
async function skip(){ if (D.item && await post('api/answer', {item_id: D.item, skip: true})) location.reload(); }
async function undo(){ const r = await post('api/undo', {}); if (r) { if (r.undone) location.reload(); else say('Nothing to undo.'); } }
document.querySelectorAll('.card').forEach(c => c.addEventListener('click', () => pick(+c.dataset.pos)));
$('#tie').addEventListener('click', () => { tieNext = !tieNext; render(); });
$('#allbad').addEventListener('click', () => { allBad = !allBad; render(); });
$('#clear').addEventListener('click', () => { groups = []; tieNext = false; render(); });
$('#undo').addEventListener('click', undo);
$('#skip').addEventListener('click', skip);
$('#submit').addEventListener('click', submit);
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'TEXTAREA' || e.target.tagName === 'INPUT' || e.ctrlKey || e.metaKey || e.altKey) return;
  if (/^[1-9]$/.test(e.key)) { pick(+e.key); e.preventDefault(); }
  else if (e.key === '=') { tieNext = !tieNext; render(); }
  else if (e.key === '0') { allBad = !allBad; render(); }
  else if (e.key === 'Enter') { submit(); e.preventDefault(); }
  else if (e.key === 'Backspace') { const g = groups[groups.length - 1]; if (g) { g.pop(); if (!g.length) groups.pop(); } render(); e.preventDefault(); }
  else if (e.key === 'Escape') { groups = []; tieNext = false; render(); }
  else if (e.key === 's') skip();
  else if (e.key === 'u') undo();
});
render();
})();
"""


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class App:
    """Routes over one :class:`Store`."""

    def __init__(self, store: Store):
        self.store = store
        self._key = hashlib.sha256(("csrf:" + store._secret).encode()).digest()

    # ------------------------------------------------------------ access
    def csrf_for(self, token: str) -> str:
        return hmac.new(self._key, token.encode(), hashlib.sha256).hexdigest()

    def _token(self, request: Request):
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), "bearer"
        return request.cookies.get(COOKIE), "cookie"

    async def _user(self, request: Request, *, write: bool = False, admin: bool = False):
        """(user, token) or an error response: 401 without a valid token, 403 for a missing right or a
        cross-site write."""
        token, how = self._token(request)
        user = await run_in_threadpool(self.store.user_for_token, token) if token else None
        if user is None:
            return None, _error(401, "log in with the link from `alignkit annotate add-user`" if not token
                                else "unknown or revoked token")
        if write and how == "cookie":
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, self.csrf_for(token)):
                return None, _error(403, "missing or wrong CSRF token")
            origin = request.headers.get("origin")
            if origin and urlsplit(origin).netloc != request.headers.get("host"):
                return None, _error(403, "cross-site request refused")
        if admin and not user.is_admin:
            return None, _error(403, "this needs the admin token")
        return (user, token), None

    # ------------------------------------------------------------ routes
    async def login(self, request: Request) -> Response:
        token = request.query_params.get("token", "")
        user = await run_in_threadpool(self.store.user_for_token, token) if token else None
        if user is None:
            return _error(401, "unknown or revoked login link")
        # an admin lands on the statistics (the annotation page would assign it an item)
        resp = RedirectResponse("/admin" if user.is_admin else "/", status_code=303)
        https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", secure=https)
        return _secure(resp)

    async def logout(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/")
        return _secure(resp)

    async def page(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            return err
        user, token = ok
        a = await run_in_threadpool(self.store.current, user)
        prog = await run_in_threadpool(self.store.progress, user)
        settings = await run_in_threadpool(self.store.settings)
        nonce = secrets.token_urlsafe(16)
        html = _page_html(user, a, prog, settings, self.csrf_for(token), nonce)
        return _secure(HTMLResponse(html), nonce)

    async def item(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            return err
        user, _ = ok
        a = await run_in_threadpool(self.store.current, user)
        prog = await run_in_threadpool(self.store.progress, user)
        if a is None:
            return _secure(JSONResponse({"item_id": None, "progress": prog}))
        return _secure(JSONResponse({"item_id": a.item_id, "prompt": a.prompt, "progress": prog,
                                     "responses": [{"position": p + 1, "text": t} for p, t in enumerate(a.shown)]}))

    async def answer(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        user, _ = ok
        try:
            body = await request.json()
            if not isinstance(body, dict) or not isinstance(body.get("item_id"), str):
                raise ValueError("expected a JSON object with item_id")
            groups = body.get("groups")
            if groups is not None and not (isinstance(groups, list) and all(
                    isinstance(g, list) and all(isinstance(p, int) for p in g) for g in groups)):
                raise ValueError("groups must be a list of lists of display positions")
            stored = await run_in_threadpool(
                self.store.answer, user, body["item_id"], groups=groups, all_bad=bool(body.get("all_bad")),
                skip=bool(body.get("skip")), rationale=str(body.get("rationale") or ""))
        except PermissionError as e:
            return _error(403, str(e))
        except (StoreError, ValueError) as e:
            return _error(400, str(e))
        return _secure(JSONResponse({"stored": stored, "duplicate": not stored}))

    async def undo(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        iid = await run_in_threadpool(self.store.undo, ok[0])
        return _secure(JSONResponse({"undone": iid}))

    async def my_answers(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            return err
        user = ok[0]
        who = request.query_params.get("user")
        if who is not None and who != user.name and not user.is_admin:
            return _error(403, "annotators see only their own answers")
        uid = user.id if who is None else next((i for i, n in self.store.users().items() if n == who), -1)
        rows = await run_in_threadpool(self.store.answers, uid)
        return _secure(JSONResponse(rows))

    async def admin(self, request: Request) -> Response:
        ok, err = await self._user(request, admin=True)
        if err:
            return err
        from alignkit.annotate.export import agreement_html, collect

        res = await run_in_threadpool(collect, self.store, request.query_params.get("aggregate", "borda"))
        return _secure(HTMLResponse(agreement_html(res)))

    async def export(self, request: Request) -> Response:
        ok, err = await self._user(request, admin=True)
        if err:
            return err
        from alignkit.annotate.export import collect

        kind = request.query_params.get("kind", "rankings")
        if kind not in ("rankings", "pairs", "answers"):
            return _error(400, "kind must be rankings, pairs or answers")
        res = await run_in_threadpool(collect, self.store, request.query_params.get("aggregate", "borda"))
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res[kind])
        return _secure(PlainTextResponse(body, media_type="application/x-ndjson"))


def _secure(resp: Response, nonce: Optional[str] = None) -> Response:
    script = f"'nonce-{nonce}'" if nonce else "'none'"
    resp.headers["Content-Security-Policy"] = (f"default-src 'none'; script-src {script}; style-src 'unsafe-inline'; "
                                               "connect-src 'self'; img-src 'self'; form-action 'self'; "
                                               "frame-ancestors 'none'; base-uri 'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


def _error(status: int, message: str) -> Response:
    return _secure(JSONResponse({"error": message}, status_code=status))


def _page_html(user: User, a: Optional[Assignment], prog, settings, csrf: str, nonce: str) -> str:
    ab = settings["mode"] == "ab"
    guideline = settings.get("guideline") or ""
    head = (f'<header><h1>alignkit annotate{" (blind A/B)" if ab else ""}</h1>'
            f'<span class="who">{escape(user.name)}</span>'
            f'<progress id="progress" value="{prog["done"]}" max="{max(prog["total"], 1)}"></progress>'
            f'<span id="progress-text">{prog["done"]} / {prog["total"]}</span>'
            + ('<a href="admin">stats</a>' if user.is_admin else "") + "</header><main>")
    if guideline:
        head += f'<div class="guideline" id="guideline">{escape(guideline)}</div>'
    state = {"csrf": csrf, "item": a.item_id if a else None, "k": len(a.order) if a else 0}
    if a is None:
        body = ('<div class="panel" id="done"><h2>All done, thank you.</h2>'
                "<p>Nothing left for you in this task.</p></div>")
    else:
        hint = ("Which response is better? Press 1 or 2 (or click it), then Enter. For a tie: 1, =, 2."
                if ab else "Rank best first: press 1-%d or click responses in order; = makes the next pick "
                "tie with the previous; drag the list to reorder." % len(a.order))
        cards = "".join(f'<div class="card" data-pos="{p + 1}" id="resp-{p + 1}"><span class="badge"></span>'
                        f"<h3>Response {p + 1} <span class=\"keys\">[key {p + 1}]</span></h3>"
                        f'<div class="body">{render_text(t)}</div></div>'
                        for p, t in enumerate(a.shown))
        body = (f'<div class="prompt" id="prompt"><b>Prompt</b>{render_prompt(a.prompt)}</div>'
                f'<p class="keys">{escape(hint)}</p><div class="grid" id="responses">{cards}</div>'
                '<div class="panel"><b>Your ranking (best first)</b><ol id="ranking"></ol>'
                '<button id="tie">Tie with previous (=)</button><button id="allbad">All bad (0)</button>'
                '<button id="clear">Clear (Esc)</button><br>'
                '<label>Rationale (optional)<br><textarea id="rationale" maxlength="10000"></textarea></label><br>'
                '<button id="submit"><b>Submit (Enter)</b></button><button id="skip">Skip (s)</button>'
                '<button id="undo">Undo last answer (u)</button><div id="msg"></div>'
                '<p class="keys">Keys: 1-9 pick, = tie, 0 all bad, Backspace remove last pick, Esc clear, '
                "Enter submit, s skip, u undo the last submitted answer.</p></div>")
    if a is None:
        body += '<button id="undo">Undo last answer (u)</button><div id="msg"></div>'
        script = ("(function(){const D=JSON.parse(document.getElementById('state').textContent);"
                  "document.getElementById('undo').addEventListener('click',async()=>{const r=await fetch('api/undo',"
                  "{method:'POST',credentials:'same-origin',headers:{'Content-Type':'application/json','X-CSRF-Token':"
                  "D.csrf},body:'{}'});if(r.ok&&(await r.json()).undone)location.reload();"
                  "else document.getElementById('msg').textContent='Nothing to undo.';});})();")
    else:
        script = JS
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>alignkit annotate</title>"
            f"<style>{CSS}</style></head><body>{head}{body}"
            f'<script type="application/json" id="state">{_json_for_script(state)}</script>'
            f'<script nonce="{nonce}">{script}</script></main></body></html>')


def create_app(store: Store) -> Starlette:
    app = App(store)
    routes = [Route("/", app.page), Route("/login", app.login), Route("/logout", app.logout, methods=["POST"]),
              Route("/api/item", app.item), Route("/api/answer", app.answer, methods=["POST"]),
              Route("/api/undo", app.undo, methods=["POST"]), Route("/api/answers", app.my_answers),
              Route("/admin", app.admin), Route("/admin/export", app.export)]
    return Starlette(routes=routes)
