# One command to set up and run, one to set up and test. See README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build of torch, installed first so nothing pulls a multi-GB CUDA build.
# With a GPU: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" ...
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

## Set up (if needed) and run the unit tests and every notebook (nbmake) on generated tiny data
test: install
	$(PY) -m pytest tests notebooks --nbmake --nbmake-timeout=600 $(ARGS)

lint: install
	$(VENV)/bin/ruff check hybridlib tests tools

clean-venv:
	rm -rf $(VENV)
