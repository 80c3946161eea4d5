# Ferry: every task a developer or CI runs. `make install` then `make test` on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
REPO   ?= model-repository
PROTOS  = $(shell find protos -name '*.proto' | sort)

.PHONY: install protos check-protos lint format typecheck test test-fast serve demo example-repo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, at the exact pin: it is the CPU build that lies on disk. Any looser spec would
# pull gigabytes of CUDA wheels when another package asks for torch.
install: $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(MAKE) --no-print-directory example-repo

example-repo:
	$(PY) -m ferry.server.examples --repository $(REPO)

protos:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=client --grpc_python_out=client \
		--pyi_out=client $(PROTOS)

# Fails when the committed generated code differs from what `make protos` would write.
check-protos:
	$(PY) tests/contracts/check_protos.py

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck:
	$(VENV)/bin/mypy client/ferry server/ferry

test: lint typecheck check-protos
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slow"

serve:
	$(VENV)/bin/ferry serve --repository $(REPO)

# The main job: server up, the seed model converted (fp32 + dynamic int8) and answering, a load test.
demo:
	$(PY) examples/demo.py --repository $(REPO)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
