# One command to set up and run, one to set up and test. See README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Everything goes into $(VENV)/ (created if missing). torch is installed first, from TORCH_SPEC; then
# hybridlib with its test extras, which then leaves that torch in place.
# torch==2.13.0 from plain PyPI on Linux is the CUDA build: several GB, and it runs on a CPU too.
# Where pip is configured with a local wheel mirror or a CPU wheel (pip.conf, PIP_FIND_LINKS), pip takes that.
# CPU-only build:  make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" run
# TORCH_SPEC counts only when $(VENV)/ is set up: to switch builds, make clean-venv first.
TORCH_SPEC ?= torch==2.13.0
PARAMS ?= params/ag_news.yaml
ARGS   ?=

.PHONY: install run test lint clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (hybridlib)" >/dev/null
	touch $@

install: $(VENV)/.installed

## Set up (if needed) and run the papermill pipeline on $(PARAMS); extra flags in ARGS="-p epochs 1 ..."
run: install
	$(VENV)/bin/hybridlib run $(PARAMS) $(ARGS)

## Set up (if needed) and run the unit tests and every notebook (nbmake) on generated tiny data,
## one pytest-xdist worker per core (at most 4)
test: install
	$(PY) -m pytest tests notebooks --nbmake --nbmake-timeout=600 -n auto --maxprocesses 4 $(ARGS)

lint: install
	$(VENV)/bin/ruff check hybridlib tests benchmarks conftest.py

clean-venv:
	rm -rf $(VENV)
