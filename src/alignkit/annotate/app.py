"""The annotation web app (Starlette): server-rendered pages plus a little plain JavaScript.

Access: a browser logs in with a one-time link (``/login?code=...``). Opening it shows a confirmation
page that sets nothing; its form (a POST carrying the code and a nonce bound to a SameSite=Strict
cookie of that page) exchanges the code, once, for a session cookie (HttpOnly, SameSite=Strict) and
redirects to ``/``, so the URL no longer carries a secret and a cross-site page can neither send a
browser into someone else's session nor replay the link. Scripts send ``Authorization: Bearer TOKEN``.
No or an unknown credential: 401 and no data. A known one without the right (an annotator on an admin
page, an item assigned to someone else, another annotator's answers): 403. State-changing requests
authenticated by the cookie must carry the page's CSRF token (``X-CSRF-Token``, an HMAC of the session)
and, when the browser sends one, an ``Origin`` that is the app's own: the ``Host`` the request came
to, or ``--public-url`` (behind a reverse proxy that rewrites ``Host``).

Every response, error pages (404, 405, 413, 500) included, carries the Content-Security-Policy and
``nosniff`` headers (:class:`Guard`, the outermost layer, which also refuses bodies over ``max_body``
bytes with 413). JSON bodies are parsed with a nesting limit; unknown fields and enum values are 400.

Text from the task (prompts, responses) is escaped everywhere; fenced code blocks become ``<pre>``
blocks of escaped text. The CSP allows only the page's own nonce'd script: an ``<img onerror=...>`` in
a response is shown as text and could not run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from html import escape
from typing import Any, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from alignkit.annotate.agreement import AGGREGATORS
from alignkit.annotate.export import agreement_html, collect
from alignkit.annotate.store import MAX_RATIONALE, Assignment, LeaseLost, Store, StoreError, User

COOKIE = "alignkit_annotate"
LOGIN_NONCE = "alignkit_login"
MAX_BODY = 1_000_000  # bytes; `--max-body`
MAX_JSON_DEPTH = 8  # an answer needs 3 ({"groups": [[1]]})
EXPORT_KINDS = ("rankings", "pairs", "answers")
ANSWER_FIELDS = {"item_id", "groups", "all_bad", "skip", "rationale"}
CSP = ("default-src 'none'; script-src {script}; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.S)
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


class BadRequest(ValueError):
    """A request the app refuses with 400 (or the status given)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_json(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` behind a nesting limit: brackets outside strings are counted first (a C-speed
    scan), so ``[[[[...`` 50,000 deep is a 400, never a RecursionError."""
    depth = 0
    for m in _JSON_TOKENS.finditer(raw):
        t = m.group()
        if t in (b"[", b"{"):
            depth += 1
            if depth > max_depth:
                raise BadRequest(f"JSON nested deeper than {max_depth} levels")
        elif t in (b"]", b"}"):
            depth -= 1
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the body is not valid JSON ({e.__class__.__name__})") from None


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
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa;font-size:16px}
header{background:#fff;border-bottom:1px solid #ddd;padding:8px 16px;display:flex;flex-wrap:wrap;gap:8px 16px;align-items:center}
header h1{font-size:18px;margin:0}header .who{color:#666;font-size:14px}
header a{display:inline-flex;align-items:center;min-height:44px;padding:0 8px}
progress{width:200px;max-width:40vw;height:14px}main{max-width:1280px;margin:12px auto;padding:0 12px}
.guideline{background:#eef6ff;border-left:4px solid #1c7ed6;padding:8px 12px;white-space:pre-wrap;font-size:14px}
.prompt{background:#fff;border:1px solid #ddd;padding:10px 14px;margin:12px 0}
.msg .role{font-weight:600;color:#555;margin-right:6px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.card{background:#fff;border:2px solid #ddd;border-radius:6px;padding:10px;cursor:pointer;position:relative;min-height:44px;
  -webkit-tap-highlight-color:transparent}
.card:hover{border-color:#74c0fc}.card.ranked{border-color:#2b8a3e;background:#f4fbf5}
.card h3{font-size:15px;margin:0 0 6px}.badge{position:absolute;top:8px;right:10px;font-weight:700;color:#2b8a3e}
.text{white-space:pre-wrap;word-break:break-word;font-size:15px}
pre.code{background:#f1f3f5;padding:8px;overflow:auto;font-size:13px}
.panel{background:#fff;border:1px solid #ddd;padding:10px 14px;margin:12px 0}
#ranking{padding-left:2.2em;margin:6px 0}
#ranking li{padding:8px;margin:3px 0;background:#f4fbf5;border:1px solid #b2f2bb;cursor:grab;min-height:44px}
#ranking li .snip{color:#555}
button{font-size:15px;min-height:44px;min-width:44px;padding:8px 14px;margin:3px;border:1px solid #aaa;border-radius:6px;background:#f8f9fa;cursor:pointer}
button{-webkit-tap-highlight-color:transparent}button.on{background:#1c7ed6;color:#fff;border-color:#1c7ed6}
button.primary{background:#2b8a3e;color:#fff;border-color:#2b8a3e;font-weight:700}
.actions{position:sticky;bottom:0;background:#fff;border-top:1px solid #ddd;padding:6px 8px;margin:12px -12px 0;
  display:flex;flex-wrap:wrap;align-items:center;z-index:5;box-shadow:0 -2px 6px rgba(0,0,0,.06)}
.actions .sep{flex:1}
.keys{color:#666;font-size:13px}
#msg{color:#c92a2a;font-weight:600}#msg:empty{display:none}
#retry[hidden]{display:none}.allbad{background:#fff4e5 !important}
textarea{width:100%;min-height:64px;font-size:16px}.count{color:#666;font-size:13px}
@media (max-width:700px){
  header{padding:6px 10px}header h1{font-size:16px}
  .grid{grid-template-columns:1fr;gap:8px}
  .card .body{max-height:26vh;overflow:auto}
  .actions button{flex:1 1 30%;margin:2px}
  .keys.hint,.keys.legend,.card .keys{display:none}
}
"""

JS = r"""
(function(){
const D = JSON.parse(document.getElementById('state').textContent);
const K = D.k; let groups = []; let tieNext = false; let allBad = false; let leaving = false; let lastAction = null;
const $ = (s) => document.querySelector(s);
const snippets = {}; document.querySelectorAll('.card').forEach(c => {
  const t = c.querySelector('.body').textContent.replace(/\s+/g, ' ').trim();
  snippets[c.dataset.pos] = t.length > 60 ? t.slice(0, 57) + '...' : t; });
function ranked(){ return groups.flat(); }
function say(t, retry){ $('#msg').textContent = t; if ($('#retry')) $('#retry').hidden = !retry; }
function rationale(){ const r = $('#rationale'); return r ? r.value : ''; }
function dirty(){ return groups.length > 0 || allBad || rationale().trim() !== ''; }
function placeOf(gi){ let place = 1; for (let i = 0; i < gi; i++) place += groups[i].length; return place; }
function render(){
  document.querySelectorAll('.card').forEach(c => {
    const p = +c.dataset.pos; const gi = groups.findIndex(g => g.includes(p));
    c.classList.toggle('ranked', gi >= 0);
    c.querySelector('.badge').textContent = gi >= 0 ? ('#' + placeOf(gi) + (groups[gi].length > 1 ? ' (tie)' : '')) : '';
  });
  const ol = $('#ranking'); ol.textContent = '';
  groups.forEach((g, i) => {
    const li = document.createElement('li'); li.draggable = true; li.dataset.index = i;
    li.value = placeOf(i);  // tie groups share a number, as the badges do: 1, 1, 3
    li.dataset.positions = g.join(',');
    g.forEach((p, j) => {
      if (j) li.appendChild(document.createTextNode(' = '));
      const b = document.createElement('b'); b.textContent = 'Response ' + p; li.appendChild(b);
      const s = document.createElement('span'); s.className = 'snip'; s.textContent = ' \u201c' + snippets[p] + '\u201d';
      li.appendChild(s);
    });
    if (g.length > 1) li.appendChild(document.createTextNode(' (tie)'));
    li.addEventListener('dragstart', e => e.dataTransfer.setData('text/plain', String(i)));
    li.addEventListener('dragover', e => e.preventDefault());
    li.addEventListener('drop', e => { e.preventDefault();
      const from = +e.dataTransfer.getData('text/plain'); const to = i;
      const [g2] = groups.splice(from, 1); groups.splice(to, 0, g2); render(); });
    ol.appendChild(li);
  });
  $('#tie').classList.toggle('on', tieNext); $('#tie').setAttribute('aria-pressed', String(tieNext));
  $('#tie').textContent = tieNext ? 'Tie: ON, next pick ties (=)' : 'Tie with previous (=)';
  document.body.classList.toggle('allbad', allBad);
  $('#allbad').classList.toggle('on', allBad); $('#allbad').setAttribute('aria-pressed', String(allBad));
  $('#allbad').textContent = allBad ? 'All bad: ON (0)' : 'All bad (0)';
}
function pick(p){
  if (p < 1 || p > K || ranked().includes(p)) return;
  if (tieNext && groups.length) groups[groups.length - 1].push(p); else groups.push([p]);
  tieNext = false; say(''); render();
}
async function post(url, body){
  let r;
  try {
    r = await fetch(url, {method: 'POST', credentials: 'same-origin',
      headers: {'Content-Type': 'application/json', 'X-CSRF-Token': D.csrf}, body: JSON.stringify(body || {})});
  } catch (e) { say('Could not reach the server: nothing was saved. Check the connection and retry.', true); return null; }
  if (!r.ok) { let t = 'The server refused (' + r.status + ')'; try { t += ': ' + (await r.json()).error; } catch (e) {}
    say(t + (r.status >= 500 ? '. Nothing was saved; retry.' : ''), r.status >= 500); return null; }
  say(''); return r.json();
}
function reload(){ leaving = true; location.reload(); }
async function submit(){
  if (!D.item) return;
  if (!allBad && K - ranked().length === 1) { const last = [...Array(K).keys()].map(i => i + 1).find(p => !ranked().includes(p)); groups.push([last]); render(); }
  if (!allBad && ranked().length < K) { say('Rank every response (or mark all bad).'); return; }
  lastAction = submit;
  const res = await post('api/answer', {item_id: D.item, groups: ranked().length ? groups : null, all_bad: allBad,
                                        rationale: rationale()});
  if (res) reload();
}
function confirmLoss(what){
  return !dirty() || confirm(what + ' Your picks and rationale on this item will be lost.');
}
async function skip(){ if (!D.item || !confirmLoss('Skip this item?')) return; lastAction = skip;
  if (await post('api/answer', {item_id: D.item, skip: true})) reload(); }
async function undo(){ if (!confirmLoss('Undo your last submitted answer?')) return; lastAction = undo;
  const r = await post('api/undo', {}); if (r) { if (r.undone) reload(); else say('Nothing to undo.'); } }
function on(sel, f){ const el = $(sel); if (el) el.addEventListener('click', f); }
document.querySelectorAll('.card').forEach(c => c.addEventListener('click', () => pick(+c.dataset.pos)));
on('#tie', () => { tieNext = !tieNext; render(); });
on('#allbad', () => { allBad = !allBad; render(); });
on('#clear', () => { groups = []; tieNext = false; render(); });
on('#undo', undo); on('#skip', skip); on('#submit', submit);
on('#retry', () => { if (lastAction) lastAction(); });
const ta = $('#rationale');
if (ta) ta.addEventListener('input', () => { $('#count').textContent = ta.value.length + ' / ' + D.max_rationale; });
window.addEventListener('beforeunload', e => { if (D.item && !leaving && dirty()) { e.preventDefault(); e.returnValue = ''; } });
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'TEXTAREA' || e.target.tagName === 'INPUT' || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === 'u') { undo(); return; }
  if (!D.item) return;
  if (/^[1-9]$/.test(e.key)) { pick(+e.key); e.preventDefault(); }
  else if (e.key === '=') { tieNext = !tieNext; render(); }
  else if (e.key === '0') { allBad = !allBad; render(); }
  else if (e.key === 'Enter') { submit(); e.preventDefault(); }
  else if (e.key === 'Backspace') { const g = groups[groups.length - 1]; if (g) { g.pop(); if (!g.length) groups.pop(); } render(); e.preventDefault(); }
  else if (e.key === 'Escape') { groups = []; tieNext = false; render(); }
  else if (e.key === 's') skip();
});
if (D.item) render();
})();
"""


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL, lower-cased (the form a browser's Origin header takes)."""
    p = urlsplit(url)
    return f"{p.scheme}://{p.netloc}".lower()


class App:
    """Routes over one :class:`Store`. ``public_url``: the address browsers use (behind a proxy)."""

    def __init__(self, store: Store, public_url: Optional[str] = None):
        self.store = store
        self.public_url = public_url.rstrip("/") if public_url else None
        self._key = hashlib.sha256(("csrf:" + store._secret).encode()).digest()

    # ------------------------------------------------------------ access
    def csrf_for(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def same_origin(self, request: Request) -> bool:
        """No Origin (not a browser's cross-site request), or the Host the request came to, or the
        public URL's origin."""
        origin = request.headers.get("origin")
        if not origin:
            return True
        if self.public_url and origin.lower() == origin_of(self.public_url):
            return True
        return urlsplit(origin).netloc.lower() == request.headers.get("host", "").lower()

    async def _user(self, request: Request, *, write: bool = False, admin: bool = False):
        """(user, session or None) or an error response: 401 without a valid credential, 403 for a
        missing right or a cross-site write."""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            token, session = auth[7:].strip(), None
            user = await run_in_threadpool(self.store.user_for_token, token) if token else None
        else:
            token = session = request.cookies.get(COOKIE)
            user = await run_in_threadpool(self.store.user_for_session, session) if session else None
        if user is None:
            return None, _error(401, "log in with the link from `alignkit annotate add-user`" if not token
                                else "unknown, expired or revoked credential; ask for a new login link")
        if write and session is not None:
            sent = request.headers.get("x-csrf-token", "")
            if not hmac.compare_digest(sent, self.csrf_for(session)):
                return None, _error(403, "missing or wrong CSRF token")
            if not self.same_origin(request):
                return None, _error(403, "cross-site request refused (behind a proxy? start the app with "
                                         "--public-url https://your.host)")
        if admin and not user.is_admin:
            return None, _error(403, "this needs an admin")
        return (user, session), None

    # ------------------------------------------------------------ login
    async def login_page(self, request: Request) -> Response:
        """GET /login?code=C: a confirmation page; nothing is set but a nonce for its own form."""
        code = request.query_params.get("code", "")
        if request.query_params.get("token"):
            return _page_error(400, "This login link is in an old format that put the account's token in the "
                                    "address. Ask for a new link (`alignkit annotate add-user NAME`).")
        user = await run_in_threadpool(self.store.user_for_code, code) if code else None
        if user is None:
            return _page_error(401, "This login link is unknown, expired or already used. Each link works "
                                    "once; ask for a new one (`alignkit annotate add-user NAME`).")
        current = request.cookies.get(COOKIE)
        now_user = await run_in_threadpool(self.store.user_for_session, current) if current else None
        nonce = secrets.token_urlsafe(24)
        switch = (f"<p>This browser is logged in as <b>{escape(now_user.name)}</b> now; continuing switches to "
                  f"<b>{escape(user.name)}</b>.</p>" if now_user and now_user.id != user.id else "")
        html = _shell("Log in", f'<div class="panel" id="login"><h2>Log in as {escape(user.name)}'
                      f'{" (admin)" if user.is_admin else ""}?</h2>{switch}'
                      '<form method="post" action="login">'
                      f'<input type="hidden" name="code" value="{escape(code)}">'
                      f'<input type="hidden" name="nonce" value="{nonce}">'
                      f'<button class="primary" id="confirm" type="submit">Log in as {escape(user.name)}</button>'
                      "</form><p class=\"keys\">The link works once: after this, the address no longer carries "
                      "it. If you did not expect this page, close it.</p></div>")
        resp = _secure(HTMLResponse(html))
        # with no-referrer a browser's form POST says "Origin: null"; same-origin keeps the real one
        # (and still sends nothing to other sites)
        resp.headers["Referrer-Policy"] = "same-origin"
        resp.set_cookie(LOGIN_NONCE, nonce, httponly=True, samesite="strict", path="/", max_age=1800,
                        secure=self._https(request))
        return resp

    def _https(self, request: Request) -> bool:
        return (request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
                or bool(self.public_url and self.public_url.startswith("https:")))

    async def login(self, request: Request) -> Response:
        """POST /login (the confirmation form): the code is exchanged once for a session cookie."""
        form = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
        nonce = request.cookies.get(LOGIN_NONCE, "")
        if not nonce or not hmac.compare_digest(nonce, form.get("nonce", "")) or not self.same_origin(request):
            return _page_error(403, "This login was not confirmed on this site's own page (a cross-site form or "
                                    "an expired page). Open your login link again.")
        res = await run_in_threadpool(self.store.redeem_code, form.get("code", ""))
        if res is None:
            return _page_error(401, "This login link is unknown, expired or already used. Ask for a new one.")
        user, session = res
        resp = RedirectResponse("admin" if user.is_admin else "./", status_code=303)
        resp.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/", secure=self._https(request))
        resp.delete_cookie(LOGIN_NONCE, path="/")
        return _secure(resp)

    async def logout(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        if ok[1]:
            await run_in_threadpool(self.store.end_session, ok[1])
        resp = JSONResponse({"ok": True})
        resp.delete_cookie(COOKIE, path="/")
        return _secure(resp)

    # ------------------------------------------------------------ annotator
    async def page(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            if request.headers.get("authorization"):
                return err
            return _page_error(401, "Log in with the link you were sent (`alignkit annotate add-user NAME` "
                                    "prints one).")
        user, session = ok
        if user.is_admin:  # admins never take an item's slot
            return _secure(RedirectResponse("admin", status_code=303))
        a = await run_in_threadpool(self.store.current, user)
        prog = await run_in_threadpool(self.store.progress, user)
        why = None if a else await run_in_threadpool(self.store.why_nothing, user)
        settings = await run_in_threadpool(self.store.settings)
        nonce = secrets.token_urlsafe(16)
        csrf = self.csrf_for(session) if session else ""
        return _secure(HTMLResponse(_page_html(user, a, prog, settings, csrf, nonce, why)), nonce)

    async def item(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            return err
        user = ok[0]
        a = await run_in_threadpool(self.store.current, user)
        prog = await run_in_threadpool(self.store.progress, user)
        if a is None:
            why = await run_in_threadpool(self.store.why_nothing, user)
            return _secure(JSONResponse({"item_id": None, "progress": prog, "reason": why["reason"]}))
        return _secure(JSONResponse({"item_id": a.item_id, "prompt": a.prompt, "progress": prog,
                                     "responses": [{"position": p + 1, "text": t} for p, t in enumerate(a.shown)]}))

    async def answer(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        user = ok[0]
        try:
            body = parse_json(await request.body())
            kw = _answer_fields(body)
            stored = await run_in_threadpool(self.store.answer, user, body["item_id"], **kw)
        except PermissionError as e:
            return _error(403, str(e))
        except LeaseLost as e:
            return _error(409, str(e))
        except BadRequest as e:
            return _error(e.status, str(e))
        except StoreError as e:
            return _error(400, str(e))
        return _secure(JSONResponse({"stored": stored, "duplicate": not stored}))

    async def undo(self, request: Request) -> Response:
        ok, err = await self._user(request, write=True)
        if err:
            return err
        try:
            body = parse_json(await request.body() or b"{}")
            if not isinstance(body, dict) or body:
                raise BadRequest("undo takes an empty JSON object")
        except BadRequest as e:
            return _error(e.status, str(e))
        iid = await run_in_threadpool(self.store.undo, ok[0])
        return _secure(JSONResponse({"undone": iid}))

    async def my_answers(self, request: Request) -> Response:
        ok, err = await self._user(request)
        if err:
            return err
        user = ok[0]
        who = request.query_params.get("user")
        if who is None or who == user.name:  # as this annotator saw them: ranks per display position
            return _secure(JSONResponse(await run_in_threadpool(self.store.own_answers, user)))
        if not user.is_admin:
            return _error(403, "annotators see only their own answers")
        uid = next((i for i, n in self.store.users().items() if n == who), None)
        if uid is None:
            return _error(404, f"no user named {who!r}")
        return _secure(JSONResponse(await run_in_threadpool(self.store.answers, uid)))

    # ------------------------------------------------------------ admin
    @staticmethod
    def _aggregate(request: Request) -> str:
        agg = request.query_params.get("aggregate", "borda")
        if agg not in AGGREGATORS:
            raise BadRequest(f"aggregate must be one of {', '.join(sorted(AGGREGATORS))}, got {agg[:40]!r}")
        return agg

    async def admin(self, request: Request) -> Response:
        ok, err = await self._user(request, admin=True)
        if err:
            return err
        try:
            agg = self._aggregate(request)
        except BadRequest as e:
            return _error(e.status, str(e))
        res = await run_in_threadpool(collect, self.store, agg)
        links = " ".join(f'<a href="admin/export?kind={k}&amp;aggregate={agg}" id="export-{k}" download="{k}.jsonl">'
                         f"{k}.jsonl</a>" for k in EXPORT_KINDS)
        other = "majority" if agg == "borda" else "borda"
        nav = (f'<p class="note" id="exports">Download: {links} &middot; '
               f'<a href="admin?aggregate={other}">aggregate by {other}</a></p>')
        return _secure(HTMLResponse(agreement_html(res, nav=nav)))

    async def export(self, request: Request) -> Response:
        ok, err = await self._user(request, admin=True)
        if err:
            return err
        kind = request.query_params.get("kind", "rankings")
        try:
            if kind not in EXPORT_KINDS:
                raise BadRequest(f"kind must be one of {', '.join(EXPORT_KINDS)}, got {kind[:40]!r}")
            agg = self._aggregate(request)
        except BadRequest as e:
            return _error(e.status, str(e))
        res = await run_in_threadpool(collect, self.store, agg)
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res[kind])
        return _secure(PlainTextResponse(body, media_type="application/x-ndjson"))


def _answer_fields(body: Any) -> Dict[str, Any]:
    """The keyword arguments of :meth:`Store.answer` from a request body, every field type-checked."""
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object")
    unknown = set(body) - ANSWER_FIELDS
    if unknown:
        raise BadRequest(f"unknown fields {sorted(unknown)[:5]}; expected {sorted(ANSWER_FIELDS)}")
    if not isinstance(body.get("item_id"), str) or len(body["item_id"]) > 64:
        raise BadRequest("item_id must be the item's id (a string)")
    groups = body.get("groups")
    if groups is not None and not (isinstance(groups, list) and len(groups) <= 9 and all(
            isinstance(g, list) and all(isinstance(p, int) and not isinstance(p, bool) for p in g) for g in groups)):
        raise BadRequest("groups must be a list of lists of display positions (1-9)")
    for flag in ("all_bad", "skip"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise BadRequest(f"{flag} must be true or false")
    rationale = body.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        raise BadRequest("rationale must be a string")
    if rationale and len(rationale) > MAX_RATIONALE:
        raise BadRequest(f"the rationale has {len(rationale)} characters; the limit is {MAX_RATIONALE} "
                         "(nothing was stored)")
    return {"groups": groups, "all_bad": bool(body.get("all_bad")), "skip": bool(body.get("skip")),
            "rationale": rationale or ""}


def _secure(resp: Response, nonce: Optional[str] = None) -> Response:
    resp.headers["Content-Security-Policy"] = CSP.format(script=f"'nonce-{nonce}'" if nonce else "'none'")
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp


SECURITY_HEADERS = [(b"content-security-policy", CSP.format(script="'none'").encode()),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store")]


def _error(status: int, message: str) -> Response:
    return _secure(JSONResponse({"error": message}, status_code=status))


def _shell(title: str, body: str, head: str = "") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)} - alignkit annotate</title><style>{CSS}</style></head><body>"
            f"{head or '<header><h1>alignkit annotate</h1></header>'}<main>{body}</main></body></html>")


def _page_error(status: int, message: str) -> Response:
    return _secure(HTMLResponse(_shell("Error", f'<div class="panel" id="error"><h2>{status}</h2>'
                                                f"<p>{escape(message)}</p></div>"), status_code=status))


def _done_text(why: Dict[str, Any]) -> Tuple[str, str]:
    done, skipped, total = why["done"], why["skipped"], why["total"]
    tally = f"You answered {done} item{'s' if done != 1 else ''}" + (f" and skipped {skipped}" if skipped else "") + "."
    if why["reason"] == "quota":
        return "All done, thank you.", f"{tally} That is your share of this task ({total} items)."
    if why["reason"] == "finished":
        return "All done, thank you.", f"{tally} You have seen every item of this task."
    if why["reason"] == "leased":
        return ("Nothing for you right now.", f"{tally} The items left are being answered by other annotators. "
                f"If one of them stops, its item comes free: check back in about {why['retry_minutes']} minutes.")
    return ("Nothing left for you in this task.",
            f"{tally} Every {'other ' if done + skipped else ''}item already has its {why['overlap']} annotator"
            f"{'s' if why['overlap'] != 1 else ''} (the task's overlap), so no item needs you. "
            "Ask the task's admin if you expected more work.")


def _page_html(user: User, a: Optional[Assignment], prog, settings, csrf: str, nonce: str,
               why: Optional[Dict[str, Any]]) -> str:
    ab = settings["mode"] == "ab"
    guideline = settings.get("guideline") or ""
    head = (f'<header><h1>alignkit annotate{" (blind A/B)" if ab else ""}</h1>'
            f'<span class="who">{escape(user.name)}</span>'
            f'<progress id="progress" value="{prog["done"]}" max="{max(prog["total"], 1)}"></progress>'
            f'<span id="progress-text">{prog["done"]} / {prog["total"]}</span></header>')
    body = f'<div class="guideline" id="guideline">{escape(guideline)}</div>' if guideline else ""
    state = {"csrf": csrf, "item": a.item_id if a else None, "k": len(a.order) if a else 0,
             "max_rationale": MAX_RATIONALE}
    if a is None:
        title, text = _done_text(why)
        undo = '<button id="undo">Undo my last answer (u)</button>' if why["done"] + why["skipped"] else ""
        body += (f'<div class="panel" id="done"><h2>{escape(title)}</h2><p id="done-why">{escape(text)}</p>'
                 f'{undo}<button id="retry" hidden>Retry</button><div id="msg" role="alert"></div></div>')
    else:
        hint = ("Which response is better? Press 1 or 2 (or tap it), then Enter. For a tie: 1, =, 2."
                if ab else "Rank best first: press 1-%d or tap responses in order; = makes the next pick "
                "tie with the previous; drag the list to reorder." % len(a.order))
        cards = "".join(f'<div class="card" data-pos="{p + 1}" id="resp-{p + 1}"><span class="badge"></span>'
                        f"<h3>Response {p + 1} <span class=\"keys\">[key {p + 1}]</span></h3>"
                        f'<div class="body">{render_text(t)}</div></div>'
                        for p, t in enumerate(a.shown))
        body += (f'<div class="prompt" id="prompt"><b>Prompt</b>{render_prompt(a.prompt)}</div>'
                 f'<p class="keys hint">{escape(hint)}</p><div class="grid" id="responses">{cards}</div>'
                 '<div class="panel"><b>Your ranking (best first)</b><ol id="ranking"></ol>'
                 f'<label for="rationale">Rationale (optional, up to {MAX_RATIONALE:,} characters)</label>'
                 f'<textarea id="rationale" maxlength="{MAX_RATIONALE}"></textarea>'
                 f'<div class="count" id="count">0 / {MAX_RATIONALE}</div>'
                 '<p class="keys legend">Keys: 1-9 pick, = tie, 0 all bad, Backspace remove last pick, Esc clear, '
                 "Enter submit, s skip, u undo the last submitted answer (both ask first when you have picks or "
                 "a rationale).</p></div>"
                 '<div class="actions" id="actions"><button id="tie" aria-pressed="false">Tie with previous (=)</button>'
                 '<button id="allbad" aria-pressed="false">All bad (0)</button><button id="clear">Clear (Esc)</button>'
                 '<span class="sep"></span><button id="skip">Skip (s)</button><button id="undo">Undo last (u)</button>'
                 '<button id="submit" class="primary">Submit (Enter)</button>'
                 '<div id="msg" role="alert"></div><button id="retry" hidden>Retry</button></div>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>alignkit annotate</title><style>{CSS}</style></head><body>{head}<main>{body}"
            f'<script type="application/json" id="state">{_json_for_script(state)}</script>'
            f'<script nonce="{nonce}">{JS}</script></main></body></html>')


class Guard:
    """The outermost ASGI layer: bodies over ``max_body`` bytes get 413 (the rest of such a body is read
    and dropped, never kept), and every response, the framework's own 404/405/500 included, gets the
    security headers when the route did not set its own."""

    def __init__(self, app, max_body: int = MAX_BODY):
        self.app, self.max_body = app, int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_secure(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": list(message.get("headers", []))
                           + [(k, v) for k, v in SECURITY_HEADERS if k not in names]}
            await send(message)

        declared = dict(scope.get("headers", [])).get(b"content-length")
        too_big = declared is not None and (not declared.isdigit() or int(declared) > self.max_body)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if too_big:
                if declared is not None and (not declared.isdigit() or int(declared) > 64 * self.max_body):
                    break  # answer at once; the server closes the connection
                continue  # drain and drop
            size += len(body)
            if size > self.max_body:
                too_big, chunks = True, []
                continue
            chunks.append(body)
        if too_big:
            resp = JSONResponse({"error": f"request body over {self.max_body} bytes (--max-body); nothing was stored"},
                                status_code=413)
            return await resp(scope, receive, send_secure)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def receive_again():
            return replay.pop() if replay else await receive()

        await self.app(scope, receive_again, send_secure)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return _error(exc.status_code, exc.detail or "error")


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(500, "internal error (see the server log)")


def create_app(store: Store, public_url: Optional[str] = None, max_body: int = MAX_BODY):
    """The ASGI app: the routes of :class:`App` inside :class:`Guard`."""
    app = App(store, public_url)
    routes = [Route("/", app.page), Route("/login", app.login_page, methods=["GET"]),
              Route("/login", app.login, methods=["POST"]), Route("/logout", app.logout, methods=["POST"]),
              Route("/api/item", app.item), Route("/api/answer", app.answer, methods=["POST"]),
              Route("/api/undo", app.undo, methods=["POST"]), Route("/api/answers", app.my_answers),
              Route("/admin", app.admin), Route("/admin/export", app.export)]
    star = Starlette(routes=routes, exception_handlers={HTTPException: _http_error, 500: _server_error})
    return Guard(star, max_body)


def app_from_env():
    """Factory for ``uvicorn --workers N`` (each worker process builds its own app): the settings come
    from ``ALIGNKIT_ANNOTATE_SERVE`` (JSON: db, public_url, max_body), set by ``alignkit annotate``."""
    import os

    cfg = json.loads(os.environ["ALIGNKIT_ANNOTATE_SERVE"])
    return create_app(Store(cfg["db"]), cfg.get("public_url"), cfg.get("max_body", MAX_BODY))
