"""Policies, pure of mitmproxy: the model and its decision (rules), loading the YAML file (load,
binder), names and patterns, learned pinning's memory, and the policy in force (source)."""
