# Routine tasks. `make test` is what CI runs (via .ci/run).
PY ?= python3

.PHONY: install install-test demo test lint format typecheck bench-loss bench-train docs-defaults mutation clean

install:            ## install the package (torch pinned for our machines)
	$(PY) -m pip install -c constraints.txt -e .

install-test:       ## install with the test extras
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"

demo: install       ## the main job: compare every strategy on mnist1d
	hardneg demo

test: install-test  ## lint + the whole test suite
	ruff check . && $(PY) -m pytest -q

lint:
	ruff check .

format:
	ruff format src tests benchmarks

typecheck:          ## type hints of the public package
	mypy src/hardneg

bench-loss:         ## loss forward+backward time relative to infonce
	$(PY) benchmarks/loss_overhead.py

bench-train:        ## training throughput vs the torchvision + DataLoader pipeline
	$(PY) benchmarks/train_throughput.py

docs-defaults:      ## rewrite the defaults table of docs/methods.md from the registry
	$(PY) docs/update_defaults.py

mutation:           ## mutation testing of trainer/checkpoint/optim/moco/memory bank (slow; see docs/testing.md)
	$(PY) -m pip install -q mutmut
	rm -rf mutants
	OMP_NUM_THREADS=1 mutmut run --max-children 2
	mutmut results --all true > mutants/results.txt; mutmut export-cicd-stats; cat mutants/mutmut-cicd-stats.json

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache runs mutants
