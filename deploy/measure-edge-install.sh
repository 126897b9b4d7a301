#!/usr/bin/env bash
# Measures an installed edge client (an archive of deploy/package-edge.sh, unpacked): its size on
# disk, its cold start (process start to the coordinator's answer to its Hello) and idle RSS, and
# per device class (phone, laptop, desktop, gpu) the rank its policy picks for all-MiniLM-L6-v2
# and for SmolLM2-135M-Instruct, then one real round at that rank: peak RSS, time per local step,
# bytes down (the round's task) and up (the update). docs/edge.md records the last runs.
#
#   bash deploy/measure-edge-install.sh dist/flotilla-edge-0.1.0-x86_64-cpu
#   FLOTILLA_EDGE_EMULATOR=qemu-aarch64 QEMU_LD_PREFIX=/usr/aarch64-linux-gnu \
#       bash deploy/measure-edge-install.sh dist/flotilla-edge-0.1.0-aarch64      # under emulation
#
# The coordinator and the certificates come from this checkout's build (FLOTILLA_BIN_DIR, default
# target/release, built if missing). Threads: a phone-class device trains on 1 thread, the others
# on 2 (this machine's cores). FLOTILLA_MEASURE_STEPS (default 4) local steps per round;
# FLOTILLA_MEASURE_LENGTH (default 64) tokens per example, FLOTILLA_MEASURE_MINILM_BATCH (default
# 16) and FLOTILLA_MEASURE_DECODER_BATCH (default 4) examples per step (smaller under emulation);
# FLOTILLA_MEASURE_RANKS="phone=1,laptop=16,..." pins each class's rank instead of probing for it
# (under emulation the probe's timed steps take longer than the round);
# FLOTILLA_MEASURE_MINILM=0 skips MiniLM, FLOTILLA_MEASURE_DECODER=0 the decoder (slow under emulation);
# FLOTILLA_MEASURE_CLASSES="phone laptop" measures only those classes (with pinned ranks, laptop,
# desktop and gpu run the same configuration), and FLOTILLA_MEASURE_CLASSES=0 only the size, the
# cold start and the idle memory.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
install="$(cd "${1:?usage: measure-edge-install.sh INSTALL_DIR}" && pwd)"
edge="$install/bin/flotilla-edge"
[ -x "$edge" ] || { echo "measure-edge-install: $edge is not an edge install" >&2; exit 2; }
cd "$root"
source "$root/deploy/env.sh"
source "$root/deploy/fetch-text-assets.sh"
bin="${FLOTILLA_BIN_DIR:-$root/target/release}"
[ -x "$bin/flotilla-coordinator" ] || cargo build --release --bins --quiet
steps="${FLOTILLA_MEASURE_STEPS:-4}"
length="${FLOTILLA_MEASURE_LENGTH:-64}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

