"""The micro-batcher cannot hang: a batch size out of bounds is refused where it is given (the
batcher, ``create_app``, the settings of ``twotower serve``), and whatever the attribute says by the
time requests arrive, every turn of the drain answers at least one of them. A batch function that
returns the wrong number of results fails its requests instead of leaving them waiting."""
import asyncio

import pytest

from twotower.errors import ConfigError, TwotowerError
from twotower.serving.batcher import MAX_BATCH, MicroBatcher


def _answer_all(batcher: MicroBatcher, items, timeout: float = 10.0):
    async def main():
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(x) for x in items), return_exceptions=True), timeout)

    return asyncio.run(main())


@pytest.mark.parametrize("bad", [0, -1, MAX_BATCH + 1, 1.5, "8", None, True])
def test_a_batch_size_out_of_bounds_is_refused_with_a_message(bad):
    with pytest.raises(ConfigError, match=f"from 1 to {MAX_BATCH}"):
        MicroBatcher(lambda xs: xs, bad)
    assert issubclass(ConfigError, TwotowerError)  # the CLI's exit code 2


@pytest.mark.parametrize("inline", [True, False])
@pytest.mark.parametrize("max_batch", [1, 3, 64])
def test_batches_of_at_most_max_batch_answer_every_request_in_order(inline, max_batch):
    sizes = []

    def fn(xs):
        sizes.append(len(xs))
        return [x * 10 for x in xs]

    b = MicroBatcher(fn, max_batch, inline=inline)
    try:
        assert _answer_all(b, range(20)) == [x * 10 for x in range(20)]
    finally:
        b.close()
    assert sum(sizes) == 20 and max(sizes) <= max_batch and b.items == 20


@pytest.mark.parametrize("forced", [0, -5])
def test_the_drain_cannot_spin_whatever_max_batch_became(forced):
    """The hang of issue 17: ``max_batch = 0`` took an empty slice forever. Set behind the check's
    back, it still answers every request (one at a time) instead of freezing the event loop."""
    b = MicroBatcher(lambda xs: [x + 1 for x in xs], 8, inline=True)
    b.max_batch = forced
    assert _answer_all(b, range(5), timeout=5) == [1, 2, 3, 4, 5]
    assert b.batches == 5


def test_a_batch_function_that_loses_results_fails_the_requests_instead_of_hanging():
    b = MicroBatcher(lambda xs: xs[:-1], 8, inline=True)
    got = _answer_all(b, range(4), timeout=5)
    assert all(isinstance(x, RuntimeError) and "3 results for 4 requests" in str(x) for x in got), got


def test_create_app_refuses_bounds_before_building(synthetic_run):
    from twotower.serving.query import Recommender
    from twotower.serving.service import create_app

    rec = Recommender.load(synthetic_run)
    for kw in ({"max_batch": 0}, {"max_batch": MAX_BATCH + 1}, {"max_body_bytes": 0}, {"max_body_bytes": 10**12}):
        with pytest.raises(ConfigError):
            create_app(rec, **kw)
    assert create_app(rec, max_batch=1) is not None


def test_server_settings_are_bounded_and_say_which_flag():
    from twotower.serving.server import ServerSettings

    assert ServerSettings().port == 8000 and ServerSettings.checked(port=0).port == 0
    with pytest.raises(ConfigError) as e:
        ServerSettings.checked(port=70000, max_batch=0, header_timeout=float("nan"), keep_alive=-1)
    msg = str(e.value)
    for flag in ("--port 70000", "--max-batch 0", "--header-timeout nan", "--keep-alive -1"):
        assert flag in msg, msg
    assert "\n" not in msg
