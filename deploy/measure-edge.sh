#!/usr/bin/env bash
# Measures the edge client: binary size (as built and stripped), resident memory while idle
# (admitted, waiting for a round) and at its peak while training, for the MLP and the CNN on a
# Fashion-MNIST shard. Results go to stdout; docs/edge.md records the last run.
#
#   bash deploy/measure-edge.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
source "$root/deploy/env.sh"
cargo build --release --bins --quiet
bin="$root/target/release"
flotilla_ensure_fashion_mnist
data_dir="${FLOTILLA_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

strip -o "$work/edge-stripped" "$bin/flotilla-edge"
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "flotilla-edge: $(mib "$(stat -c %s "$bin/flotilla-edge")") as built (with line tables), $(mib "$(stat -c %s "$work/edge-stripped")") stripped"
echo "(plus libtorch's shared libraries: $(du -sh "$LIBTORCH/lib" | cut -f1) in the PyPI wheel, CUDA included)"

"$bin/flotilla-certs" --dir "$work/pki" init >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue coordinator --name localhost >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue device --id probe-1 >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue device --id late-1 >/dev/null

kib_of() { awk -v f="$2" '$1 == f ":" { print $2 }' "/proc/$1/status"; }

measure() {
    local name="$1" architecture="$2"
    local run="$work/$name"
    mkdir -p "$run"
    cat > "$run/c.toml" <<TOML
[server]
listen = "127.0.0.1:0"
run_dir = "$run"
address_file = "$run/addr"
[tls]
kit = "$work/pki/kits/coordinator"
[round]
rounds = 3
min_devices = 2
local_steps = 100
batch_size = 32
[aggregation]
method = "rbla"   # what docs/edge.md measured with; the step cost does not depend on it
max_rank = 16
$architecture
TOML
    "$bin/flotilla-coordinator" serve --config "$run/c.toml" >"$run/c.out" 2>"$run/c.log" &
    for _ in $(seq 1 600); do [ -s "$run/addr" ] && break; sleep 0.1; done
    local address; address="$(cat "$run/addr")"
    "$bin/flotilla-edge" run --coordinator "$address" --rank 16 --kit "$work/pki/kits/probe-1" \
        --data "$data_dir" --partition dirichlet:1.0 --devices 2 --device-index 0 2>"$run/edge.log" >/dev/null &
    local edge=$!
    for _ in $(seq 1 600); do grep -q "admitted by the coordinator" "$run/edge.log" && break; sleep 0.1; done
    sleep 1
    local idle; idle="$(kib_of "$edge" VmRSS)"
    # The second device lets the rounds start; sample the peak just before the run ends.
    "$bin/flotilla-edge" run --coordinator "$address" --rank 2 --kit "$work/pki/kits/late-1" \
        --data "$data_dir" --partition dirichlet:1.0 --devices 2 --device-index 1 2>/dev/null >/dev/null &
    local peak=0
    while kill -0 "$edge" 2>/dev/null; do
        local hwm; hwm="$(kib_of "$edge" VmHWM 2>/dev/null || echo 0)"
        [ -n "$hwm" ] && [ "$hwm" -gt "$peak" ] && peak="$hwm"
        sleep 0.05
    done
    wait || true
    echo "$name: idle (admitted, data loaded, waiting) $(mib $((idle * 1024))) RSS; training peak $(mib $((peak * 1024))) RSS"
}

measure "mlp 784-128-64-10, rank 16" "[model.architecture.mlp]
input = 784
hidden = [128, 64]
classes = 10"
measure "cnn 28x28 conv 16,32 fc 128, rank 16" "[model.architecture.cnn]
side = 28
channels = 1
conv = [16, 32]
hidden = 128
classes = 10"
