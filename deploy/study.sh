#!/usr/bin/env bash
# The study: RBLA against zero-pad, HetLoRA, FlexLoRA, FLoRA and a FedAvg upper bound on
# label-skewed Fashion-MNIST, with a 20-device heterogeneous fleet, through the real coordinator and
# simulator over mutual-TLS QUIC. Rewrites the generated block of docs/study.md and its figures.
#
#   bash deploy/study.sh            # the full grid: 117 runs, about 45 minutes on 2 cores
#   bash deploy/study.sh --quick    # one label skew, one seed, a few rounds: about 2 minutes
#                                   # (writes runs/study-quick/study.md, leaves docs/ alone)
# Finished runs are cached in runs/study*/results/; rerunning only runs what is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"
flotilla_ensure_fashion_mnist
echo "==> building release binaries" >&2
cargo build --release --bins --quiet
exec "$root/target/release/flotilla-study" --bin-dir "$root/target/release" "$@"
