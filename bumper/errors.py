"""The one exception type that reaches the user as a one-line message and exit code 2."""


class ConfigError(Exception):
    """A configuration problem: the message names the file or option and what is wrong."""
