# `make demo` and `make test` are the README's two commands: each installs what it needs first.
PYTHON ?= python3

.PHONY: setup demo test lint

.stamp-setup: pyproject.toml
	bash scripts/setup.sh
	touch $@

setup: .stamp-setup

demo: .stamp-setup
	tpsvit demo

test: .stamp-setup
	$(PYTHON) -m pytest

lint: .stamp-setup
	ruff check src tests benchmarks
