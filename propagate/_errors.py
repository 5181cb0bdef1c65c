"""The exceptions and warnings propagate raises, in one place."""

from __future__ import annotations


class PropagateError(Exception):
    """Base class of the errors propagate raises itself."""


class ContextSerializationError(PropagateError, TypeError):
    """A registered ContextVar holds a value that cannot be pickled for another process."""


class TaskSerializationError(PropagateError, TypeError):
    """The function or its arguments cannot be pickled, even by cloudpickle."""


class CrossThreadExitWarning(RuntimeWarning):
    """A `propagate.span` scope was exited on a thread or Context other than its entering one."""
