"""Every error type mlxlora raises, and the two messages that many commands share.

Each user-facing failure is an MlxloraError: the CLI prints its message on one line and exits 1.
"""

from __future__ import annotations


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


class TrainingStopped(MlxloraError):
    """Training stopped early (non-finite losses, Ctrl-C, a lost rank); the message says how to resume."""


class UnknownModel(AdapterError):
    """A request named a model that is neither the served base nor a loaded adapter."""


class RowError(ValueError):
    """One data row is unusable; the loader adds the file and line (and raises DataError)."""


class HTTPError(Exception):
    """An HTTP answer other than 200 from `mlxlora serve`: status and the message sent to the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def exists_error(path, *, flag: str | None = None, what: str = "folder", also: str = "",
                 cls: type[MlxloraError] = MlxloraError) -> MlxloraError:
    """The one wording of "the output is already there": names the flag and path, --force and the way out.

    also: more ways out (", --resume to continue its training"). cls: the error type to return.
    """
    where = f"{flag}: " if flag else ""
    return cls(f"{where}{path} already exists; pass --force to replace it{also}, or choose another {what}")


def choice_error(flag: str, value, choices, cls: type[MlxloraError] = ConfigError) -> MlxloraError:
    """The one wording of "not one of the allowed values" (bits, dtypes, group sizes, strategies...)."""
    listed = ", ".join(str(c) for c in choices)
    return cls(f"{flag} must be one of {listed}, got {value!r}")
