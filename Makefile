# Both targets install what is missing first (scripts/setup is idempotent).
.PHONY: setup demo test lint bench
setup:
	bash scripts/setup

demo: setup
	.venv/bin/saebench train configs/tiny.yaml
	.venv/bin/saebench eval runs/tiny
	.venv/bin/saebench analyze runs/tiny
	.venv/bin/saebench train configs/tiny-transcoders.yaml
	.venv/bin/saebench eval runs/tiny-transcoders
	.venv/bin/saebench analyze runs/tiny-transcoders
	@echo "open the app: .venv/bin/saebench app runs/tiny runs/tiny-transcoders"

test: setup lint
	.venv/bin/python -m pytest

lint: setup
	.venv/bin/ruff format --check .
	.venv/bin/ruff check .
	.venv/bin/pyright

bench: setup
	.venv/bin/python benchmarks/harvest.py --memory-tokens 5000000