mib() { awk -v b="$1" 'BEGIN { printf "%.0f MiB", b / 1048576 }'; }
kib_of() { awk -v f="$2" '$1 == f ":" { print $2 }' "/proc/$1/status" 2>/dev/null || true; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

"$bin/flotilla-certs" --dir "$work/pki" init >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue coordinator --name localhost >/dev/null
for id in cold-1 phone-1 laptop-1 desktop-1 gpu-1; do
    "$bin/flotilla-certs" --dir "$work/pki" issue device --id "$id" >/dev/null
done
minilm_dir="$FLOTILLA_MINILM"
decoder_dir="$(dirname "$FLOTILLA_SMOLLM2")"

# start_coordinator NAME MODEL_TOML STEPS BATCH [MIN_DEVICES]: a one-round run (by default of one
# device); prints its address.
start_coordinator() {
    local run="$work/$1"
    mkdir -p "$run"
    cat > "$run/c.toml" <<TOML
[server]
listen = "127.0.0.1:0"
run_dir = "$run"
address_file = "$run/addr"
[tls]
kit = "$work/pki/kits/coordinator"
[round]
rounds = 1
min_devices = ${5:-1}
deadline_secs = 3600
local_steps = $3
batch_size = $4
learning_rate = 0.001
[aggregation]
method = "fold-and-fill"
max_rank = 16
lora_alpha = 32.0
[model]
seed = 42
$2
TOML
    "$bin/flotilla-coordinator" serve --config "$run/c.toml" >"$run/c.out" 2>"$run/c.log" &
    for _ in $(seq 1 1200); do [ -s "$run/addr" ] && break; sleep 0.1; done
    [ -s "$run/addr" ] || { cat "$run/c.log" >&2; exit 1; }
    cat "$run/addr"
}

echo "install: $install"
echo "size on disk: $(mib "$(du -sb "$install" | cut -f1)") ($(mib "$(du -sb "$install/lib" | cut -f1)") runtime libraries, $(mib "$(stat -c %s "$install/libexec/flotilla-edge")") client)"

# Cold start and idle RSS: an MLP run that waits for a second device, so the first stays idle.
cold=()
for attempt in 1 2 3; do
    address="$(start_coordinator "cold-$attempt" "[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10" 1 32 2)"
    started="$(now_ms)"
    "$edge" run --coordinator "$address" --server-name localhost --kit "$work/pki/kits/cold-1" --rank 4 \
        --samples 256 2>"$work/cold-$attempt/edge.log" >/dev/null &
    pid=$!
    until grep -qs "admitted by the coordinator" "$work/cold-$attempt/edge.log"; do
        kill -0 "$pid" 2>/dev/null || { cat "$work/cold-$attempt/edge.log" >&2; exit 1; }
        sleep 0.01
    done
    cold+=($(( $(now_ms) - started )))
    sleep 1
    idle="$(kib_of "$pid" VmRSS)"
    kill "$pid" 2>/dev/null || true
    kill %1 2>/dev/null || true
    wait 2>/dev/null || true
done
sorted=($(printf '%s\n' "${cold[@]}" | sort -n))
echo "cold start to admission (Hello answered), median of 3: ${sorted[1]} ms (all: ${cold[*]}); idle RSS (MLP, admitted, waiting): $(mib $((idle * 1024)))"

# Per class: one round at the rank the device's policy picks (`--rank auto` with the class's
# budgets); a phone keeps a decoder's base 4-bit.
profile() {
    local model="$1" class="$2" model_toml="$3" batch="$4" model_dir="$5"
    local threads=2 extra=()
    [ "$class" = phone ] && threads=1
    [ "$class" = phone ] && [ "$model" = smollm2 ] && extra=(--decoder-base q4)
    local rank=auto pinned
    pinned="$(echo ",${FLOTILLA_MEASURE_RANKS:-}," | sed -n "s/.*,$class=\([0-9]*\),.*/\1/p")"
    [ -n "$pinned" ] && rank="$pinned"
    local name="$model-$class"
    local address; address="$(start_coordinator "$name" "$model_toml" "$steps" "$batch")"
    "$edge" run --coordinator "$address" --server-name localhost --kit "$work/pki/kits/$class-1" --rank "$rank" \
        --device-class "$class" --threads "$threads" --batch-size "$batch" --max-length "$length" "${extra[@]}" \
        --data bbc-news --partition iid --devices 4 --device-index 0 \
        --model-dir "$model_dir" --cache-dir "$work/cache" 2>"$work/$name/edge.log" >/dev/null &
    local pid=$! peak=0 hwm
    while kill -0 "$pid" 2>/dev/null; do
        hwm="$(kib_of "$pid" VmHWM)"
        [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ] && peak="$hwm"
        sleep 0.05
    done
    wait "$pid" || { tail -5 "$work/$name/edge.log" >&2; return 1; }
    kill %1 2>/dev/null || true
    wait 2>/dev/null || true
    python3 - "$work/$name/summary.json" "$model${extra[*]:+ (4-bit base)}" "$class" "$threads" "$peak" "$steps" <<'PY'
import json, sys
path, model, klass, threads, peak_kib, steps = sys.argv[1:]
last = json.load(open(path))["rounds"][-1]
update = last["updates"][0]
metrics = update["metrics"]
# The optimizer steps alone (a client before protocol 4 reports only the whole training call,
# which includes the local loss before and after on 32 examples).
step_ms = metrics.get("steps_seconds", metrics["train_seconds"]) * 1000 / int(steps)
print(f"| {model} | {klass} | {threads} | {update['rank']} | {int(peak_kib) / 1024:.0f} MiB | {step_ms:.0f} ms | "
      f"{last['task_bytes'] / 1e6:.2f} MB | {last['update_bytes'] / 1e6:.2f} MB |")
PY
}

classes="${FLOTILLA_MEASURE_CLASSES:-phone laptop desktop gpu}"
[ "$classes" = 0 ] && exit 0
echo
echo "| model | class | threads | rank | peak RSS | time per step | down per round | up per round |"
echo "|---|---|---|---|---|---|---|---|"
for class in $classes; do
    [ "${FLOTILLA_MEASURE_MINILM:-1}" = 0 ] && break
    profile minilm "$class" "[model.transformer]
checkpoint = \"$minilm_dir\"
target_modules = [\"query\", \"value\"]
labels = [\"business\", \"entertainment\", \"politics\", \"sports\", \"tech\"]
max_length = $length" "${FLOTILLA_MEASURE_MINILM_BATCH:-16}" "$minilm_dir"
done
if [ "${FLOTILLA_MEASURE_DECODER:-1}" != 0 ]; then
    for class in $classes; do
        profile smollm2 "$class" "[model.decoder]
gguf = \"$FLOTILLA_SMOLLM2\"
target_modules = [\"q_proj\", \"v_proj\"]
labels = [\"business\", \"entertainment\", \"politics\", \"sports\", \"tech\"]
max_length = $length" "${FLOTILLA_MEASURE_DECODER_BATCH:-4}" "$decoder_dir"
    done
fi
