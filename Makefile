# Every target is idempotent: `setup` (re)builds .venv only when a requirements file or pyproject.toml changed.
PY      := .venv/bin/python
STAMP   := .venv/.installed
REQS    := requirements.txt requirements-base.txt requirements-gpu.txt requirements-torchrec.txt requirements-spark.txt pyproject.toml
DEMO    ?= prepared/synthetic
ARGS    ?=
TESTS   ?= tests

.PHONY: setup demo ui serve recommend lint test test-unit docs ui-screenshot bench-loader bench-quality bench-train-step bench-sequence-step bench-evaluation bench-serving bench-short-history bench-faults bench-prepare clean

setup: $(STAMP)

$(STAMP): $(REQS)
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q -r requirements-gpu.txt; \
	else \
		$(PY) -m pip install -q -r requirements.txt; \
	fi
	$(PY) -m pip install -q --no-deps -r requirements-torchrec.txt
	$(PY) -m pip install -q -r requirements-spark.txt  # the project's [spark] extra, for the Spark tests
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torchrec, fbgemm_gpu, pyarrow, mlflow, torchx, faiss, trainer, serving"
	touch $(STAMP)

demo: setup
	$(PY) -m data.prepare synthetic --out $(DEMO) --overwrite
	$(PY) -m trainer --config configs/synthetic.yaml data.path=$(DEMO) $(ARGS)

# After `make demo`: the MLflow UI, the registered model over REST, and top-K from the newest export. Each runs as
# printed from a shell without the venv activated (mlflow models serve starts uvicorn from PATH).
TRACKING_URI ?= sqlite:///mlflow.db
UI_PORT ?= 5000
SERVE_PORT ?= 5001
MODEL   ?= models:/two-tower-demo/latest
RUN     ?= $(shell ls -td exports/*/ 2>/dev/null | head -1)
HISTORY ?=
K       ?= 20

ui: setup
	.venv/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --port $(UI_PORT)

serve: setup
	PATH="$(CURDIR)/.venv/bin:$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) .venv/bin/mlflow models serve -m $(MODEL) \
		--env-manager local --port $(SERVE_PORT)

recommend: setup
	test -n "$(RUN)" || { echo "error: no export under exports/: run make demo, or pass RUN=<export dir>" >&2; exit 2; }
	$(PY) -m serving.recommend --run $(RUN) --history "$(HISTORY)" -k $(K)

lint: setup
	$(PY) -m ruff check .

# The benchmark tables in README.md and docs/ from bench/results/*.json (tests/architecture/test_docs.py fails on a stale page).
docs: setup
	$(PY) -m bench.tables --write

test: lint
	$(PY) -m pytest $(TESTS) -q -ra --durations=25

# The unit tests only (tests/<package>/, a few minutes): no end-to-end test under tests/e2e/.
test-unit: lint
	$(PY) -m pytest $(TESTS) -q -ra -m "not e2e"

# The MLflow run page in headless Chromium (Debian's package), into docs/.
ui-screenshot: setup
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium
	$(PY) -m docs.ui_screenshot

bench-faults: setup
	$(PY) -m bench.faults

bench-prepare: setup  # the embedded engine, Spark and the pandas path before them, at 10^6 to 10^8 events
	$(PY) -m bench.prepare

bench-loader: setup
	$(PY) -m bench.loader

bench-quality: setup
	$(PY) -m bench.quality

bench-train-step: setup
	$(PY) -m bench.train_step

bench-sequence-step: setup  # the sequence towers' steps; with the ML-1M epochs end to end and a profile
	$(PY) -m bench.sequence_step --epoch prepared/ml-1m --profile

bench-evaluation: setup  # one validation pass of each sequence tower, queries in file order and by length
	$(PY) -m bench.evaluation --prepared prepared/ml-1m

bench-short-history: setup  # bags and both transformer recipes on short histories, 3 seeds (about an hour a dataset)
	$(PY) -m bench.short_history

bench-serving: setup  # EXPORTS="bags=exports/<run id> transformer=exports/<run id>"
	$(PY) -m bench.serving_latency --export $(EXPORTS)

clean:
	rm -rf .venv prepared
