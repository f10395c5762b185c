"""Reading the session cookie from raw request headers (gateway/auth/middleware.py): the named cookie only,
the first one when repeated, nothing from a lookalike name or a header that is not Cookie."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from gateway.auth.middleware import cookie_value
from gateway.auth.sessions import COOKIE_VALUE, new_secret

NAME = "appliance_session"


def test_the_named_cookie_is_found_among_others() -> None:
    value = new_secret()
    assert COOKIE_VALUE.fullmatch(value)
    headers = [(b"cookie", f"_session=idp; {NAME}={value}; theme=dark".encode())]
    assert cookie_value(headers, NAME) == value
    repeated = [(b"cookie", f"{NAME}=first".encode()), (b"cookie", f"{NAME}=second".encode())]
    assert cookie_value(repeated, NAME) == "first"
    assert cookie_value([(b"cookie", f"x{NAME}={value}; {NAME}x={value}".encode())], NAME) is None
    assert cookie_value([(b"set-cookie", f"{NAME}={value}".encode())], NAME) is None
    assert cookie_value([(b"cookie", NAME.encode())], NAME) is None
    assert cookie_value([(b"cookie", f"{NAME}=".encode())], NAME) == ""


@given(st.binary(max_size=300))
@example(b"appliance_session=\xff\xfe; ;;=")
def test_any_cookie_header_is_read_without_error(raw: bytes) -> None:
    found = cookie_value([(b"cookie", raw)], NAME)
    assert found is None or isinstance(found, str)
