"""The HTTP service fuzzed from its own OpenAPI spec with schemathesis, over real HTTP (a uvicorn
server on a free loopback port, the spec fetched from its ``/openapi.json``).

Every operation gets schema-valid requests (positive), schema-violating ones (negative) and, for the
operations that take ids, schema-valid requests whose ids are swapped for ids the model knows, so
that they reach the user tower, the index search, the seen-item and category filters. For every
case: never a 5xx; every status is one the spec documents; content type, headers and 2xx bodies
conform to the spec; every 4xx carries a ``detail``; a schema-violating request is answered 4xx.

``positive_data_acceptance`` is left out on purpose: the spec cannot say which ids a model knows
or that exactly one of ``user`` / ``history`` is required, so schema-valid requests may rightly get
404 or 422.

Cases per operation and mode: ``TWOTOWER_FUZZ_EXAMPLES`` (default 60). The totals are printed by
the last test (``pytest tests/test_fuzz.py -q -s``).
"""
import os
import socket
import threading
import time
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
requests = pytest.importorskip("requests")

from hypothesis import HealthCheck, Phase, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from _trained import tiny_run  # noqa: E402

pytestmark = pytest.mark.slow  # schemathesis fuzzing of the HTTP API

EXAMPLES = int(os.environ.get("TWOTOWER_FUZZ_EXAMPLES", "60"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
WITH_INPUTS = [("POST", "/recommend"), ("POST", "/recommend/batch"), ("GET", "/items/{item}/similar"),
               ("GET", "/items"), ("POST", "/items/lookup"), ("GET", "/items/{item}"), ("GET", "/users"), ("GET", "/users/{user}")]
WITHOUT_INPUTS = [("GET", "/health"), ("GET", "/metadata"), ("GET", "/run/curves")]
# a string path parameter alone: every request that fits the URL is schema-valid, none to violate
PATH_ONLY = [("GET", "/items/{item}")]
CASES: Counter = Counter()  # (method path, mode) -> cases sent
STATUSES: Counter = Counter()  # status -> count


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    return tiny_run(tmp_path_factory, data_dir)


@pytest.fixture(scope="module")
def recommender(run_dir):
    from twotower.serving.query import Recommender

    return Recommender.load(run_dir)  # no saved index: exact search (the index path is in test_service)


@pytest.fixture(scope="module")
def base_url(recommender):
    import uvicorn

    from twotower.serving.server import ServerSettings, uvicorn_config  # the stack `twotower serve` runs
    from twotower.serving.service import create_app

    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (a bare
    # socket.socket() has proto 0 and every answer then waits ~40 ms for a delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn_config(create_app(recommender), ServerSettings(), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "server did not start"
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def schema(base_url):
    return schemathesis.openapi.from_url(f"{base_url}/openapi.json")


@pytest.fixture(scope="module")
def session(base_url):
    with requests.Session() as s:
        yield s


def _send(case, base_url, session, mode: str, label: str):
    response = case.call(base_url=base_url, session=session, timeout=30)
    CASES[(label, mode)] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, f"{response.status_code} for {case.as_curl_command()}: {response.text[:500]}"
    case.validate_response(response, checks=CHECKS, transport_kwargs={"base_url": base_url})
    if response.status_code >= 400:
        assert response.json().get("detail"), response.text
    if mode == "negative":
        assert 400 <= response.status_code < 500, f"schema-violating request accepted: {case.as_curl_command()}"
    return response


def _sent_as_generated(case) -> bool:
    """A query parameter with an empty name, an empty list or no value is left out of the URL, so a
    case whose only violation is such a parameter arrives as a valid request (and rightly gets 200)."""
    return all(k != "" and v is not None and v != [] for k, v in (case.query or {}).items())


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("method,path,mode", [(m, p, mode) for m, p in WITH_INPUTS for mode in ("positive", "negative")
                                               if mode == "positive" or (m, p) not in PATH_ONLY]
                         + [(m, p, "positive") for m, p in WITHOUT_INPUTS])  # nothing to violate there
def test_spec_fuzz(schema, base_url, session, method, path, mode):
    op = schema[path][method]
    gen = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE

    @_settings()
    @given(case=op.as_strategy(generation_mode=gen))
    def fuzz(case):
        assume(mode != "negative" or _sent_as_generated(case))
        _send(case, base_url, session, mode, f"{method} {path}")

    fuzz()


def _known_ids(recommender):
    run = recommender.run
    users = run.users.ids[:50].tolist()
    items = run.items.ids[:200].tolist()
    categories = list(recommender.category_values)
    return users, items, categories


@pytest.mark.parametrize("method,path", WITH_INPUTS)
def test_spec_fuzz_with_known_ids(schema, base_url, session, recommender, method, path):
    """Schema-valid requests with their ids (and often their category) replaced by real ones: the
    generated k, alpha, exclude_seen and batch shapes then run through the whole query path."""
    op = schema[path][method]
    users, items, categories = _known_ids(recommender)
    user = st.sampled_from(users) | st.sampled_from([str(u) for u in users])
    history = st.lists(st.sampled_from(items) | st.text(max_size=4), max_size=30)
    category = st.none() | st.sampled_from(categories)

    def patch_request(body, draw) -> None:
        if not isinstance(body, dict):
            return
        body.pop("features", None)  # this model has no user features (unknown ones: a 422, in test_service)
        if draw(st.booleans()):
            body["user"] = draw(user)
            body.pop("history", None)
        else:
            body["history"] = draw(history)
            body.pop("user", None)
        if draw(st.booleans()):
            body["category"] = draw(category)

    n_ok = Counter()

    @_settings()
    @given(case=op.as_strategy(generation_mode=GenerationMode.POSITIVE), data=st.data())
    def fuzz(case, data):
        if path == "/items/{item}/similar":
            case.path_parameters["item"] = str(data.draw(st.sampled_from(items)))
            if data.draw(st.booleans()):
                case.query = {**(case.query or {}), "category": data.draw(st.sampled_from(categories))}
        elif path == "/items/{item}":
            case.path_parameters["item"] = str(data.draw(st.sampled_from(items)))
        elif path == "/users/{user}":
            case.path_parameters["user"] = str(data.draw(st.sampled_from(users)))
        elif path == "/items/lookup":
            case.body = {"items": data.draw(st.lists(st.sampled_from(items) | st.text(max_size=4), max_size=30))}
        elif path in ("/items", "/users"):
            pass  # a search for any text is answered 200 (known ids are matched by what the text holds)
        elif path == "/recommend":
            patch_request(case.body, data.draw)
        else:
            for req in (case.body or {}).get("requests", []):
                patch_request(req, data.draw)
        r = _send(case, base_url, session, "known ids", f"{method} {path}")
        n_ok[r.status_code == 200] += 1

    fuzz()
    assert n_ok[True] > 0, "no request with known ids was answered 200: the fuzzing did not reach the query path"


def test_fuzz_case_count():
    total = sum(CASES.values())
    lines = [f"  {label:<28} {mode:<10} {n:>5}" for (label, mode), n in sorted(CASES.items())]
    print(f"\nfuzz: {total} cases, statuses {dict(sorted(STATUSES.items()))}\n" + "\n".join(lines))
    if not CASES:
        pytest.skip("the fuzz tests did not run (deselected, or no data)")
    assert not any(s >= 500 for s in STATUSES)
    assert len({label for label, _ in CASES}) == len(WITH_INPUTS + WITHOUT_INPUTS)
