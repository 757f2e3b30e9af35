"""Tracking: `logger` (the interface the loop logs through, and the null one), `mlflow_logger` (MLflow, never
blocking a step), `records` (what is sent, and how), `outbox` (what could not be sent, replayed later),
`system_metrics`, `run_info` (what names and describes a run) and `plots`."""
