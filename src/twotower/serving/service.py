"""The HTTP service: ``create_app(recommender)`` builds the FastAPI application.

    POST /recommend            {"user": ID, "k": 10} or {"history": [ID, ...], "k": 10}
                               (+ "alpha", "exclude_seen", "category", "category_feature", "features",
                               "context")
    POST /recommend/batch      {"requests": [<as above>, ...]}
    GET  /items/{id}/similar   ?k=10&alpha=0&category=...
    GET  /health, GET /metadata, GET /docs (OpenAPI)
    GET  /items, /items/{id}, /users, /users/{id}, /run/curves; the page at / (browse.py)
    POST /admin/swap           {"run": PATH, "index": PATH}, only with an admin token (swap.py)

Every client mistake is a 4xx whose ``detail`` says what to fix (malformed JSON 400, oversize body
413, wrong types or values 422, unknown user or item 404); a 500 means a bug. Requests in flight
at the same time are answered together (``batcher.MicroBatcher``). Every handler reads the model it
answers with once, from ``ModelSlot.current``, so a swap (``swap.py``) never splits a request
between two models.
"""
from __future__ import annotations

import json
import math
from contextlib import asynccontextmanager
from typing import Any, Union

from fastapi import FastAPI, Query as QueryParam, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from ..errors import ConfigError
from .batcher import MicroBatcher
from .browse import add_browse_routes
from .query import MAX_HISTORY, MAX_K, Query, Recommendation, Recommender, RequestError
from .server import ServerSettings, listen, run as run_server
from .swap import ModelSlot, Served, SwapBusy, Swapper, SwapSettings, Watcher, token_matches

Id = Union[StrictInt, StrictStr]
MAX_BODY_BYTES = 1 << 20
MAX_BATCH = 1000
FIELDS = "user, history, features, context, k, alpha, exclude_seen, category, category_feature"


