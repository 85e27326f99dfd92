PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .install.stamp

.PHONY: install test demo bench lint clean fuzz sweep-demo

# Re-install only when the project's install files change.
$(STAMP): pyproject.toml constraints.txt
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PYTHON) -m pytest -n 2 tests

demo: install
	bash scripts/demo.sh

bench: install
	$(PYTHON) benchmarks/run_all.py

# >= 1M fuzz inputs on one core (tens of minutes); outcome in docs/bench/fuzz.json, docs/RELIABILITY.md
fuzz: install
	$(PIP) install --quiet --disable-pip-version-check "atheris>=2"
	$(shell command -v taskset >/dev/null && echo taskset -c 0) $(PYTHON) tests/fuzzing/run.py

# LeNet-300-100's degradation curves (weight vs unit pruning) on digits and MNIST-10k -> docs/bench/sweep.md
sweep-demo: install
	$(PYTHON) benchmarks/sweep_demo.py

lint: install
	$(PYTHON) -m compileall -q dcomp tests benchmarks

clean:
	rm -rf $(STAMP) build *.egg-info .pytest_cache demo-out sweep-demo-out
