"""The few SQL functions DuckDB and Spark spell differently; everything else in plan.py is SQL both run.

Each function returns SQL text. Arithmetic stays within int64 on both engines (Spark runs in ANSI mode, where an
overflow is an error, and DuckDB always errs on one), and every order is total, so the two engines compute the
same rows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dialect:
    name: str  # "duckdb" or "spark"

    @property
    def spark(self) -> bool:
        return self.name == "spark"

    def text(self, x: str) -> str:
        return f"CAST({x} AS {'STRING' if self.spark else 'VARCHAR'})"

    def idiv(self, a: str, b: str) -> str:
        """Integer division of non-negative operands."""
        return f"({a} DIV {b})" if self.spark else f"({a} // {b})"

    def ordered_list(self, value: str, key: str) -> str:
        """The group's `value`s ordered by `key` (unique within the group)."""
        if self.spark:
            return f"transform(array_sort(collect_list(named_struct('k', {key}, 'v', {value}))), x -> x.v)"
        return f"array_agg({value} ORDER BY {key})"

    def empty_list(self) -> str:
        return "CAST(array() AS ARRAY<BIGINT>)" if self.spark else "CAST([] AS BIGINT[])"


DUCKDB = Dialect("duckdb")
SPARK = Dialect("spark")
