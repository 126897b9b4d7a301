#!/usr/bin/env bash
# The main job: bootstrap what is missing, build in release, provision a CA and credentials into a
# run directory, start a coordinator and a heterogeneous fleet on this machine, fine-tune a
# pretrained model on Fashion-MNIST for a dozen rounds of RBLA, and print what happened: the accuracy
# table, the plots, and the exported adapter and merged model.
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

# The fleet: device id and the LoRA rank it asks for (R_max is 16). The device class is the id's prefix.
fleet=("phone-1:2" "phone-2:2" "laptop-1:4" "laptop-2:4" "desktop-1:8" "gpu-1:16")
rounds="${FLOTILLA_ROUNDS:-12}"
# Label skew across devices: dirichlet:<alpha> (smaller is more skewed), iid or shards:<k>.
partition="${FLOTILLA_PARTITION:-dirichlet:1.0}"

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
rounds = $rounds
min_devices = ${#fleet[@]}
deadline_secs = 120
local_steps = 150
batch_size = 64
learning_rate = 0.005

[aggregation]
method = "rbla"
max_rank = 16
lora_alpha = 32.0

# Test images 5000-9999 are the held-out set; 0-4999 are the public data the base is pretrained on.
[evaluation]
test_data = "$data_dir"
skip_samples = 5000

[model]
seed = 42
[model.pretrain]
data = "$data_dir"
samples = 5000
steps = 100
batch_size = 64
learning_rate = 0.002
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

step "starting the coordinator; it first pretrains the base model on 5,000 public images (logs: $run_dir/logs/coordinator.log)"
"$bin/flotilla-coordinator" serve --config "$run_dir/coordinator.toml" \
    >"$run_dir/summary.txt" 2>"$run_dir/logs/coordinator.log" &
coordinator_pid=$!
pids+=("$coordinator_pid")
for _ in $(seq 1 1200); do
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
        --data "$data_dir" --partition "$partition" --devices "${#fleet[@]}" --device-index "$index" \
        >"$run_dir/logs/$id.out" 2>"$run_dir/logs/$id.log" &
    edge_pids+=("$!")
    pids+=("$!")
    index=$((index + 1))
done

step "federated fine-tuning: $rounds rounds of RBLA on Fashion-MNIST, each device on its own $partition shard"
# Follow the coordinator's round lines as they come.
tail -n +1 -f --pid="$coordinator_pid" "$run_dir/logs/coordinator.log" 2>/dev/null \
    | grep --line-buffered -E "pretrain|\[round [0-9]+(/[0-9]+)?\] (aggregated|test accuracy)" \
    | sed -u -e 's/^.*\(\[round\)/\1/' -e 's/^.*INFO [^ ]*: //' -e 's/ → \/.*//' -e 's/ round=[0-9]*$//' &
follower=$!
status=0
wait "$coordinator_pid" || status=$?
wait "$follower" 2>/dev/null || true
for pid in "${edge_pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
if [ "$status" != 0 ]; then
    echo "quickstart: a process failed (exit $status); logs in $run_dir/logs" >&2
    tail -n 20 "$run_dir"/logs/*.log >&2
    exit "$status"
fi

step "exporting the final global adapter and the merged model"
"$bin/flotilla-coordinator" export --config "$run_dir/coordinator.toml" --out "$run_dir/export" --merged \
    2>>"$run_dir/logs/coordinator.log"

step "results"
cat "$run_dir/summary.txt"
echo
echo "plots:        $run_dir/accuracy.png (.svg), $run_dir/participation.png (.svg)"
echo "per round:    $run_dir/rounds.csv, $run_dir/rounds.json, $run_dir/summary.json"
echo "exported:     $run_dir/export/adapter/ (PEFT), $run_dir/export/model.safetensors (merged)"
echo "run directory: $run_dir (global/round-N/ checkpoints, logs/)"
