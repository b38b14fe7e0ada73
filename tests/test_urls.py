"""bumper.policy.urls, the normaliser every URL rule matches through: the RFC 3986 normal form, the
lenient readings servers take, and properties over any string a client may send (it never raises,
its forms are stable and bounded, and a target that needs no work gets none)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bumper.policy import urls

# Target as sent -> its RFC 3986 normal form (urls.canonical).
CANONICAL = [
    ("/", "/"),
    ("/%61dmin/x", "/admin/x"),  # an escaped unreserved character is that character
    ("/%7euser/%2d", "/~user/-"),
    ("/a%2fb", "/a%2Fb"),  # other escapes stay, in upper case
    ("/a%2Fb%3b", "/a%2Fb%3B"),
    ("/./admin/x", "/admin/x"),
    ("/pub/../admin/x", "/admin/x"),
    ("/pub/%2e%2e/admin/x", "/admin/x"),  # dots decoded before the dot segments go
    ("/../../etc", "/etc"),  # nothing climbs above the root
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("//admin/x", "//admin/x"),  # an empty segment is a segment to the RFC
    ("/admin;/x", "/admin;/x"),
    ("/pub/..;/admin", "/pub/..;/admin"),  # `..;` is no dot segment to the RFC (to Tomcat it is)
    ("/café 1", "/caf%C3%A9%201"),  # what may not stand in a URI is encoded as UTF-8
    ("/a\\b", "/a%5Cb"),
    ("/100%", "/100%25"),  # a % that starts no escape is a %
    ("/%zz", "/%25zz"),
    ("/a?%74oken=%7e&b=%2f+c", "/a?token=~&b=%2F+c"),  # the query: escapes only, order and + kept
    ("/a?x=../y", "/a?x=../y"),  # no dot segments in a query
    ("*", "*"),  # OPTIONS *
    ("", ""),
]


@pytest.mark.parametrize(("target", "expected"), CANONICAL)
def test_canonical(target: str, expected: str) -> None:
    assert urls.canonical(target) == expected


# Target as sent -> a reading of it that must be among urls.readings (the server that reads it so).
READ_AS = [
    ("/%61dmin/x", "/admin/x"),
    ("//admin/x", "/admin/x"),  # nginx merge_slashes
    ("/admin%2fx", "/admin/x"),  # servers that decode %2F (nginx, hypercorn)
    ("/admin%2Fx", "/admin/x"),
    ("/admin;/x", "/admin/x"),  # Tomcat and Spring drop path parameters
    ("/admin;jsessionid=1/x", "/admin/x"),
    ("/pub/..;/admin/x", "/admin/x"),
    ("/pub%2f..%2fadmin/x", "/admin/x"),
    ("/x;%2f..%2f..%2fadmin/y", "/admin/y"),  # decoded, then the dots: parameters kept
    ("/admin%5cx", "/admin/x"),  # IIS: a backslash is a slash
    ("/pub\\..\\admin\\x", "/admin/x"),
    ("/%2561dmin/x", "/admin/x"),  # decoded twice, by a server behind a server
    ("/%25252561dmin/x", "/admin/x"),
    ("/a//../admin", "/admin"),  # slashes merged, then the dots
    ("/a//../admin", "/a/admin"),  # the dots, slashes kept
    ("/a?b=%74oken%2f", "/a?b=token/"),
]


@pytest.mark.parametrize(("target", "reading"), READ_AS)
def test_readings_include_how_servers_read_the_target(target: str, reading: str) -> None:
    found = urls.readings(target)
    assert found[0] == target and urls.canonical(target) in found
    assert reading in found, found


def test_escapes_nested_deeper_than_the_bound_are_decoded_only_that_often() -> None:
    target = "/%" + "25" * urls.MAX_DECODE_ROUNDS + "61dmin"  # %2561 is %61 is a, and so on
    assert "/admin" not in urls.readings(target)
    assert "/%61dmin" in urls.readings(target)


@pytest.mark.parametrize("target", ["/", "/admin/x", "/a-b_c~d/e.html", "/a/b/", "/x?q=1&r=a/b", "/api/v1:run@x"])
def test_a_target_with_nothing_to_normalize_is_its_only_reading(target: str) -> None:
    assert urls.readings(target) == (target,)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTPS://UpStream.Test:443/%7euser/./a/../b?q=%7e", "https://upstream.test/~user/b?q=~"),
        ("http://Example.COM.:80/", "http://example.com/"),
        ("http://example.com:8080/x", "http://example.com:8080/x"),
        ("https://example.com:80/x", "https://example.com:80/x"),  # 80 is http's default, not https's
        ("http://[::1]:80/a", "http://[::1]/a"),
        ("https://[::1]:8443/a", "https://[::1]:8443/a"),
        ("https://bücher.example/x", "https://xn--bcher-kva.example/x"),
        ("https://example.com?q", "https://example.com/?q"),
        ("https://Example.com:x/y", "https://example.com:x/y"),  # no port: kept whole, lower case
        ("/no/scheme/%61", "/no/scheme/a"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert urls.normalize(url) == expected


def test_parse_takes_an_url_apart() -> None:
    assert urls.parse("HTTPS://A.Example:8443/x?y") == urls.Url("https", "a.example", 8443, "/x?y")
    assert urls.parse("https://a.example:443").origin == "https://a.example"


@pytest.mark.parametrize(
    ("pattern", "expected"), [("/%7Euser/%2f*", "/~user/%2F*"), ("/a?b[c]*", "/a?b[c]*"), ("/100%", "/100%")]
)
def test_decode_unreserved_leaves_glob_characters_alone(pattern: str, expected: str) -> None:
    assert urls.decode_unreserved(pattern) == expected


FUZZ = settings(derandomize=True, max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
# What clients send, weighted towards the characters that matter here.
PIECES = st.sampled_from([*"/.;%\\?aA2fF5cCe0:+ #é", "%2e", "%2f", "%25", "..", "//"])
TARGETS = st.lists(PIECES, max_size=40).map("".join)


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


@FUZZ
@given(TARGETS | st.text())
def test_canonical_is_stable_and_bounded(target: str) -> None:
    once = urls.canonical(target)
    assert urls.canonical(once) == once
    assert once.isascii()
    assert len(once) <= 3 * utf8_length(target)  # each byte at most one escape


@FUZZ
@given(TARGETS | st.text())
def test_readings_never_raise_and_stay_bounded(target: str) -> None:
    found = urls.readings(target)
    assert found[0] == target
    assert 1 <= len(found) <= 6
    assert all(utf8_length(r) <= 3 * utf8_length(target) for r in found)


@FUZZ
@given(st.text())
def test_normalize_never_raises_and_is_stable(url: str) -> None:
    for candidate in (url, "https://" + url, "http://" + url + "/x"):
        assert urls.normalize(urls.normalize(candidate)) == urls.normalize(candidate)
