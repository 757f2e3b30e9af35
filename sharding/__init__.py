"""Sharding: planner, per-table constraints, and the checks that fail fast on impossible plans."""
