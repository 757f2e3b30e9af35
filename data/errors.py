"""One error type for every bad input, so users always learn the file, column and expectation."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Raised for any bad input file; the message names file, column, expectation and finding."""

    def __init__(self, path: str | os.PathLike, column: str | None, expected: str, found: str = ""):
        self.path = str(path)
        self.column = column
        self.expected = expected
        self.found = found
        where = f"{self.path}: column '{column}'" if column else self.path
        message = f"{where}: expected {expected}"
        if found:
            message += f"; found {found}"
        super().__init__(message)

    @classmethod
    def verbatim(cls, message: str) -> "DataError":
        """The error another process raised and passed back as text (a Spark executor's), unchanged."""
        error = cls.__new__(cls)
        path, _, rest = message.partition(": ")
        error.path, error.column, error.expected, error.found = path, None, rest, ""
        ValueError.__init__(error, message)
        return error
