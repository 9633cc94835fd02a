"""The one exception type for bad input data."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data: a missing or corrupt file, a malformed manifest, an unknown class, an empty dataset.

    The message is one line that names the cause (the file path, the manifest line, the class or value), so it
    can be shown to a user as is. A ``ValueError`` subclass, so callers that validate arguments catch it too.
    """
