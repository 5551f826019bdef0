"""Error types. Every user-facing failure is one of these: the CLI prints its message on one line and exits 1."""


class MlxloraError(Exception):
    """Base class: the message says what is wrong, where (file/line/flag), and how to fix it."""


class ConfigError(MlxloraError, ValueError):
    """A bad flag, config key or config value."""


class DataError(MlxloraError, ValueError):
    """A dataset file or row that cannot be used."""


class ModelError(MlxloraError):
    """A base model that cannot be found, read or converted."""


class AdapterError(MlxloraError):
    """An adapter folder that cannot be read, written, or does not fit the base."""


class HubError(MlxloraError):
    """An upload that cannot start or that the Hub refused."""
