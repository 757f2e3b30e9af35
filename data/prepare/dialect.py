"""The few SQL functions DuckDB and Spark spell differently; everything else in plan.py is SQL both run.

Each function returns SQL text. Arithmetic stays within int64 on both engines (Spark runs in ANSI mode,
where an overflow is an error, and DuckDB always errs on one), and every order is total, so the two engines
compute the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIME = 2_147_483_647  # 2**31 - 1: hash state stays below 2**31, so products stay below 2**62


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

    def xor(self, a: str, b: str) -> str:
        return f"({a} ^ {b})" if self.spark else f"xor({a}, {b})"

    def shift_right(self, a: str, bits: int) -> str:
        return f"shiftright({a}, {bits})" if self.spark else f"({a} >> {bits})"

    def window_list(self, x: str) -> str:
        """A list aggregate used over an ordered window frame (its elements in frame order)."""
        return f"collect_list({x})" if self.spark else f"array_agg({x})"

    def ordered_list(self, value: str, key: str) -> str:
        """The group's `value`s ordered by `key` (unique within the group)."""
        if self.spark:
            return f"transform(array_sort(collect_list(named_struct('k', {key}, 'v', {value}))), x -> x.v)"
        return f"array_agg({value} ORDER BY {key})"

    def length(self, values: str) -> str:
        return f"size({values})" if self.spark else f"len({values})"

    def empty_list(self) -> str:
        return "CAST(array() AS ARRAY<BIGINT>)" if self.spark else "CAST([] AS BIGINT[])"

    def tail(self, values: str, n: int) -> str:
        """The last `n` elements of a list (all of it when shorter)."""
        size = self.length(values)
        if self.spark:
            return f"slice({values}, greatest({size} - {n} + 1, 1), {n})"
        return f"list_slice({values}, greatest({size} - {n} + 1, 1), {size})"

    def mix(self, a: str, b: str, seed: int) -> str:
        """A hash of two non-negative integers into [0, 2**31 - 1), identical on both engines: a seeded linear
        start, then xor-shift and multiply rounds modulo a prime."""
        h = (f"((CAST({a} AS BIGINT) % {PRIME}) * 48271 + (CAST({b} AS BIGINT) % {PRIME}) * 69621 + {seed % PRIME}) "
             f"% {PRIME}")
        for shift, multiplier in ((15, 1_103_515_245), (13, 2_147_483_629)):
            h = self.xor(h, self.shift_right(h, shift))
            h = f"(({h}) * {multiplier}) % {PRIME}"
        return self.xor(h, self.shift_right(h, 16))


DUCKDB = Dialect("duckdb")
SPARK = Dialect("spark")
