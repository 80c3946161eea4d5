# Ferry: every task a developer or CI runs. On a fresh machine `make demo` (the main job) and
# `make test` each install what they need first (a venv in .venv), once.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
REPO   ?= model-repository
PROTOS  = $(shell find protos -name '*.proto' | sort)

STAMP   = $(VENV)/.ferry-installed

.PHONY: install protos check-protos lint format typecheck test test-fast serve demo example-repo bench clean

# torch first, at the exact pin: it is the CPU build that lies on disk. Any looser spec would
# pull gigabytes of CUDA wheels when another package asks for torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(MAKE) --no-print-directory example-repo
	touch $(STAMP)

install:
	rm -f $(STAMP)
	$(MAKE) --no-print-directory $(STAMP)

example-repo:
	$(PY) -m ferry.server.examples --repository $(REPO)

protos:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=client --grpc_python_out=client \
		--pyi_out=client $(PROTOS)

# Fails when the committed generated code differs from what `make protos` would write.
check-protos: $(STAMP)
	$(PY) tests/contracts/check_protos.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy client/ferry server/ferry

test: lint typecheck check-protos
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

serve: $(STAMP)
	$(VENV)/bin/ferry serve --repository $(REPO)

# The main job: server up, the seed model converted (fp32 + dynamic int8) and answering, a load test.
demo: $(STAMP)
	$(PY) examples/demo.py --repository $(REPO)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

bench: $(STAMP)
	$(PY) bench/serving.py
	$(PY) bench/conversion.py
