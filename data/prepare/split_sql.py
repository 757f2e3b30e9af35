"""The SQL of the split step (data/prepare/plan.py), as pure functions of its parameters: the same text for both
engines."""

from __future__ import annotations


def kth_smallest_time(k: int) -> str:
    """The k-th smallest event time (0-based), from a histogram of times: no global sort of the events."""
    return (f"SELECT min(ts) FROM (SELECT ts, sum(c) OVER (ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT "
            f"ROW) AS cum FROM (SELECT ts, count(*) AS c FROM events GROUP BY ts) h) t WHERE cum > {k}")


def time_queries(window: str, lo: int, relevant: str, keep_cold_items: bool, keep_cold_users: bool,
                 valid_start: int) -> str:
    """A query per user with a relevant event in `window`: the history before their first event at or after `lo`,
    their relevant items in the window as targets (items first seen at or after `valid_start` are cold and left
    out unless kept; so are users without history unless kept)."""
    cold = "" if keep_cold_items else f" AND item IN (SELECT DISTINCT item FROM events WHERE ts < {valid_start})"
    history = "" if keep_cold_users else " WHERE f.cutoff > 0"
    return (f"SELECT DISTINCT c.user, f.cutoff, x.ts AS context_ts, c.item AS target "
            f"FROM (SELECT user, item FROM events WHERE {window} AND {relevant}{cold}) c "
            f"JOIN (SELECT user, min(pos) AS cutoff FROM events WHERE ts >= {lo} GROUP BY user) f "
            f"ON c.user = f.user JOIN events x ON x.user = f.user AND x.pos = f.cutoff{history}")


def repeat_counts(split: str) -> str:
    """One row: the split's targets, those the user had consumed before the query, and the queries whose every
    target is such a repeat."""
    reps = (f"SELECT q.user, CASE WHEN f.first_pos < q.cutoff THEN 1 ELSE 0 END AS rep FROM q_{split} q "
            f"LEFT JOIN (SELECT e.user, e.item, min(e.pos) AS first_pos FROM events e JOIN q_{split} t "
            f"ON e.user = t.user AND e.item = t.target GROUP BY e.user, e.item) f "
            f"ON q.user = f.user AND q.target = f.item")
    return (f"SELECT coalesce(sum(t), 0), coalesce(sum(r), 0), coalesce(sum(CASE WHEN a = 1 THEN 1 ELSE 0 END), 0) "
            f"FROM (SELECT user, count(*) AS t, sum(rep) AS r, min(rep) AS a FROM ({reps}) x GROUP BY user) y")


def empty_split_hints(leave_one_out: bool, most_events: int) -> dict[str, str]:
    """Why each split could come out empty, for the error that names it."""
    if leave_one_out:
        return {"training": f"leave-one-out trains on each user's events after the first and before the last two, "
                            f"so users need at least 4 events (the most active has {most_events})",
                "validation": "no user's second-last event passed --min-relevant-rating",
                "test": "no user's last event passed --min-relevant-rating"}
    return {"training": "the time split trains on events before the validation cutoff that follow the user's first",
            "validation": "no user with history had a relevant event in the validation window",
            "test": "no user with history had a relevant event in the test window"}
