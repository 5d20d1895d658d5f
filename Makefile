SHELL := /bin/bash
PY := .venv/bin/python
PYTEST_ARGS ?= -q -ra

.DEFAULT_GOAL := help
.PHONY: help setup test test-kernels demo bench lint typecheck clean image

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{ printf "  make %-12s %s\n", $$1, $$2 }'

setup: ## apt packages, mounts, kernel headers, .venv (needs root)
	@bash scripts/setup.sh

# pytest exits 5 when it collected no tests; make that an explicit failure.
test: setup ## run the tests (pass options with PYTEST_ARGS='...', default -q -ra)
	@rc=0; $(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test: FAILED: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

image: setup ## the OCI image localhost/pymap:VERSION (mmdebstrap + podman; Containerfile)
	@bash scripts/image.sh

# Not in .ci/run: it boots kernels under emulation and takes 17 to 30 minutes (docs/kernels.md).
test-kernels: setup ## kernel-facing tests here and in Debian's 6.1 and 6.12 under qemu (KERNELS='host 6.1 6.12')
	@bash scripts/test-kernels.sh

demo: setup ## start a daemon and show its maps
	@bash scripts/demo.sh

bench: setup ## run every bench/bench_*.py in turn
	@shopt -s nullglob; files=(bench/bench_*.py); \
	if [ $${#files[@]} -eq 0 ]; then echo "bench: no bench/bench_*.py files"; fi; \
	for f in "$${files[@]}"; do echo "== $$f"; $(PY) "$$f" || exit $$?; done

lint: ## ruff check (rules pinned in pyproject.toml); fails without .venv (make setup)
	@$(PY) -m ruff check watcher consumers tests bench examples scripts

typecheck: ## mypy on watcher, consumers, tests and bench ([tool.mypy] in pyproject.toml)
	@$(PY) -m mypy

clean: ## remove .venv, .venv-vng and caches
	rm -rf .venv .venv-vng .pytest_cache .ruff_cache build *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
