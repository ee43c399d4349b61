# Routine tasks. `make test` is what CI runs (via .ci/run).
PY ?= python3

.PHONY: install install-test demo test lint format typecheck bench-loss bench-train device-check docs-defaults mutation clean

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

device-check:       ## on a GPU: the CUDA tests and bench-loss --device cuda (docs/benchmarks.md)
	PYTHON=$(PY) bash tools/device_check.sh

docs-defaults:      ## rewrite the defaults table of docs/methods.md from the registry
	$(PY) docs/update_defaults.py

MUTATION_MODULES = objectives contrast losses _checks diagnostics strategies moco memory_bank checkpoint optim trainer
mutation:           ## mutation testing (slow, not CI): make mutation MODULE=objectives (docs/testing.md)
	$(PY) -m pip install -q "mutmut>=3.8,<4"
	@mkdir -p build/mutation
	@for m in $(or $(MODULE),$(MUTATION_MODULES)); do \
	  echo "== $$m"; rm -rf mutants; \
	  OMP_NUM_THREADS=1 nice -n 19 $(PY) tools/mutation.py $$m run --max-children 2 || exit 1; \
	  $(PY) tools/mutation.py $$m results --all true > build/mutation/$$(echo $$m | tr / _).txt; \
	  awk '{print $$NF}' build/mutation/$$(echo $$m | tr / _).txt | sort | uniq -c; \
	done

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache .mypy_cache runs mutants
