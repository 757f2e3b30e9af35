"""Takes docs/mlflow_run_page.png: the MLflow UI's page of a training run, in headless Chromium.

    make ui-screenshot          (or, from the checkout: .venv/bin/python -m docs.ui_screenshot [--out PNG])

Trains the demo model for two epochs on a small synthetic dataset against a real `mlflow server`
(sqlite, in a temporary directory), registers the model, and screenshots the run's Overview page:
name, description, tags, dataset, metrics and the logged and registered model. Needs Chromium from
the OS packages (`apt-get install chromium` on Debian); says so when it is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from tests.e2e.test_tracking import Server

ROOT = Path(__file__).resolve().parents[1]

# MLflow 3.17's UI picks GenAI or model-training mode from a UI toggle (kept in the browser), not from the
# experiment's mlflow.experimentKind tag, which the trainer sets for UIs that read it; a link carries the mode.
TRAINING_MODE = "workflowType=machine_learning"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1500", "--virtual-time-budget=30000"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "mlflow_run_page.png"))
    parser.add_argument("--experiment-out", default=str(ROOT / "docs" / "mlflow_experiment_page.png"))
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: Chromium is not installed: apt-get install chromium (Debian) or your OS's package",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "data"
        subprocess.run([sys.executable, "-m", "data.prepare", "synthetic", "--users", "2000", "--items", "1000",
                        "--out", str(data)], cwd=ROOT, check=True, capture_output=True)
        server = Server(work)
        try:
            subprocess.run([sys.executable, "-m", "trainer", "--config", "configs/synthetic.yaml",
                            f"data.path={data}", "train.epochs=2", f"tracking.uri={server.uri}",
                            "tracking.register_as=two-tower-demo", f"export.dir={work / 'exports'}",
                            f"tracking.outbox={work / 'outbox'}"], cwd=ROOT, check=True, capture_output=True)
            client = MlflowClient(server.uri)
            experiment = client.get_experiment_by_name("two-tower")
            run = client.search_runs([experiment.experiment_id])[0]
            experiment_url = f"{server.uri}/#/experiments/{experiment.experiment_id}?{TRAINING_MODE}"
            url = f"{server.uri}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}?{TRAINING_MODE}"
            for page, out in ((experiment_url, args.experiment_out), (url, args.out)):
                subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium'}",
                                f"--screenshot={out}", page], check=True, capture_output=True, timeout=300)
        finally:
            server.stop()
    print(f"{args.out}: the run page of {run.info.run_name} ({url})\n{args.experiment_out}: its experiment")
    return 0


if __name__ == "__main__":
    sys.exit(main())
