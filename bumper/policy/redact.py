"""What logs may show of a request: credentials masked, so that a log file (kept for months, copied
to other systems, read by more people than the traffic) never becomes a store of tokens.

Masked by default, everywhere bumper logs (the connection log on stderr, the access log):
- the values of URL query and path parameters whose name looks like a secret (SECRET_NAMES, any part
  of the name, any case: `token`, `api_key`, `X-Amz-Signature`, `sessionid`...);
- a URL's password (`https://user:PASSWORD@host/`);
- the values of the headers that carry credentials (`Authorization`, `Proxy-Authorization`,
  `Cookie`, `Set-Cookie`), wherever a log line quotes one.
Only what is logged is masked: what is forwarded is never changed here.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MASK = "REDACTED"

# Any part of a parameter's name: over-masking a harmless `author=` costs a log reader little,
# a missed `x_auth_token=` leaks a credential.
SECRET_NAMES = re.compile(
    r"token|key|pass|pwd|secret|sig|auth|session|sess_?id|credential|cookie|otp|nonce|ticket|jwt|saml|code",
    re.IGNORECASE,
)
# name=value after ? & or ; (query and path parameters): the value runs to the next separator.
_PARAMETER = re.compile(r"([?&;])([^=&;#?/\s\"']*)=([^&;#?\s\"']*)")
# scheme://user:password@
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/@:\s\"']*:)([^/@\s\"']*)(@)")
# A credential header quoted in a message: its value runs to the line's (or quoted string's) end.
_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|(?:set-)?cookie)(['\"]?\s*[:=,]\s*['\"]?)([^\r\n\"'\\]+)", re.IGNORECASE
)


def url(text: str) -> str:
    """TEXT, a URL, with the values of its secret-looking parameters and its password masked."""
    if "=" not in text and "@" not in text:  # no parameter, no userinfo: both patterns need one (most URLs)
        return text
    return _USERINFO.sub(rf"\1{MASK}\3", _PARAMETER.sub(_parameter, text))


def text(message: str) -> str:
    """Any log message: the URLs in it as url() masks them, and any credential header's value."""
    return _HEADER.sub(rf"\1\2{MASK}", url(message))


def _parameter(m: re.Match[str]) -> str:
    separator, name, value = m.groups()
    if not value or not SECRET_NAMES.search(unquote(name)):  # tok%65n is token to the upstream
        return m.group(0)
    # A path parameter (;jsessionid=...) ends with its segment; a query value may hold a "/".
    rest = value[value.find("/") :] if separator == ";" and "/" in value else ""
    return f"{separator}{name}={MASK}{rest}"
