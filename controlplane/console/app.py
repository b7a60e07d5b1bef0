"""The console's HTTP side (CONTRACT.md): pages and static files, the JSON API, login and
logout, and the rules every request and every response goes through.

Deny by default: every path needs a live session except /login and /static/; every POST must
come from the console's own origin and carry the session's CSRF token (the login form its own
token, from a cookie of the login page). A session is made only by a successful login, with a
new token each time, so a cookie planted before login never becomes a session (fixation).
Every response carries the security headers, whatever produced it (a page, JSON, a static
file, a redirect, an error). What the console logs about sessions is the operator's name and
the browser's address, never a token or a key; refusals a browser can cause at will (a bad
CSRF token, a dead session, a refused login) are logged at WARNING at a bounded rate.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from aiohttp import web

from trustmesh.controlplane.console import views
from trustmesh.controlplane.console.admin import AdminClient, ApiError, LoginRefused, Upstream, log_in
from trustmesh.controlplane.console.sessions import MAX_SESSIONS, Session, SessionStore, new_token, same_token
from trustmesh.logs import RateLimitedLog, log_event
from trustmesh.policy.loader import REVISION
from trustmesh.ratelimit import KeyedTokenBuckets

log = logging.getLogger("trustmesh.console")

SESSION_COOKIE = "__Host-tm_session"
LOGIN_COOKIE = "__Host-tm_login"
LOGIN_FORM_SECONDS = 600  # a login page's form token stays good this long
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer Chromium sends `Origin: null` on a form POST,
    # which the origin check must refuse; same-origin still sends nothing to any other site.
    "Referrer-Policy": "same-origin",
    "Strict-Transport-Security": "max-age=31536000",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
    "Server": "trustmesh",  # instead of aiohttp's, which names its version
}
STATIC_PREFIX = "/static/"
PAGES = {"/": "index.html", "/graph": "graph.html", "/agents": "agents.html", "/identities": "identities.html",
         "/policies": "policies.html", "/access": "access.html", "/anomalies": "anomalies.html",
         "/audit": "audit.html"}
LOGIN_PAGE = "login.html"
MAX_FORM_BYTES = 16 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_BODY_BYTES = REVISION.max_bytes + MAX_JSON_BYTES  # a simulated candidate: a whole revision
LIVE_INTERVAL = 5.0  # seconds between overview events on /api/events
# Where a page takes the shared header and nav (SHELL_FILE), so they are written once.
SHELL_MARKER = "<!--#include shell-->"
SHELL_FILE = "_shell.html"
MAX_LIVE_STREAMS = 4  # per session: a closed page frees its slot only at the next write (up to 5 s)
SWEEP_INTERVAL = 30.0
# Login attempts per browser address, before the server is asked. All the console's logins
# reach the server from the console's own address, so the server's per-address limit counts
# every browser together; this one keeps a single browser from spending that budget.
LOGIN_BURST = 10
LOGIN_PER_MINUTE = 10
SESSION = "trustmesh.console.session"  # the request's session, set by the guard

Json = dict[str, Any]


@dataclass(frozen=True)
class ConsoleSettings:
    upstream: Upstream
    static_dir: Path
    session_ttl: timedelta  # the operator certificate lifetime a login asks for
    max_sessions: int = MAX_SESSIONS


def _json(data: Json, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": code, "message": message}, status)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _session_of(request: web.Request) -> Session:
    session: Session = request[SESSION]
    return session


def _set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    # __Host-: Secure, Path=/ and no Domain, so no other host (or plain http) can set or read it.
    response.set_cookie(name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Strict")


def _clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/", secure=True, httponly=True, samesite="Strict")


def _browser(request: web.BaseRequest) -> str:
    return request.remote or "unknown"


def _wants_json(request: web.BaseRequest) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


class Console:
    """The web console: `application()` for aiohttp, `run()` to sweep sessions, `close()`."""

    def __init__(self, settings: ConsoleSettings, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._clock = clock
        self.sessions = SessionStore(settings.max_sessions, clock)
        self._logins = KeyedTokenBuckets(LOGIN_PER_MINUTE / 60, LOGIN_BURST)
        self._refusals = RateLimitedLog(log)
        self._pages: dict[str, str] = {}  # assembled pages, by file name

    # --- the application ---------------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY_BYTES)
        app.on_response_prepare.append(self._headers)
        r = app.router
        r.add_get("/login", self._login_page)
        r.add_post("/login", self._login)
        r.add_post("/logout", self._logout)
        for path, page in PAGES.items():
            r.add_get(path, self._page(page))
        api: dict[str, Callable[[web.Request, Session], Awaitable[Json]]] = {
            "/api/session": lambda q, s: _ready(views.session_view(s)),
            "/api/overview": lambda q, s: views.overview_view(s, self._clock()),
            "/api/graph": lambda q, s: views.graph_view(s, q.query, self._clock()),
            "/api/identity": lambda q, s: views.identity_view(s, q.query, self._clock()),
            "/api/agents": lambda q, s: views.agents_view(s, self._clock()),
            "/api/identities": lambda q, s: views.identities_view(s),
            "/api/policies": lambda q, s: views.policies_view(s),
            "/api/policies/diff": lambda q, s: views.policy_diff_view(s, q.query),
            "/api/policies/revision": lambda q, s: views.policy_revision_view(s, q.query),
            "/api/access": lambda q, s: views.access_view(s, q.query),
            "/api/anomalies": lambda q, s: views.anomalies_view(s, self._clock()),
            "/api/audit": lambda q, s: views.audit_view(s, q.query, self._clock()),
        }
        for path, view in api.items():
            r.add_get(path, self._api(view))
        actions: dict[str, tuple[int, Callable[[web.Request, Session, Json], Awaitable[Json]]]] = {
            "/api/policies/simulate": (MAX_BODY_BYTES, lambda q, s, b: views.simulate_view(s, b, self._clock())),
            "/api/access/{id}/approve": (MAX_JSON_BYTES, lambda q, s, b: views.approve_view(s, q.match_info["id"], b)),
            "/api/access/{id}/deny": (MAX_JSON_BYTES, lambda q, s, b: views.deny_view(s, q.match_info["id"], b)),
            "/api/quarantines/release": (MAX_JSON_BYTES, lambda q, s, b: views.release_view(s, b)),
            "/api/audit/verify": (MAX_JSON_BYTES, lambda q, s, b: views.verify_view(s)),
        }
        for path, (limit, action) in actions.items():
            r.add_post(path, self._action(action, limit))
        r.add_get("/api/events", self._events)
        if self._settings.static_dir.is_dir():
            r.add_static(STATIC_PREFIX, self._settings.static_dir, show_index=False, follow_symlinks=False)
        else:
            log_event(log, "console_static_missing", level=logging.ERROR, directory=str(self._settings.static_dir))
        return app

    @property
    def static_dir(self) -> Path:
        return self._settings.static_dir

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)
        # Pages and data are per operator and change: never kept. Static files may be kept,
        # but are checked again each time, so a new release is seen at once.
        response.headers["Cache-Control"] = "no-cache" if request.path.startswith(STATIC_PREFIX) else "no-store"

    # --- the guard: sessions, CSRF, errors ----------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await self._checked(request, handler)
        except ApiError as err:
            return _error(err.status, err.code, err.message)
        except web.HTTPException as err:
            if request.path.startswith("/api/"):
                return _error(err.status, err.reason.lower().replace(" ", "_"), err.reason)
            raise

    async def _checked(self, request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        path = request.path
        if request.method not in ("GET", "HEAD", "POST"):
            raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD", "POST"])
        if request.method == "POST" and not self._same_origin(request):
            return self._csrf_refused(request, "the request did not come from the console's own pages")
        if path == "/login" or path.startswith(STATIC_PREFIX):
            return await handler(request)
        if path == "/favicon.ico":  # asked by browsers on their own: no redirect that would renew the login token
            raise web.HTTPNotFound()
        session, why = await self.sessions.lookup(request.cookies.get(SESSION_COOKIE))
        if session is None:
            if why != "missing":
                self._refusals.log(("session", why, _browser(request)), "console_refused", reason=f"{why} session",
                                   browser=_browser(request), path=path[:100])
            # A page says why when a session was sent: login.js reads ?error=.
            response = (_error(401, "unauthenticated", "no console session: log in again")
                        if path.startswith("/api/") else _see_other("/login" if why == "missing" else
                                                                    "/login?error=expired"))
            if why != "missing":
                _clear_cookie(response, SESSION_COOKIE)
            return response
        if request.method == "POST" and not await self._csrf_ok(request, session):
            return self._csrf_refused(request, "missing or wrong CSRF token: reload the page", session)
        request[SESSION] = session
        return await handler(request)

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """A POST from the console's own pages: a browser's Origin (when it sends one) is this
        console, and its Sec-Fetch-Site (when it sends one) says same-origin."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("Origin")
        return origin is None or origin == f"https://{request.host}"

    async def _csrf_ok(self, request: web.Request, session: Session) -> bool:
        token = request.headers.get("X-CSRF-Token")
        if token is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            token = str((await self._form(request)).get("csrf", ""))
        return same_token(token, session.csrf)

    def _csrf_refused(self, request: web.Request, message: str, session: Session | None = None) -> web.Response:
        self._refusals.log(("csrf", _browser(request)), "console_refused", reason="csrf", browser=_browser(request),
                           path=request.path[:100], operator=session.operator if session is not None else "")
        return _error(403, "csrf", message)

    @staticmethod
    async def _form(request: web.Request) -> Mapping[str, Any]:
        if request.content_length is None or request.content_length > MAX_FORM_BYTES:
            raise ApiError(413, "too_large", f"a form of at most {MAX_FORM_BYTES} bytes, with its length")
        return await request.post()

    @staticmethod
    async def _body(request: web.Request, limit: int) -> Json:
        if request.content_length is None:
            raise ApiError(411, "length_required", "send the request body with its Content-Length")
        if request.content_length > limit:
            raise ApiError(413, "too_large", f"the request body may be at most {limit} bytes")
        if request.content_length == 0:
            return {}
        if request.content_type != "application/json":
            raise ApiError(415, "unsupported_media_type", "send JSON (Content-Type: application/json)")
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "invalid_argument", "the request body is not JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_argument", "the request body must be a JSON object")
        return body

    # --- pages, login and logout ----------------------------------------------------------------

    def _page(self, name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def page(request: web.Request) -> web.StreamResponse:
            text = self._pages.get(name)
            if text is None:
                try:
                    text = await asyncio.to_thread(self._assemble, name)
                except OSError:
                    return web.Response(status=503, text="the console's pages are not installed\n")
                self._pages[name] = text
            return web.Response(text=text, content_type="text/html", charset="utf-8")
        return page

    def _assemble(self, name: str) -> str:
        """A page with the shared header and nav put in (read once: the files ship with the package)."""
        static = self._settings.static_dir
        page = (static / name).read_text(encoding="utf-8")
        if SHELL_MARKER not in page:
            return page
        return page.replace(SHELL_MARKER, (static / SHELL_FILE).read_text(encoding="utf-8"), 1)

    async def _login_page(self, request: web.Request) -> web.StreamResponse:
        path = self._settings.static_dir / LOGIN_PAGE
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except OSError:
            return web.Response(status=503, text="the console's pages are not installed\n")
        token = new_token()
        response = web.Response(text=text.replace("{{csrf}}", html.escape(token, quote=True)),
                                content_type="text/html", charset="utf-8")
        _set_cookie(response, LOGIN_COOKIE, token, LOGIN_FORM_SECONDS)
        return response

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        if not same_token(str(form.get("csrf", "")), request.cookies.get(LOGIN_COOKIE, "")):
            refused = self._csrf_refused(request, "the login form expired or did not come from this console: "
                                                  "reload /login and try again")
            # A person whose login page sat open too long gets a fresh form, saying so.
            return refused if _wants_json(request) else _see_other("/login?error=csrf")
        browser = _browser(request)
        # Whatever session came with the request ends here: a login always makes a new one.
        await self.sessions.end(request.cookies.get(SESSION_COOKIE))
        operator = str(form.get("operator", "")).strip()[:64]
        if not self._logins.allow(browser):
            self._refusals.log(("login", browser), "console_login_refused", reason="rate_limited", browser=browser,
                               operator=operator)
            return self._login_failed(request, LoginRefused("rate_limited", "too many login attempts; wait a "
                                                                            "minute and try again"))
        try:
            identity = await log_in(self._settings.upstream, operator, str(form.get("password", ""))[:1024],
                                    str(form.get("otp", ""))[:16], self._settings.session_ttl)
        except LoginRefused as err:
            self._refusals.log(("login", browser), "console_login_refused", reason=err.reason, browser=browser,
                               operator=operator)
            return self._login_failed(request, err)
        session = Session(operator=identity.operator, spiffe_id=identity.spiffe_id, roles=identity.roles,
                          expires_at=identity.expires_at, browser=browser,
                          client=AdminClient(self._settings.upstream, identity))
        token = await self.sessions.add(session)
        log_event(log, "console_login", operator=session.operator, browser=browser)
        response = (_json({"redirect": "/", **views.session_view(session)}) if _wants_json(request)
                    else _see_other("/"))
        _set_cookie(response, SESSION_COOKIE, token, max(1, int(session.remaining(self._clock()))))
        _clear_cookie(response, LOGIN_COOKIE)
        return response

    @staticmethod
    def _login_failed(request: web.Request, err: LoginRefused) -> web.Response:
        """The login page again, saying why (login.js shows ?error=… in #login-error); JSON for
        a script that asked for it."""
        if _wants_json(request):
            status = {"rate_limited": 429, "unavailable": 502}.get(err.reason, 401)
            return _error(status, err.reason, str(err))
        return _see_other(f"/login?error={err.reason}")

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        session = _session_of(request)
        await self.sessions.end(request.cookies.get(SESSION_COOKIE))
        log_event(log, "console_logout", operator=session.operator, browser=_browser(request))
        response = _see_other("/login")
        _clear_cookie(response, SESSION_COOKIE)
        return response

    # --- the JSON API ------------------------------------------------------------------------

    def _api(self, view: Callable[[web.Request, Session], Awaitable[Json]]
             ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            session = _session_of(request)
            return _json(await self._as_operator(session, view(request, session)))
        return handle

    def _action(self, action: Callable[[web.Request, Session, Json], Awaitable[Json]], limit: int
                ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            session = _session_of(request)
            body = await self._body(request, limit)
            return _json(await self._as_operator(session, action(request, session, body)))
        return handle

    async def _as_operator(self, session: Session, answer: Awaitable[Json]) -> Json:
        """The view's answer; when the server no longer accepts the operator's certificate (the
        operator was disabled or reset), the session ends with it."""
        try:
            return await answer
        except ApiError as err:
            if err.status == 401:
                await self.sessions.discard(session)
            raise


    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-Sent Events: the overview now and every LIVE_INTERVAL seconds, until the
        session ends (logout, expiry) or the browser goes away."""
        session = _session_of(request)
        if session.streams >= MAX_LIVE_STREAMS:
            return _error(429, "too_many_streams", f"at most {MAX_LIVE_STREAMS} live-update streams per session; "
                                                   "close another console tab")
        session.streams += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)
            while not session.ended.is_set() and session.remaining(self._clock()) > 0:
                try:
                    event = "overview", await views.overview_view(session, self._clock())
                except ApiError as err:
                    if err.status == 401:  # the server no longer takes the certificate: the session ends
                        await self.sessions.discard(session)
                        break
                    event = "error", {"error": err.code, "message": err.message}
                await response.write(f"event: {event[0]}\ndata: {json.dumps(event[1])}\n\n".encode())
                try:
                    await asyncio.wait_for(session.ended.wait(),
                                           timeout=max(0.0, min(LIVE_INTERVAL, session.remaining(self._clock()))))
                except TimeoutError:
                    pass
            end = {"error": "unauthenticated", "message": "the console session ended: log in again"}
            await response.write(f"event: session\ndata: {json.dumps(end)}\n\n".encode())
            return response
        except ConnectionError:
            return response  # the browser went away
        finally:
            session.streams -= 1

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """End expired sessions as they expire (their certificates are dead anyway), so their
        channels and keys do not wait for the browser to come back."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=SWEEP_INTERVAL)
            except TimeoutError:
                await self.sessions.sweep()

    async def close(self) -> None:
        await self.sessions.close()


async def _ready(value: Json) -> Json:
    return value