class RecommendRequest(BaseModel):
    """A known user by id, or a new user by history (raw item ids, oldest first), features, or both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user": 196, "k": 10}, {"history": [50, 172, 181], "k": 20, "alpha": 0.5, "category": "Drama"},
        {"features": {"age": "25-34", "occupation": "engineer"}, "k": 10},
        {"history": [50], "features": {"age": 31, "occupation": "writer"}, "context": {"hour": "21"}}]})

    user: Id | None = Field(None, description="raw id of a user the model knows")
    history: list[Id] | None = Field(None, max_length=MAX_HISTORY, description="raw item ids of a new user, oldest first; unknown ids are ignored and reported")
    # Feature values are checked by the feature's own encoder, which knows its kind (a label, a list of
    # labels, a number, a text, a vector of its length) and says which feature and what to send.
    features: dict[str, Any] | None = Field(None, description="a new user's features: {name: value}, each as its kind "
                                                               "takes it (GET /metadata lists them)")
    context: dict[str, Any] | None = Field(None, description="the request's context features: {name: value}; one left "
                                                             "out takes its default (GET /metadata lists them)")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description=f"number of items, 1 to {MAX_K}")
    # strict: a JSON true or "0.5" is refused (a lax float would take true as 1.0), an integer is taken
    alpha: float = Field(0.0, ge=-1e4, le=1e4, allow_inf_nan=False, strict=True,
                         description="popularity correction: score - alpha * log p(item); larger favours less popular items")
    exclude_seen: StrictBool = Field(True, description="leave out items the user has interacted with")
    category: StrictStr | None = Field(None, description="only items of this category (GET /metadata lists them)")
    category_feature: StrictStr | None = Field(None, description="the item feature \"category\" is a value of "
                                                                 "(default: the service's, serve --category-feature)")

    def to_query(self) -> Query:
        return Query(self.user, self.history, self.features, self.k, self.alpha, self.exclude_seen, self.category,
                     self.context, self.category_feature)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(..., min_length=1, max_length=MAX_BATCH)


class ScoredItem(BaseModel):
    item: Id
    score: float


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    user: Id | None = None
    k: int
    alpha: float
    exclude_seen: bool
    category: str | None = None
    category_feature: str | None = None
    unknown_items: list[Id] = Field(default_factory=list, description="history ids the model does not know (ignored)")
    unknown_features: dict[str, list[Any]] = Field(default_factory=dict)
    fallback: str | None = Field(None, description='"popularity" when a new user brought nothing the model can use '
                                                   '(no known history item, no known feature value)')
    fallback_reason: str | None = Field(None, description="why the fallback was taken")


class BatchResponse(BaseModel):
    results: list[dict] = Field(..., description="per request: a RecommendResponse, or {\"status\": code, \"detail\": message}")


class ErrorResponse(BaseModel):
    detail: str
    errors: list[dict] | None = None


class SwapRequest(BaseModel):
    """What ``POST /admin/swap`` loads: a run directory and an index folder (defaults: the run
    being served, then ``RUN/index``)."""

    model_config = ConfigDict(extra="forbid")
    run: StrictStr | None = Field(None, min_length=1, description="run directory (default: the run path being served)")
    index: StrictStr | None = Field(None, min_length=1, description="index folder (default: RUN/index)")


def _dumps(obj) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800", valid JSON, not UTF-8) echoed from a request: escape it
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _json(obj, status: int = 200) -> Response:
    return Response(_dumps(obj), status_code=status, media_type="application/json")


def _error(status: int, detail: str, errors: list | None = None) -> Response:
    body = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


def _encode(r: Recommendation | RequestError) -> bytes | dict:
    """A recommendation as JSON bytes (the items array written directly: this runs for every
    request), or an error as ``{"status", "detail"}``."""
    if isinstance(r, RequestError):
        return {"status": r.status, "detail": str(r)}
    if r.items.dtype.kind in "iu":  # scores to 6 significant digits (finite: missing places are dropped before)
        items = ",".join(map('{"item":%d,"score":%.6g}'.__mod__, zip(r.items.tolist(), r.scores.tolist())))
    else:
        items = ",".join(map('{"item":%s,"score":%.6g}'.__mod__, zip(map(json.dumps, r.items.tolist()), r.scores.tolist())))
    rest = {"user": _py(r.user), "k": r.k, "alpha": r.alpha, "exclude_seen": r.exclude_seen, "category": r.category,
            "category_feature": r.category_feature, "unknown_items": [_py(x) for x in r.unknown_items],
            "unknown_features": r.unknown_features, "fallback": r.fallback, "fallback_reason": r.fallback_reason}
    return b'{"items":[' + items.encode("utf-8") + b"]," + _dumps(rest)[1:]


def _py(x):
    return x.item() if hasattr(x, "item") else x


HINTS = {
    "k": f"send k as an integer between 1 and {MAX_K}",
    "alpha": "send alpha as a finite number, e.g. 0.5 (0: no popularity correction)",
    "exclude_seen": "send exclude_seen as true or false",
    "user": "send user as the raw user id (a number or a string)",
    "history": "send history as a list of raw item ids, oldest first",
    "category": "send category as a string (GET /metadata lists the values)",
    "features": "send features as {\"name\": value}: a label, a list of labels, a number, a text or a vector, as "
                "the feature's kind takes it (GET /metadata lists them)",
    "context": "send context as {\"name\": value} (GET /metadata lists the context features)",
    "category_feature": "send category_feature as the name of a categorical item feature (GET /metadata)",
    "requests": f"send {{\"requests\": [{{\"user\": ID, \"k\": 10}}, ...]}} with 1 to {MAX_BATCH} requests",
    "limit": "send limit as a whole number in the range the API documents (GET /docs)",
    "q": "send q as a short text: part of an id or a title",
    "random": "send random as true or false",
    "seed": "send seed as a non-negative integer, or leave it out",
}


def _describe(errors: list[dict]) -> tuple[int, str]:
    """Status and a one-line message saying what is wrong and how to fix it."""
    parts, status = [], 422
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        typ = e.get("type", "")
        if typ == "json_invalid":
            status = 400
            pos = (e.get("ctx") or {}).get("error", "")
            parts.append(f"malformed JSON ({pos}); send a JSON object such as {{\"user\": 196, \"k\": 10}}")
            continue
        if typ == "missing" and not loc:
            parts.append("the request body is missing; send a JSON object such as {\"user\": 196, \"k\": 10}")
            continue
        if typ == "extra_forbidden":
            parts.append(f"unknown field {'.'.join(loc)!r}; the fields are: {FIELDS}")
            continue
        field = ".".join(loc) or "body"
        got = e.get("input")
        if not loc and isinstance(got, (bytes, bytearray)):  # FastAPI did not parse it: no JSON content type
            parts.append(NOT_JSON + ', e.g. {"requests": [{"user": 196, "k": 10}]}')
            continue
        got_s = json.dumps(got)[:60] if isinstance(got, (int, float, str, bool, type(None), list, dict)) else repr(got)[:60]
        top = loc[1] if len(loc) > 1 and loc[0] == "requests" and len(loc) > 2 else (loc[0] if loc else "")
        top = loc[-1] if loc and loc[-1] in HINTS else top
        if not loc or typ in ("dict_type", "model_type", "model_attributes_type"):
            msg = f"{field}: expected a JSON object, got {got_s}; send {{\"user\": 196, \"k\": 10}} or {{\"history\": [1, 2], \"k\": 10}}"
        else:
            msg = f"{field}: {e.get('msg', 'invalid')} (got {got_s})"
            hint = HINTS.get(top) or next((HINTS[x] for x in loc if x in HINTS), None)
            if hint:
                msg += f"; {hint}"
        parts.append(msg)
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more")
    return status, "; ".join(parts)


def is_json(content_type: str | None) -> bool:
    """The one rule for a request body's media type, FastAPI's own (strict): ``application/json`` or
    ``application/*+json``, parameters allowed; no header is not JSON. ``BodyLimit`` applies it to
    every request with a body, whether a route parses its body itself (``/recommend``,
    ``/items/lookup``) or FastAPI does. (It is also what keeps a web page on another site from
    posting to the service without a CORS preflight: ``text/plain`` is a "simple" type.)"""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = kind.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


NOT_JSON = "the body was not read as JSON; send it with the header Content-Type: application/json"


class ClientGone(Exception):
    """The client closed the connection (or the server's body deadline did) before its body was in."""


class BodyLimit:
    """ASGI middleware that reads every request body before the application sees it: a body over
    ``max_bytes`` is refused with 413 (by ``Content-Length`` at once, or once it grows too long
    without one), a body that is not sent as JSON (``is_json``) with 422, and a client that goes away
    mid-upload ends the request quietly (no traceback: it is not the server's fault). The
    application gets the body whole, in one message."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(scope, receive, send)
                break
        try:
            body = await self._read(receive)
        except ClientGone:
            return
        if body is None:
            return await self._reject(scope, receive, send)
        if body and not is_json(dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")):
            return await _error(422, NOT_JSON + " (GET /docs shows each route's body)")(scope, receive, send)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)

    async def _read(self, receive) -> bytes | None:
        """The whole body, None once it is over the limit; ``ClientGone`` if the client left."""
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] != "http.request":
                raise ClientGone
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.max_bytes:
                return None
        return b"".join(chunks)

    async def _reject(self, scope, receive, send):
        await _error(413, f"request body over {self.max_bytes:,} bytes; send fewer or shorter requests "
                          f"(at most {MAX_BATCH} per batch, {MAX_HISTORY:,} history items each)")(scope, receive, send)


def create_app(recommender: Recommender, max_body_bytes: int = MAX_BODY_BYTES, max_batch: int = 64,
               micro_batching: bool = True, swap: SwapSettings | None = None) -> FastAPI:
    """The FastAPI application over ``recommender``. ``max_batch`` caps how many concurrent
    requests are computed together (``micro_batching``); a value out of bounds is a ``ConfigError``.
    ``swap`` allows moving to another run while serving (``swap.py``: an admin route with a token, a
    watched path); off by default."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or not 1024 <= max_body_bytes <= 1 << 30:
        raise ConfigError(f"max_body_bytes = {max_body_bytes!r}: give a whole number of bytes from 1,024 to 2**30 "
                          f"(default {MAX_BODY_BYTES:,})")
    swap = swap or SwapSettings()
    slot = ModelSlot(Served.of(recommender, swap.run))
    swapper = Swapper(slot, swap)
    watcher = Watcher(swapper, swap.run, swap.interval) if swap.watch else None

    def compute(queries):
        rec = slot.current.recommender  # once per batch: a swap never splits a batch between models
        return [_encode(r) for r in rec.recommend_many(queries)]

    batcher = MicroBatcher(compute, max_batch, inline=True) if micro_batching else None  # refuses a max_batch out of bounds

    @asynccontextmanager
    async def lifespan(app):
        if watcher is not None:
            watcher.start()
        yield
        if watcher is not None:
            watcher.stop()
        if batcher is not None:
            batcher.close()

    app = FastAPI(title="twotower", version="0.1.0", lifespan=lifespan,
                  description="Candidate retrieval with a two-tower model: the user tower online, item vectors in a FAISS "
                              "index, served score = <f(u), g(j)>/tau + b_j - alpha * log p(j) (exact through the index). "
                              "Ids are the raw ids of the training data.")
    app.state.serving = slot
    app.state.swapper = swapper
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        status, msg = _describe(errors)
        return _error(status, msg, [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors[:20]])

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return _error(exc.status, str(exc))

    async def answer_one(q: Query):
        if batcher is not None:
            return await batcher.submit(q)
        import anyio

        return (await anyio.to_thread.run_sync(compute, [q]))[0]

    responses = {400: {"model": ErrorResponse, "description": "malformed JSON"},
                 404: {"model": ErrorResponse, "description": "unknown user: send a history instead"},
                 413: {"model": ErrorResponse, "description": "body too large"},
                 422: {"model": ErrorResponse, "description": "wrong type or value; the detail says which and how to fix it"}}
    body_doc = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/RecommendRequest"},
        "examples": {"known user": {"value": {"user": 196, "k": 10}},
                     "new user": {"value": {"history": [50, 172, 181], "k": 20, "alpha": 0.5, "category": "Drama"}}}}}}}

    @app.post("/recommend", response_model=RecommendResponse, responses=responses, summary="top-k items for one user",
              openapi_extra=body_doc)
    async def recommend(request: Request):
        # The body is validated here with pydantic's JSON parser (RecommendRequest), not through
        # FastAPI's dependency machinery: the same checks and messages, less work per request. (Its
        # content type was checked by BodyLimit, as for every route.)
        try:
            req = RecommendRequest.model_validate_json(await request.body())
        except ValidationError as e:
            status, msg = _describe(e.errors())
            return _error(status, msg, [{k: v for k, v in x.items() if k in ("loc", "msg", "type")} for x in e.errors()[:20]])
        out = await answer_one(req.to_query())
        if isinstance(out, dict):
            return _error(out["status"], out["detail"])
        return Response(out, media_type="application/json")

    @app.post("/recommend/batch", response_model=BatchResponse, responses=responses,
              summary="many requests, one user-tower pass and one index search per category")
    async def recommend_batch(req: BatchRequest):
        import anyio

        queries = [r.to_query() for r in req.requests]
        out = await anyio.to_thread.run_sync(compute, queries)
        parts = [x if isinstance(x, bytes) else _dumps(x) for x in out]
        return Response(b'{"results":[' + b",".join(parts) + b"]}", media_type="application/json")

    @app.get("/items/{item}/similar", response_model=RecommendResponse, responses=responses, summary="items nearest to an item")
    async def similar(item: str, k: int = QueryParam(10, ge=1, le=MAX_K), alpha: float = QueryParam(0.0, ge=-1e4, le=1e4),
                      category: str | None = None, category_feature: str | None = None):
        import anyio

        if not math.isfinite(alpha):
            return _error(422, "alpha must be a finite number")
        rec = slot.current.recommender
        r = await anyio.to_thread.run_sync(lambda: rec.similar(item, k, alpha, category, category_feature))
        item_json = json.dumps(_coerce_item(rec, item)).encode()
        return Response(_encode(r)[:-1] + b',"item":' + item_json + b"}", media_type="application/json")

    @app.get("/health", summary="liveness")
    async def health():
        index = slot.current.recommender.index
        out = {"status": "ok", "items": index.size, "index": index.kind}
        if batcher is not None and batcher.batches:
            out["requests_batched"], out["mean_batch"] = batcher.items, round(batcher.items / batcher.batches, 2)
        return out

    @app.get("/metadata", summary="model, dataset, index kind and parameters, counts, measured ANN recall; "
                                  "the run serving (path, weights sha256, loaded at) and the last swap")
    async def metadata():
        return JSONResponse({**slot.current.metadata, "serving": slot.describe()})

    if swap.token is not None:
        add_admin_routes(app, swapper, swap.token)
    add_browse_routes(app, lambda: slot.current.catalog, ErrorResponse)  # look-ups and the page (browse.py)
    return app


def add_admin_routes(app: FastAPI, swapper: Swapper, token: str) -> None:
    """``POST /admin/swap``: load a run and serve it (swap.py), for a bearer of ``token``. Not in
    the OpenAPI document: it is not part of the public API."""
    import anyio

    slot = swapper.slot

    @app.post("/admin/swap", include_in_schema=False)
    async def admin_swap(request: Request):
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_matches(given.strip(), token):
            return JSONResponse({"detail": "missing or wrong admin token; send the header Authorization: Bearer TOKEN"},
                                401, headers={"WWW-Authenticate": "Bearer"})
        try:
            req = SwapRequest.model_validate_json((await request.body()) or b"{}")
        except ValidationError as e:
            status, msg = _describe(e.errors())
            return _error(status, msg.replace(FIELDS, "run, index"))
        try:
            record = await anyio.to_thread.run_sync(lambda: swapper.swap_to(req.run, req.index, by="admin"))
        except SwapBusy as e:
            return _error(409, str(e))
        if not record.ok:
            return JSONResponse({"detail": f"could not load {record.run}: {record.error}; still serving "
                                           f"{slot.current.path}", "serving": slot.describe(public=False)}, 422)
        return JSONResponse({"status": "swapped", "seconds": round(record.seconds, 3), "serving": slot.describe(public=False)})


def _coerce_item(recommender: Recommender, item: str):
    v = recommender.run.items.coerce([item])[0]
    return v.item() if hasattr(v, "item") else v


def serve(recommender: Recommender, settings: ServerSettings | None = None, sock=None, log_level: str = "info",
          **app_kw) -> None:
    """Run the service, one worker, on ``sock`` (bound by ``server.listen`` if not given) with the
    limits of ``settings`` (``server.ServerSettings``); blocks until SIGTERM or SIGINT."""
    import gc

    settings = settings or ServerSettings()
    sock = sock if sock is not None else listen(settings.host, settings.port)
    app = create_app(recommender, max_batch=settings.max_batch, **app_kw)
    # (no torch.set_num_threads(1) here: measured, it also left FAISS's batched searches on one thread)
    gc.collect()
    gc.freeze()  # the loaded run and index never become garbage: keep them out of every collection (p99 100 ms -> 10 ms)
    run_server(app, sock, settings, log_level)
