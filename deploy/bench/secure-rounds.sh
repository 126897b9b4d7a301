#!/usr/bin/env bash
# Secure aggregation's round overhead through the real system: one coordinator and one
# `flotilla-edge sim` process of N devices (their own certificates and QUIC connections), the same
# rounds with and without [secure_aggregation], alternating plain and secure runs. Prints one line
# per run (mean seconds per round after the first, bytes a device uploads per round: the update
# and, under secure aggregation, its keys, shares and unmasking shares) and the secure / plain ratios. Results: docs/benchmarks.md.
#
#   bash deploy/bench/secure-rounds.sh [DEVICES] [ADAPTER] [REPEATS]
#
# ADAPTER: `small` (an MLP 64-32-10 at R_max 8) or `minilm` (an MLP of 12 layers 384 wide: its
# rank-8 adapter has the size of MiniLM's on query and value of 6 layers, 12 modules of 384 × 384).
# Devices are at ranks 2, 4 and 8 in equal shares.
set -euo pipefail
cd "$(dirname "$0")/../.."
devices="${1:-100}"
adapter="${2:-small}"
repeats="${3:-2}"
source deploy/env.sh
cargo build --release --bins --quiet
bin="$PWD/target/release"
work="$(mktemp -d /tmp/flotilla-secure-bench.XXXXXX)"
trap 'rm -rf "$work"' EXIT

case "$adapter" in
    small) model='[model.architecture.mlp]
input = 64
hidden = [32]
classes = 10' ;;
    minilm) model='[model.architecture.mlp]
input = 384
hidden = [384, 384, 384, 384, 384, 384, 384, 384, 384, 384, 384]
classes = 5' ;;
    *) echo "ADAPTER is small or minilm" >&2; exit 2 ;;
esac

certs() { "$bin/flotilla-certs" --dir "$work/pki" "$@" > /dev/null; }
certs init --name "Flotilla benchmark CA"
certs issue coordinator --name localhost
certs issue devices --prefix device --count "$devices"

run() { # run NAME SECURE
    local name="$1" secure="$2" dir="$work/$1"
    mkdir -p "$dir"
    {
        cat <<EOF
[server]
listen = "127.0.0.1:0"
run_dir = "$dir"
address_file = "$dir/addr"
[tls]
kit = "$work/pki/kits/coordinator"
[round]
rounds = 4
min_devices = $devices
deadline_secs = 600
local_steps = 5
batch_size = 32
learning_rate = 0.01
[aggregation]
method = "rbla"
max_rank = 8
$model
EOF
        if [ "$secure" = 1 ]; then
            printf '[secure_aggregation]\nmax_participants = %s\nmax_samples = 64\n' "$devices"
        fi
    } > "$dir/c.toml"
    "$bin/flotilla-coordinator" serve --config "$dir/c.toml" > "$dir/summary.txt" 2> "$dir/coordinator.log" &
    local coordinator=$!
    for _ in $(seq 300); do [ -s "$dir/addr" ] && break; sleep 0.1; done
    "$bin/flotilla-edge" sim --coordinator "$(cat "$dir/addr")" --kits "$work/pki/kits" --clients "$devices" \
        --concurrency 2 --threads 1 --samples 64 --profile-mix "phone:2=1,laptop:4=1,desktop:8=1" \
        > /dev/null 2> "$dir/sim.log" &
    local sim=$!
    wait "$coordinator" || { echo "coordinator failed:"; tail "$dir/coordinator.log"; exit 1; }
    wait "$sim" || true
    python3 - "$dir/summary.json" "$name" "$devices" <<'EOF'
import json, sys
summary = json.load(open(sys.argv[1]))
rounds = summary["rounds"][1:]  # the first round also pays for the devices' start
seconds = sum(r["round_seconds"] for r in rounds) / len(rounds)
up = sum(r["update_bytes"] for r in rounds) / len(rounds) / int(sys.argv[3])
secure = [r.get("secure") or {} for r in rounds]
unmask = sum(s.get("unmask_seconds", 0.0) for s in secure) / len(rounds)
protocol = sum(s.get("protocol_bytes", 0) for s in secure) / len(rounds) / int(sys.argv[3])
print(f"{sys.argv[2]}: {seconds:.2f} s per round, {up + protocol:.0f} bytes up per device "
      f"({up:.0f} update + {protocol:.0f} protocol), unmasking {unmask:.2f} s")
EOF
}

for i in $(seq "$repeats"); do
    run "plain-$i" 0
    run "secure-$i" 1
done | tee "$work/results.txt"
python3 - "$work/results.txt" "$devices" "$adapter" <<'EOF'
import re, sys
lines = open(sys.argv[1]).read().splitlines()
def mean(kind, index):
    values = [float(re.findall(r"[\d.]+", l.split(":", 1)[1])[index]) for l in lines if l.startswith(kind)]
    return sum(values) / len(values)
print(f"{sys.argv[2]} devices, {sys.argv[3]} adapter: round time secure / plain = "
      f"{mean('secure', 0) / mean('plain', 0):.2f}, update bytes secure / plain = {mean('secure', 1) / mean('plain', 1):.3f}")
EOF
