"""The upstream leg, pure of mitmproxy: its TLS (tls), how an upstream is judged (verifier), chain
completion (aia), the splice probe, and --resolve."""
