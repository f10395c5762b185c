import pytest

from appliance.core.errors import APIError, overloaded, rate_limited
from appliance.core.wire import ChatCompletionRequest, CompletionRequest, parse_request, reject_unsupported


def test_error_body_has_openai_shape() -> None:
    err = APIError(400, "bad", param="messages", code="invalid_value")
    assert err.body() == {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages",
                                    "code": "invalid_value"}}


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert overloaded("busy", retry_after=0.2).headers["Retry-After"] == "1"
    assert rate_limited("slow down", retry_after=7.6).headers["Retry-After"] == "8"
    assert rate_limited("slow down", retry_after=7.6).status == 429


@pytest.mark.parametrize(("payload", "param"), [
    ([], None),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_chat_requests_are_400_naming_the_field(payload: object, param: str | None) -> None:
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, payload)
    assert info.value.status == 400
    assert info.value.param == param


def test_unsupported_fields_are_refused_not_ignored() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    reject_unsupported(parse_request(ChatCompletionRequest, {**base, "n": 2}))  # n > 1 is served (check_n)
    image = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    with pytest.raises(APIError, match="image_url"):
        reject_unsupported(parse_request(ChatCompletionRequest, image))
    with pytest.raises(APIError, match="best_of"):
        reject_unsupported(parse_request(CompletionRequest, {"model": "m", "prompt": "x", "best_of": 3}))


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    req = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 5, "max_completion_tokens": 9})
    assert req.token_limit() == 9
