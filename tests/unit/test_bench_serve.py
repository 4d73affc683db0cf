"""bench serve's set-up calls: a 503 while a pool model's circuit is still open is waited out
(Retry-After), anything else, or a 503 past the bound, is raised."""

from __future__ import annotations

import httpx
import openai
import pytest

from icl_router.bench.serve import _until_up


def _error(status: int, retry_after: str = "2") -> openai.APIStatusError:
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    response = httpx.Response(status, headers={"retry-after": retry_after}, request=request)
    return openai.APIStatusError("no pool model could answer: m (open_circuit)", response=response, body=None)


def test_a_503_is_waited_out_by_its_retry_after():
    answers, slept = [_error(503), _error(503, "1"), "ok"], []

    def fn():
        got = answers.pop(0)
        if isinstance(got, Exception):
            raise got
        return got

    assert _until_up(fn, sleep=slept.append) == "ok"
    assert slept == [2.0, 1.0]


def test_other_errors_and_a_503_past_the_bound_are_raised():
    def fail(status: int):
        def fn():
            raise _error(status)
        return fn

    with pytest.raises(openai.APIStatusError) as e:
        _until_up(fail(401), sleep=lambda s: None)
    assert e.value.status_code == 401
    with pytest.raises(openai.APIStatusError) as e:
        _until_up(fail(503), -1.0, sleep=lambda s: None)
    assert e.value.status_code == 503
