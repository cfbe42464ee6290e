"""Errors shared across tuneserve. Each edge (HTTP, CLI) maps them to its own form."""


class TuneserveError(Exception):
    """Base of every expected failure: the message is meant for the user."""


class ConfigError(TuneserveError):
    """Configuration is missing or invalid; the message names the key."""


class ModelPreparationError(TuneserveError):
    """The default model could not be prepared."""
