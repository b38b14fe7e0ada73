"""block: refuse requests to listed domains or URLs with a 403 page (HTML, JSON or plain text, by
Accept) that gives the reason and a reference id; the same id is in the access log."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import http

from bumper.addon import Addon, Refuse, pretty_url
from bumper.policy import names, urls


@dataclass(frozen=True)
class BlockSettings:
    domains: tuple[str, ...] = ()  # example.com, *.example.com, regex:...
    urls: tuple[str, ...] = ()  # host/path globs (example.com/admin/*), or regex: on the whole URL
    # One domain or URL pattern per line, # comments; an entry with "/" (regex: ones too) is a URL pattern.
    files: tuple[str, ...] = ()
    reason: str = "blocked by policy"
    # The files' entries, read when the policy is (re)loaded: part of the settings, so that a reload
    # after a list changed gets a new Block and one with the same lists keeps the old.
    listed: tuple[tuple[str, ...], tuple[str, ...]] = field(init=False, default=((), ()))

    def __post_init__(self) -> None:
        domains, urls = self._read()
        object.__setattr__(self, "listed", (names.checked_patterns(domains), urls))
        for pattern in urls:
            if pattern.startswith(names.REGEX_PREFIX):
                try:
                    re.compile(pattern[len(names.REGEX_PREFIX) :])
                except re.error as e:
                    raise ValueError(f"bad URL regex {pattern!r}: {e}") from None

    def _read(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The domains and URL patterns, inline and from the files."""
        domains, urls = list(self.domains), list(self.urls)
        for name in self.files:
            try:
                lines = Path(name).read_text().splitlines()
            except OSError as e:
                raise ValueError(f"cannot read block list {name}: {e.strerror}") from None
            for line in lines:
                entry = line.split("#", 1)[0].strip()
                if entry:
                    (urls if "/" in entry else domains).append(entry)
        return tuple(domains), tuple(urls)


class Block(Addon):
    name = "block"
    Settings = BlockSettings
    blocks = True

    def __init__(self, settings: BlockSettings) -> None:
        super().__init__(settings)
        self.domains, listed_urls = settings.listed
        globs = [u for u in listed_urls if not u.startswith(names.REGEX_PREFIX)]
        # Each glob in the form targets are matched in, and as the policy wrote it (for the reason).
        self.url_globs = tuple((glob_form(u), u.lower()) for u in globs)
        self.url_regexes = tuple(re.compile(u[len(names.REGEX_PREFIX) :]) for u in listed_urls if u not in globs)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if why := self.listed(flow.request):
            raise Refuse(f"{self.settings.reason} ({why})")

    def listed(self, request: http.Request) -> str | None:
        host = request.pretty_host
        for pattern in self.domains:
            if names.host_matches(pattern, host):
                return f"domain {pattern}"
        if not (self.url_globs or self.url_regexes):
            return None
        # Matched on every reading of the target an upstream may take (urls.readings), with the host
        # folded; the request goes on as sent. Globs see host/path?query without the scheme and any
        # case; `*` spans any characters, "/" included.
        raw = pretty_url(request)
        url = urls.parse(raw)
        targets = urls.readings(url.target)
        bare = [f"{url.host}{target}".lower() for target in targets]
        for glob, shown in self.url_globs:
            if any(fnmatch.fnmatchcase(b, glob) for b in bare):
                return f"URL {shown}"
        whole = dict.fromkeys([raw, *(url.origin + target for target in targets)])
        for regex in self.url_regexes:
            if any(regex.fullmatch(w) for w in whole):
                return f"URL regex:{regex.pattern}"
        return None


def glob_form(glob: str) -> str:
    """A URL glob as targets are matched: lower case, escapes of unreserved characters decoded (the
    client's `%7E` and `~` are one character), the host part folded as host names are."""
    host, slash, path = glob.partition("/")
    if not any(c in host for c in "*?["):
        host = names.normalize(host)
    return f"{host}{slash}{urls.decode_unreserved(path)}".lower()
