# The two commands a newcomer runs: `make quickstart` and `make test`.
# Both run the idempotent setup first (project venv with torch + onnxruntime).
.PHONY: setup quickstart test build

setup:
	bash scripts/setup.sh

# Optimized binaries for real work: target/release/geossl-{train,export,serve}.
build: setup
	cargo build --release --workspace --bins --locked

quickstart: setup
	bash scripts/quickstart.sh

# The end-to-end tests drive the binaries, so they are built first. Every test
# binary runs even when one fails (--no-fail-fast): one red test must not hide
# the state of the rest; cargo lists all failures at the end.
test: setup
	cargo build --workspace --bins --locked
	cargo test --workspace --locked --no-fail-fast
