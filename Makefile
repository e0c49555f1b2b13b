# make demo   -> set up .venv (first time only) and run the whole pipeline on FactWorld
# make test   -> set up .venv (first time only) and run the test suite
VENV ?= .venv
STAMP := $(VENV)/.rlxf-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup_env.sh
	VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlxf demo $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check rlxf tests benchmarks experiments
	$(VENV)/bin/ruff format --check rlxf tests benchmarks experiments

clean:
	rm -rf runs .pytest_cache
