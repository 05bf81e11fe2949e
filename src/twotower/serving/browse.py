"""The look-up endpoints and the page of the HTTP service (``add_browse_routes``).

    GET /items?q=TEXT&limit=20    items whose id or title contains TEXT, most popular first
    POST /items/lookup            {"items": [50, 1]}: details of these items (up to 1,000; unknown ids reported)
    GET /items/{id}               one item: title, categories, training count, popularity bucket
    GET /users?q=TEXT&limit=20    users whose id contains TEXT, most active first
    GET /users?random=true        users drawn at random
    GET /users/{id}?limit=50      a user's history (newest first) and held-out validation/test items
    GET /run/curves               loss and validation metric per epoch, recall per popularity bucket
    GET /, GET /ui                the page: HTML, CSS and a script from ``serving/page/``

The page calls only these and the public endpoints of ``service.py``, like any other client. Every
list is bounded, so nothing here transfers a catalog.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Callable, Union

from fastapi import FastAPI, Query as QueryParam, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from .catalog import MAX_LIST, MAX_QUERY, MAX_SEARCH, Catalog
from .query import RequestError

Id = Union[StrictInt, StrictStr]

# The page's own files; nothing else is served from the folder. The Content-Security-Policy lets the
# page load only from this server: no CDN, no font service, nothing fetched from the internet.
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class ItemRecord(BaseModel):
    item: Id
    title: str | None = Field(None, description="the item's title, where the data has titles")
    categories: dict[str, list[str]] = Field(..., description="values of each categorical item feature, e.g. {\"genre\": [\"Drama\"]}")
    count: int = Field(..., description="training interactions of the item")
    rank: int = Field(..., description="popularity rank by training interactions (1 = most popular)")
    bucket: str = Field(..., description="popularity bucket (head / torso / tail at the run's eval.popularity_buckets cuts)")
    split: str | None = Field(None, description="in a history: \"train\" or \"valid\" (the part of the data it came from)")


class LookupRequest(BaseModel):
    """Raw item ids whose details to return."""

    model_config = ConfigDict(extra="forbid", title="LookupRequest")
    items: list[Id] = Field(..., max_length=MAX_LIST, description=f"raw item ids, at most {MAX_LIST}; unknown ones are reported")


LOOKUP_HINT = f'send {{"items": [raw item ids]}} with at most {MAX_LIST} ids, e.g. {{"items": [50, 181, 1]}}'


def _invalid_lookup(errors: list[dict], error_model) -> JSONResponse:
    """400 (malformed JSON) or 422 with one line that says what was wrong and what to send."""
    status, parts = 422, []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        typ = e.get("type", "")
        if typ == "json_invalid":
            status = 400
            parts.append(f"malformed JSON ({(e.get('ctx') or {}).get('error', '')})")
        elif typ == "extra_forbidden":
            parts.append(f"unknown field {loc!r}; the only field is items")
        elif not loc:
            parts.append("the body must be a JSON object")
        else:
            got = json.dumps(e.get("input"))[:60] if isinstance(e.get("input"), (int, float, str, bool, type(None), list, dict)) else "?"
            parts.append(f"{loc}: {e.get('msg', 'invalid')} (got {got})")
    detail = "; ".join(parts) + "; " + LOOKUP_HINT
    return JSONResponse({"detail": detail, "errors": [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors[:20]]},
                        status)


class ItemList(BaseModel):
    items: list[ItemRecord]
    unknown_items: list[Id] = Field(default_factory=list, description="requested ids the model does not know")


class UserSummary(BaseModel):
    user: Id
    interactions: int = Field(..., description="items the model knows for the user (training and validation)")


class UserList(BaseModel):
    users: list[UserSummary]


class UserDetail(BaseModel):
    user: Id
    interactions: int
    timestamps: bool = Field(..., description="whether the data has timestamps (else \"newest\" is the data's order)")
    history: list[ItemRecord] = Field(..., description="the user's known items, newest first, up to limit")
    valid: list[Id] | None = Field(None, description=f"raw ids of the user's validation items, up to {MAX_LIST} "
                                                     "(null: the run directory predates heldout.safetensors)")
    test: list[Id] | None = Field(None, description=f"raw ids of the user's test items (what the user went on to interact "
                                                    f"with), up to {MAX_LIST}")
    valid_total: int | None = None
    test_total: int | None = None


class EpochRecord(BaseModel):
    epoch: int
    loss: float | None
    seconds: float | None
    valid: dict[str, float | None] = Field(..., description="validation metrics of the epoch, e.g. {\"recall@20\": 0.27}")


class Curves(BaseModel):
    monitor: str = Field(..., description="the validation metric that picked the best epoch")
    best_epoch: int | None
    epochs: list[EpochRecord]
    buckets: dict[str, dict[str, dict[str, float | None]]] = Field(
        ..., description="{split: {\"recall@K\": {\"all\": r, \"head\": r, \"torso\": r, \"tail\": r}}}; null where a bucket had no held-out items")
    bucket_names: list[str]
    bucket_cuts: list[float]


def _only(request: Request, *allowed: str) -> None:
    """Refuse a query parameter the endpoint does not take (a typo such as ``lmit`` would otherwise
    be ignored silently)."""
    extra = [k for k in request.query_params.keys() if k not in allowed]
    if extra:
        raise RequestError(f"unknown query parameter {extra[0]!r}; "
                           + (f"the parameters are: {', '.join(allowed)}" if allowed else "this endpoint takes none"))


@lru_cache(maxsize=None)
def _asset(name: str) -> bytes:
    return resources.files("twotower.serving").joinpath("page", name).read_bytes()


def add_browse_routes(app: FastAPI, current_catalog: Callable[[], Catalog], error_model: type[BaseModel]) -> None:
    """Register the look-up endpoints and the page on ``app`` (errors as ``error_model``); each
    request reads the catalog of the model serving now from ``current_catalog()`` (``swap.py``)."""
    import anyio
    e404 = {"model": error_model, "description": "unknown id; the detail says how to find one"}
    e422 = {"model": error_model, "description": "wrong type or value; the detail says which and how to fix it"}
    e400 = {"model": error_model, "description": "malformed JSON"}
    e413 = {"model": error_model, "description": "body too large"}

    def off_loop(method: str, *args):
        fn = getattr(current_catalog(), method)  # the model serving when the request arrived answers it
        return anyio.to_thread.run_sync(lambda: fn(*args))

    @app.get("/items", response_model=ItemList, responses={422: e422}, summary="search items by id or title")
    async def items(request: Request, q: str = QueryParam("", max_length=MAX_QUERY, description="text in the item's id or title (case-insensitive); empty: the most popular items"),
                    limit: int = QueryParam(20, ge=1, le=MAX_SEARCH, description=f"matches to return, 1 to {MAX_SEARCH}")):
        _only(request, "q", "limit")
        return JSONResponse({"items": await off_loop("search_items", q, limit), "unknown_items": []})

    lookup_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": LookupRequest.model_json_schema(), "examples": {"three items": {"value": {"items": [50, 181, 1]}}}}}}}

    @app.post("/items/lookup", response_model=ItemList, responses={400: e400, 413: e413, 422: e422}, openapi_extra=lookup_body,
              summary=f"details of up to {MAX_LIST} items by id, in the order sent")
    async def lookup(request: Request):
        try:
            req = LookupRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _invalid_lookup(e.errors(), error_model)
        return JSONResponse(await off_loop("lookup_items", req.items))

    @app.get("/items/{item}", response_model=ItemRecord, responses={404: e404, 422: e422},
             summary="one item: title, categories, training count, popularity bucket")
    async def item(request: Request, item: str):
        _only(request)
        return JSONResponse(await off_loop("item", item))

    @app.get("/users", response_model=UserList, responses={422: e422}, summary="search users by id, or draw users at random")
    async def users(request: Request, q: str = QueryParam("", max_length=MAX_QUERY, description="text in the user's id; empty: the most active users"),
                    limit: int = QueryParam(20, ge=1, le=MAX_SEARCH, description=f"users to return, 1 to {MAX_SEARCH}"),
                    random: bool = QueryParam(False, description="draw limit users at random (among users with a history)"),
                    seed: int | None = QueryParam(None, ge=0, le=2**63 - 1, description="seed of the random draw (same seed, same users)")):
        _only(request, "q", "limit", "random", "seed")
        return JSONResponse({"users": await off_loop("search_users", q, limit, random, seed)})

    @app.get("/users/{user}", response_model=UserDetail, responses={404: e404, 422: e422},
             summary="a user's history (newest first) and held-out validation and test items")
    async def user(request: Request, user: str, limit: int = QueryParam(50, ge=1, le=MAX_LIST, description=f"history items to return, 1 to {MAX_LIST}")):
        _only(request, "limit")
        return JSONResponse(await off_loop("user", user, limit))

    @app.get("/run/curves", response_model=Curves, responses={422: e422}, summary="training curves and recall per popularity bucket")
    async def curves(request: Request):
        _only(request)
        return JSONResponse(await off_loop("curves"))

    def page() -> Response:
        return Response(_asset("index.html"), media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(page)
    app.get("/ui", include_in_schema=False)(page)

    @app.get("/ui/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            return JSONResponse({"detail": f"no page file {name!r}; the page is at /ui"}, 404)
        return Response(_asset(name), media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})


__all__ = ["add_browse_routes", "ItemRecord", "UserDetail", "Curves"]
