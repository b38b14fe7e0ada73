"""upload_limit: refuse request bodies over a size, per host pattern, with 413, counting the body as
it streams instead of buffering it. A body that declares its length is refused before any of it is
sent upstream; one that does not (chunked, h2) is cut off where it passes the limit."""

from __future__ import annotations

from dataclasses import dataclass, field

from mitmproxy import http
from mitmproxy.utils import human

from bumper.addon import Addon, Bytes, Refuse
from bumper.policy import names


@dataclass(frozen=True)
class UploadLimitSettings:
    max_bytes: Bytes = Bytes(10 * 1024**2)
    hosts: dict[str, Bytes] = field(default_factory=dict)  # host pattern -> its limit; the first match wins

    def __post_init__(self) -> None:
        names.checked_patterns(tuple(self.hosts))


class UploadLimit(Addon):
    name = "upload_limit"
    Settings = UploadLimitSettings
    blocks = True

    def __init__(self, settings: UploadLimitSettings) -> None:
        super().__init__(settings)
        self._key = f"upload_limit.{id(self)}"

    def limit(self, host: str) -> int:
        for pattern, limit in self.settings.hosts.items():
            if names.host_matches(pattern, host):
                return int(limit)
        return int(self.settings.max_bytes)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        declared = flow.request.headers.get("content-length", "")
        limit = self.limit(flow.request.pretty_host)
        if declared.isdigit() and int(declared) > limit:
            raise Refuse(self._reason(limit), 413)
        flow.metadata[self._key] = 0  # the body's bytes seen so far, by this entry of the chain

    def request_data(self, flow: http.HTTPFlow, chunk: bytes) -> bytes:
        sent = flow.metadata[self._key] = flow.metadata.get(self._key, 0) + len(chunk)
        limit = self.limit(flow.request.pretty_host)
        if sent > limit:
            raise Refuse(self._reason(limit), 413)
        return chunk

    @staticmethod
    def _reason(limit: int) -> str:
        return f"request body over the upload limit of {human.pretty_size(limit)}"
