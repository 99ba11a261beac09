"""User-facing errors. The CLI prints one line for each and exits with code 2."""


class SAEBenchError(Exception):
    """A mistake the user can fix; the message says how."""


class ConfigError(SAEBenchError):
    """A bad config key or value."""


class DataError(SAEBenchError):
    """A missing or unreadable dataset, or bad input values (NaN, wrong width)."""


class ModelError(SAEBenchError):
    """A model that cannot be found or loaded."""


class HookError(SAEBenchError):
    """A hook name the model does not have."""
