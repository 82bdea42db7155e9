# Set-up and the two commands of the README, for a fresh machine:
#   make train   creates .venv, installs CPU torch + reste, gets Fashion-MNIST, runs the main job
#   make test    the same set-up, then the test suite (what .ci/run runs); the onnx extra is
#                installed so the ONNX export is tested against onnxruntime
#   make lint    the same set-up plus the lint extra (mypy, ruff), then the linters (.ci/run runs it first)
# Variables: PYTHON (the interpreter for the venv), TORCH (the torch requirement, pinned to the
# CPU build by default), PIP_ARGS (e.g. --index-url for torch's CPU wheels), ARGS (for reste train).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_ARGS ?=
ARGS ?=

BIN := $(VENV)/bin
# reinstall (rebuilding the C kernels) when the package description or a C source changes
STAMP := $(VENV)/.reste-installed
SOURCES := pyproject.toml setup.py $(wildcard src/reste/csrc/*.c src/reste/deploy/csrc/*.c src/reste/deploy/csrc/*.h)

.PHONY: setup data train test test-slow lint

setup: $(STAMP) data

$(STAMP): $(SOURCES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "error: '$(PYTHON) -m venv' failed; on Debian/Ubuntu: apt-get install python3-venv" >&2; exit 2; }
	@# torch first and pinned: a package asking for plain 'torch' must find it installed, not pull a CUDA build
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_ARGS) "$(TORCH)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[test,onnx]"
	@touch $@

# Fashion-MNIST, the default data set: already there, or Debian's package (root with apt-get),
# or the official files (md5-checked) into the per-user folder ~/.cache/reste/data.
data: $(STAMP)
	@if $(BIN)/python -c "import reste.data as d; d.locate('fashion_mnist')" 2>/dev/null; then \
	    echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	     { export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	       { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }; }; then \
	    echo "Fashion-MNIST: installed the Debian package dataset-fashion-mnist"; \
	else \
	    $(BIN)/reste download fashion_mnist; \
	fi

train: setup
	$(BIN)/reste train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# the type check ([tool.mypy] in pyproject.toml: src/reste); no data set needed
LINT_STAMP := $(VENV)/.reste-lint-installed
$(LINT_STAMP): $(STAMP)
	$(BIN)/pip install -q --disable-pip-version-check -e ".[lint]"
	@touch $@

lint: $(LINT_STAMP)
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
