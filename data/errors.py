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
