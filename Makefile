# The two commands a newcomer runs: `make quickstart` and `make test`.
# Both run the idempotent setup first (project venv with torch + onnxruntime).
.PHONY: setup quickstart test build

setup:
	bash scripts/setup.sh

build: setup
	cargo build --workspace --locked

quickstart: setup
	bash scripts/quickstart.sh

test: setup
	cargo test --workspace --locked
