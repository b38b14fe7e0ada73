"""bumper: a TLS-bumping proxy built on mitmproxy."""

__version__ = "0.1.0"
