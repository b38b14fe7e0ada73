"""Certificates, pure of mitmproxy: reading and minting them (der, keys, mimic, compare), judging
them (trust), and the stores around minting (ca, keypool, mimicstore, mimicdb)."""
