"""What a job could not send, replayed into its run: `python -m trainer.tracking replay FILE`."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from trainer.tracking.records import client_for, leading_batch, send_batch

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


def count_records(path: Path) -> int:
    with open(path) as handle:
        return max(sum(1 for _ in handle) - 1, 0)


def replay(path: Path, client: MlflowClient | None = None) -> list[dict]:
    """Sends an outbox file's records in order; keeps the ones not sent (file rewritten), or removes the
    file and the run's staged images when all went through. Returns what is left."""
    path = Path(path)
    with open(path) as handle:
        header, *records = [json.loads(line) for line in handle if line.strip()]
    client = client or client_for(header["tracking_uri"])
    sent = 0
    while sent < len(records):
        batch = leading_batch(records, sent)
        try:
            send_batch(client, header["run_id"], batch)
        except Exception as err:  # noqa: BLE001 - reported, and kept for the next replay
            log.warning("replay stopped at record %d of %d: %s", sent + 1, len(records), str(err).splitlines()[0])
            left = records[sent:]
            path.write_text("".join(json.dumps(r) + "\n" for r in [header, *left]))
            return left
        sent += len(batch)
    path.unlink()
    remove_staged(path.with_suffix(""))
    return []


def remove_staged(files: Path) -> None:
    """Removes a run's staged images, and the outbox folder itself once nothing is left in it."""
    shutil.rmtree(files, ignore_errors=True)
    try:
        files.parent.rmdir()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tracking",
                                     description="Sends what a job could not send to MLflow (its outbox file).")
    sub = parser.add_subparsers(dest="command", required=True)
    command = sub.add_parser("replay", help="replay an outbox file into its run")
    command.add_argument("file")
    command.add_argument("--tracking-uri", help="send to this server instead of the one recorded in the file")
    args = parser.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        print(f"error: {path}: no such outbox file", file=sys.stderr)
        return 2
    total = count_records(path)
    left = replay(path, client_for(args.tracking_uri) if args.tracking_uri else None)
    if left:
        print(f"error: sent {total - len(left)} of {total} records; {len(left)} are still in {path} (run this again "
              f"once the server answers)", file=sys.stderr)
        return 1
    print(f"sent {total} records; {path} removed")
    return 0

