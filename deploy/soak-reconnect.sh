#!/usr/bin/env bash
# Soak: a fleet of simulated devices (default 1,000) reconnecting at once after the coordinator is
# SIGKILLed and restarted. Prints one STORM line: when the coordinator served again, when every
# device was back, the slowest /healthz answer during the storm, the coordinator's peak RSS, and
# how the devices learned of the restart (stateless resets, not idle timeouts). Results: docs/faults.md.
#
#   bash deploy/soak-reconnect.sh [DEVICES] [KEEP_ALIVE_SECS]
set -euo pipefail
cd "$(dirname "$0")/.."
devices="${1:-1000}"
keep_alive="${2:-10}"
source deploy/env.sh
cargo build --workspace --bins
FLOTILLA_STORM_DEVICES="$devices" FLOTILLA_STORM_KEEP_ALIVE_SECS="$keep_alive" \
    cargo test -p flotilla-tests --test reconnect_storm -- --nocapture 2>&1 | grep -E "^STORM|test result|panicked"
