"""The parts of GET /recommendations/{user_id} that read what a client sent and write where it is sent next,
without a worker: the user id of the path (percent-encoded UTF-8, nothing else), ``k`` (ASCII digits, 1 to
MAX_REQUEST_K), and the Location of a redirect to the owner, which must carry the same id back."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from stream.queries import redirect_location, user_in_path
from stream.worker import MAX_REQUEST_K, request_k

IDS = ["u1", "élève", "名前", "😀", "a/b", "a%b", "a+b", "a b", "a?b#c", "a&b=c", ".", "..", "%FF", "~-_.!*'()"]


@pytest.mark.parametrize(("raw", "user"), [
    ("u1", "u1"), ("%C3%A9l%C3%A8ve", "élève"), ("%c3%a9", "é"), ("a%2Fb", "a/b"), ("a%25b", "a%b"),
    ("a+b", "a+b"), ("a%20b", "a b"), ("%F0%9F%98%80", "😀"), ("élève", "élève"),
])
def test_the_path_segment_is_decoded_as_percent_encoded_utf8(raw: str, user: str) -> None:
    """Escapes in either case, reserved characters escaped, and characters sent unescaped all give the id."""
    assert user_in_path(raw) == user


@pytest.mark.parametrize(("raw", "reason"), [
    ("%FF", "not percent-encoded UTF-8"), ("u%C3", "not percent-encoded UTF-8"),
    ("%ED%A0%80", "not percent-encoded UTF-8"), ("%C0%AF", "not percent-encoded UTF-8"),
    ("u%zz", "'%' at 1 of the path segment starts no percent-escape"),
    ("u%4", "'%' at 1 of the path segment starts no percent-escape"),
    ("u%", "'%' at 1 of the path segment starts no percent-escape"),
])
def test_a_path_segment_that_is_not_percent_encoded_utf8_is_refused_in_one_line(raw: str, reason: str) -> None:
    """aiohttp hands such a segment on undecoded ("%FF"), which named another user (the one whose id is "%FF");
    it is refused, with a reason fit for a 400 answer."""
    with pytest.raises(ValueError, match=r"^invalid user_id: ") as exc:
        user_in_path(raw)
    assert reason in str(exc.value) and "\n" not in str(exc.value)


def test_a_redirect_encodes_the_id_as_utf8_percent_escapes_and_keeps_the_query() -> None:
    assert redirect_location("http://w2:6066", "élève", {"k": "3"}) == \
        "http://w2:6066/recommendations/%C3%A9l%C3%A8ve?k=3"
    assert redirect_location("http://w2:6066", "a/b c%d+e?f#g", {}) == \
        "http://w2:6066/recommendations/a%2Fb%20c%25d%2Be%3Ff%23g"  # no query: no "?"
    assert redirect_location("http://w2:6066", "u1", {"k": "3", "exclude": "é,i 2"}) == \
        "http://w2:6066/recommendations/u1?k=3&exclude=%C3%A9%2Ci+2"


@pytest.mark.parametrize("user", IDS)
def test_following_a_redirect_reaches_the_same_user_with_the_same_query(user: str) -> None:
    """What the owner reads back from the Location (its last path segment, its query) is what was asked."""
    query = {"k": "5", "exclude": "é,a&b"}
    parts = urlsplit(redirect_location("http://w2:6066", user, query))
    prefix, _, segment = parts.path.rpartition("/")
    assert (parts.netloc, prefix, parts.fragment) == ("w2:6066", "/recommendations", "")
    assert user_in_path(segment) == user
    assert dict(parse_qsl(parts.query, keep_blank_values=True)) == query


@pytest.mark.parametrize(("text", "k"), [(None, 10), ("1", 1), ("10", 10), (str(MAX_REQUEST_K), MAX_REQUEST_K),
                                         ("0005", 5)])
def test_k_is_the_default_or_ascii_digits_from_1_to_the_maximum(text: str | None, k: int) -> None:
    assert request_k(text, 10) == k


@pytest.mark.parametrize("text", ["0", str(MAX_REQUEST_K + 1), "", "abc", " 5", "5 ", "1_0", "+5", "-1", "1e3", "٣",
                                  "5.0", "9" * 5000])
def test_any_other_k_is_refused_with_a_reason_that_names_k_and_its_range(text: str) -> None:
    """int() would read " 5", "1_0", "+5" and "٣" (an Arabic-Indic 3), and its messages name Python, not k."""
    with pytest.raises(ValueError, match=f"^k must be 1 to {MAX_REQUEST_K}, not ") as exc:
        request_k(text, 10)
    assert "\n" not in str(exc.value) and len(str(exc.value)) < 80
