"""Error types whose messages are meant for users: each names the file/line/field at fault and the fix.

The ``minillm`` command prints them without a traceback."""


class MiniLLMError(ValueError):
    """Base class of user-facing errors."""


class DataError(MiniLLMError):
    """Bad input data (file, line, field)."""


class CheckpointError(MiniLLMError):
    """A checkpoint that cannot be used as asked."""


class ResourceError(MiniLLMError):
    """A run that cannot fit in the available memory (or other machine resources) as configured."""


class ConfigError(MiniLLMError):
    """Settings that contradict each other (e.g. a data length above the model context)."""
