"""User-facing errors.

Every problem a user can fix (bad params, bad data, an unreachable server, a
diverging loss) is raised as a ``VitkitError`` carrying one message that names
the file, key or entry at fault and what to do. Stage entry points catch it,
print the message without a traceback and exit with ``USER_ERROR_EXIT_CODE``;
the Prefect flow uses that code to tell such failures apart from transient ones
it may retry.
"""

USER_ERROR_EXIT_CODE = 2


class VitkitError(Exception):
    """A problem the user can fix; its message says which and how.

    One raised in a DataLoader worker (an image file that cannot be read) reaches the training
    process re-created by torch from one string: "Caught DataError in DataLoader worker process 0",
    the worker's traceback, and last the original message. Only that message is kept, so the
    stage still prints one line that names the file.
    """

    def __init__(self, message: str = "") -> None:
        super().__init__(_without_worker_traceback(message, type(self)))


def _without_worker_traceback(message: str, error: type[Exception]) -> str:
    """The original message inside torch's re-raise text of an error from a DataLoader worker."""
    if not (message.startswith("Caught ") and "DataLoader worker" in message.partition("\n")[0]):
        return message
    last_line_prefix = f"\n{error.__module__}.{error.__qualname__}: "
    _, found, original = message.rpartition(last_line_prefix)
    return original.rstrip("\n") if found else message


class ConfigError(VitkitError):
    """params.yaml (or a profile) does not match the schema."""


class DataError(VitkitError):
    """An input dataset is missing, corrupt or inconsistent."""


class TrackingError(VitkitError):
    """The MLflow tracking server cannot be used."""


class TrainingError(VitkitError):
    """Training cannot go on (e.g. a non-finite loss)."""


class RemoteError(VitkitError):
    """The DVC remote results are shared through cannot be used."""


class CheckpointError(VitkitError):
    """A checkpoint or weights file cannot be read (truncated, empty, corrupt or not weights)."""


class OutputError(VitkitError):
    """An output or state folder cannot be written (read-only, not a folder, disk full)."""
