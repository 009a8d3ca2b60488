# Two commands matter: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Use the machine's shared read-only datasets when they sit beside the checkout.
ifeq ($(origin CNNLAB_DATA), undefined)
ifneq ($(wildcard ../shared/datasets/MNIST/raw),)
export CNNLAB_DATA := $(abspath ../shared/datasets)
endif
endif

.PHONY: demo test test-fast install bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[serve,export,explain,timm,pretrained,experiments,notebooks,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/cnnlab train --preset default

test: $(STAMP)
	$(PY) -m pytest -q

# The unit tests only: no real data, subprocesses, torchrun, browser, training runs or fuzz campaigns.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
