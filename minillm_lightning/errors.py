"""Error types whose messages are meant for users: each names the file/line/field at fault and the fix.

The ``minillm`` command prints them without a traceback. :func:`worker_crash_report` finds PyTorch's report of a dead
DataLoader worker behind an exception; it lives here, free of Lightning, because the command's error path needs it.
"""


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


def type_name(value: object) -> str:
    """``value``'s type with its article, for messages: "an int", "a list"."""
    kind = type(value).__name__
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def field_state(record: dict, key: str) -> str:
    """What a record's field ``key`` holds, for messages: "missing", "null" or its type ("an int")."""
    return "missing" if key not in record else "null" if record[key] is None else type_name(record[key])


KIND_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number"}
"""The JSON kinds an expected Python type stands for, for messages: "field 'text' is an int, not a string"."""


def worker_crash_report(exception: BaseException | None) -> RuntimeError | None:
    """PyTorch's error for a DataLoader worker that exited unexpectedly (killed, out of memory, segfault).

    Found in ``exception`` itself or in its causes and contexts (see ``callbacks.interrupt.await_worker_report``);
    None if absent.
    """
    seen: set[int] = set()
    while exception is not None and id(exception) not in seen:
        if isinstance(exception, RuntimeError) and "DataLoader worker" in str(exception):
            return exception
        seen.add(id(exception))
        exception = exception.__cause__ or exception.__context__
    return None
