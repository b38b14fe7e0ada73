"""block: refuse requests to listed domains or URLs with a 403 page (HTML, JSON or plain text, by
Accept) that gives the reason and a reference id; the same id is in the access log."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path

from mitmproxy import http

from bumper.addon import Addon, Refuse
from bumper.policy import names


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
        self.domains, urls = settings.listed
        self.url_globs = tuple(u.lower() for u in urls if not u.startswith(names.REGEX_PREFIX))
        self.url_regexes = tuple(re.compile(u[len(names.REGEX_PREFIX) :]) for u in urls if u not in self.url_globs)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if why := self.listed(flow.request):
            raise Refuse(f"{self.settings.reason} ({why})")

    def listed(self, request: http.Request) -> str | None:
        host = request.pretty_host
        for pattern in self.domains:
            if names.host_matches(pattern, host):
                return f"domain {pattern}"
        # Globs see host/path?query without the scheme; `*` spans any characters, "/" included.
        bare = f"{names.normalize(host)}{request.path}".lower()
        for glob in self.url_globs:
            if fnmatch.fnmatchcase(bare, glob):
                return f"URL {glob}"
        for regex in self.url_regexes:
            if regex.fullmatch(request.pretty_url):
                return f"URL regex:{regex.pattern}"
        return None
