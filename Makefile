# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test bench clean

venv: $(STAMP)

# torch is pinned by constraints.txt to the CPU build (2.13.0); the package itself stays permissive.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m multifi.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider tests

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
