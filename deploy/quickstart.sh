#!/usr/bin/env bash
# The main job: bootstrap what is missing, build in release, provision a CA and credentials into a
# run directory, start a coordinator and a heterogeneous fleet on this machine, run a federated
# fine-tuning, and print what happened.
#
#   bash deploy/quickstart.sh                # run directory: runs/quickstart-<timestamp>
#   FLOTILLA_RUN_DIR=/tmp/demo bash deploy/quickstart.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"

step() { printf '\n==> %s\n' "$*"; }

# FLOTILLA_BIN_DIR: use binaries already built there instead of building release ones (the test
# suite runs this script against its debug build).
if [ -n "${FLOTILLA_BIN_DIR:-}" ]; then
    bin="$FLOTILLA_BIN_DIR"
else
    step "building release binaries (the first build takes about 5 minutes on 2 cores)"
    cargo build --release --bins --quiet
    bin="$root/target/release"
fi

run_dir="${FLOTILLA_RUN_DIR:-$root/runs/quickstart-$(date +%Y%m%d-%H%M%S)}"
if [ -e "$run_dir/pki" ]; then
    echo "quickstart: $run_dir already holds a run; choose another FLOTILLA_RUN_DIR" >&2
    exit 1
fi
mkdir -p "$run_dir/logs"
run_dir="$(cd "$run_dir" && pwd)"

# The fleet: device id and the LoRA rank it asks for (R_max is 8).
fleet=("phone-1:2" "laptop-1:4" "desktop-1:8")

# Real data: Fashion-MNIST, each device holding its own label-skewed shard (Dirichlet α = 0.5).
flotilla_ensure_fashion_mnist
data_dir="${FLOTILLA_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"

step "provisioning a CA and credentials in $run_dir/pki"
"$bin/flotilla-certs" --dir "$run_dir/pki" init --name "Flotilla quickstart CA" >/dev/null
"$bin/flotilla-certs" --dir "$run_dir/pki" issue coordinator --name localhost >/dev/null
for member in "${fleet[@]}"; do
    "$bin/flotilla-certs" --dir "$run_dir/pki" issue device --id "${member%%:*}" >/dev/null
done
"$bin/flotilla-certs" --dir "$run_dir/pki" list

cat > "$run_dir/coordinator.toml" <<TOML
[server]
listen = "127.0.0.1:0"
run_dir = "$run_dir"
address_file = "$run_dir/coordinator.addr"

[tls]
kit = "$run_dir/pki/kits/coordinator"

[round]
rounds = 3
min_devices = ${#fleet[@]}
deadline_secs = 120
local_steps = 60
batch_size = 32
learning_rate = 0.005

[aggregation]
method = "rbla"
max_rank = 8
lora_alpha = 16.0

[evaluation]
test_data = "$data_dir"

[model]
seed = 42
[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10
TOML

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

step "starting the coordinator (logs: $run_dir/logs/coordinator.log)"
"$bin/flotilla-coordinator" serve --config "$run_dir/coordinator.toml" \
    >"$run_dir/summary.txt" 2>"$run_dir/logs/coordinator.log" &
coordinator_pid=$!
pids+=("$coordinator_pid")
for _ in $(seq 1 100); do
    [ -s "$run_dir/coordinator.addr" ] && break
    kill -0 "$coordinator_pid" 2>/dev/null || { cat "$run_dir/logs/coordinator.log" >&2; exit 1; }
    sleep 0.1
done
address="$(cat "$run_dir/coordinator.addr")"
echo "coordinator listening on $address"

step "starting ${#fleet[@]} edge clients: ${fleet[*]}"
edge_pids=()
index=0
for member in "${fleet[@]}"; do
    id="${member%%:*}" rank="${member##*:}"
    "$bin/flotilla-edge" run --coordinator "$address" --server-name localhost \
        --kit "$run_dir/pki/kits/$id" --rank "$rank" --device-class "${id%%-*}" \
        --data "$data_dir" --partition dirichlet:0.5 --devices "${#fleet[@]}" --device-index "$index" \
        >"$run_dir/logs/$id.out" 2>"$run_dir/logs/$id.log" &
    edge_pids+=("$!")
    pids+=("$!")
    index=$((index + 1))
done

step "federated fine-tuning on Fashion-MNIST in progress (each device: its own Dirichlet(0.5) shard)"
status=0
wait "$coordinator_pid" || status=$?
for pid in "${edge_pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
if [ "$status" != 0 ]; then
    echo "quickstart: a process failed (exit $status); logs in $run_dir/logs" >&2
    tail -n 20 "$run_dir"/logs/*.log >&2
    exit "$status"
fi

step "results"
grep -h "aggregated" "$run_dir/logs/coordinator.log" | sed 's/^.*\[round/[round/' || true
cat "$run_dir/summary.txt"
echo
echo "run directory: $run_dir (summary.json, global/round-N/, logs/)"
