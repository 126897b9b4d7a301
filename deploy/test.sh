#!/usr/bin/env bash
# The whole test suite: bootstraps libtorch if missing, builds every binary (the integration tests
# drive them as real processes), then runs all unit, property and integration tests.
#
#   bash deploy/test.sh              # extra arguments go to `cargo test`, e.g. -- --nocapture
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"

flotilla_ensure_fashion_mnist
echo "==> building (the first build takes about 4 minutes on 2 cores)"
cargo build --workspace --bins --locked
echo "==> testing"
cargo test --workspace --locked "$@"
