# Front door: `make study` runs the main job, `make test` runs the tests. Each installs first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKDIR ?= workdir/study
# python with oneTBB's caching malloc preloaded (alignment_gap/allocator.py; `main` re-executes
# itself the same way): XLA:CPU's per-step temporaries stop page-faulting.
RUN := $(BIN)/python -m alignment_gap.allocator

.PHONY: install test test-fast lint study hypotheses paper bench clean

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(RUN) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=12 tests

# Unit tests only (no trainer processes, studies, notebooks, TPU compiles or tests marked slow):
# a quick check while editing. `make test` (CI) runs everything.
SLOW_TESTS := aot console faults multihost multiprocess notebooks packaging pretrained \
	pretrained_notebook pretrained_runs pretrained_study stacked study sweep trainers
test-fast: install
	$(RUN) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow" tests \
		$(SLOW_TESTS:%=--ignore=tests/test_%.py)

lint: install
	$(BIN)/ruff check .

study: install
	$(BIN)/python -m alignment_gap.main --config configs/study.py:mini --workdir $(WORKDIR)

# The paper's five hypotheses as study variants, in the same workdir (reuses its upstream stages
# and its online and offline runs of seeds 0 and 1).
hypotheses: install
	$(BIN)/python -m alignment_gap.main --config configs/study.py:hypotheses --workdir $(WORKDIR)

# The full protocol (5 seeds, the offline grid, curves to a turn beyond noise, 1,024 test prompts).
paper: install
	$(BIN)/python -m alignment_gap.main --config configs/study.py:paper --workdir workdir/paper

bench: install
	$(RUN) bench/foundation.py

clean:
	rm -rf $(VENV) workdir
