#!/usr/bin/env bash
# A multi-host field trial on one machine: the coordinator and each device in its own network
# namespace, joined through a bridge by veth links, every device's link capped in both directions by
# a `tbf` qdisc for its class (netem is not available here, tbf is). A real federated run on
# Fashion-MNIST crosses those links. The report (links.txt) shows, per device, how long the base
# model took to arrive (admission), the update's size on the wire, the mean upload time (from
# "uploading" to the coordinator's Ack), and the least time the token bucket allows for that size.
#
#   sudo bash deploy/netns-trial.sh                  # 3 rounds; run directory: runs/netns-<timestamp>
#   FLOTILLA_ROUNDS=2 FLOTILLA_RUN_DIR=/tmp/trial sudo -E bash deploy/netns-trial.sh
#
# Needs root (ip netns, tc) and iproute2. Everything it creates is removed on exit.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ "$(id -u)" != 0 ]; then
    echo "netns-trial: network namespaces and qdiscs need root; run it with sudo" >&2
    exit 1
fi
for tool in ip tc python3; do
    command -v "$tool" >/dev/null || { echo "netns-trial: '$tool' is missing (Debian: apt-get install iproute2 python3)" >&2; exit 1; }
done

# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"
if [ -n "${FLOTILLA_BIN_DIR:-}" ]; then
    bin="$FLOTILLA_BIN_DIR"
else
    cargo build --release --bins --quiet
    bin="$root/target/release"
fi
flotilla_ensure_fashion_mnist
data_dir="${FLOTILLA_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
rounds="${FLOTILLA_ROUNDS:-3}"
run_dir="${FLOTILLA_RUN_DIR:-$root/runs/netns-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$run_dir/logs"
run_dir="$(cd "$run_dir" && pwd)"

# Device: id, class, rank, link rate (each direction), tbf burst. Bursts are small (a few
# packets) so that the small updates of low ranks do not fit in them and go through at line rate;
# 1gbit needs about rate/HZ of burst to reach its rate at all.
fleet=(
    "phone-1 phone 2 1mbit 4kb"
    "phone-2 phone 2 1mbit 4kb"
    "laptop-1 laptop 8 20mbit 16kb"
    "desktop-1 desktop 16 100mbit 64kb"
    "gpu-1 gpu 16 1gbit 1mb"
)
tag="fl$(($$ % 100000))"
switch="$tag-sw"
coordinator_ip=10.77.0.1
port=7443

namespaces=()
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ns in "${namespaces[@]}"; do ip netns delete "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

# One namespace per node, a veth to the switch namespace's bridge; `cap RATE BURST` on both ends.
add_node() {
    local ns="$1" index="$2" address="$3" rate="${4:-}" burst="${5:-}"
    ip netns add "$ns"
    namespaces+=("$ns")
    ip -n "$ns" link set lo up
    ip -n "$switch" link add "v$tag-$index" type veth peer name eth0 netns "$ns"
    ip -n "$switch" link set "v$tag-$index" master br0 up
    ip -n "$ns" addr add "$address/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [ -n "$rate" ]; then
        # Upload: the device's egress. Download: the switch's egress towards the device.
        tc -n "$ns" qdisc add dev eth0 root tbf rate "$rate" burst "$burst" latency 200ms
        tc -n "$switch" qdisc add dev "v$tag-$index" root tbf rate "$rate" burst "$burst" latency 200ms
    fi
}

echo "==> network: a switch namespace, the coordinator and ${#fleet[@]} devices each in its own namespace"
ip netns add "$switch"
namespaces+=("$switch")
ip -n "$switch" link add br0 type bridge
ip -n "$switch" link set br0 up
add_node "$tag-coordinator" 0 "$coordinator_ip"
index=1
for member in "${fleet[@]}"; do
    read -r id class rank rate burst <<<"$member"
    add_node "$tag-$id" "$index" "10.77.0.$((index + 10))" "$rate" "$burst"
    printf '    %-10s %-8s rank %-3s 10.77.0.%-4s link %s each way\n' "$id" "$class" "$rank" "$((index + 10))" "$rate"
    index=$((index + 1))
done

echo "==> provisioning (the coordinator's certificate names $coordinator_ip)"
"$bin/flotilla-certs" --dir "$run_dir/pki" init --name "Flotilla netns trial CA" >/dev/null
"$bin/flotilla-certs" --dir "$run_dir/pki" issue coordinator --name localhost --san "$coordinator_ip" >/dev/null
for member in "${fleet[@]}"; do
    read -r id _ <<<"$member"
    "$bin/flotilla-certs" --dir "$run_dir/pki" issue device --id "$id" >/dev/null
done

cat > "$run_dir/coordinator.toml" <<TOML
[server]
listen = "$coordinator_ip:$port"
run_dir = "$run_dir"
address_file = "$run_dir/coordinator.addr"

[tls]
kit = "$run_dir/pki/kits/coordinator"

[round]
rounds = $rounds
min_devices = ${#fleet[@]}
deadline_secs = 300
local_steps = 50
batch_size = 64
learning_rate = 0.005

[aggregation]
method = "rbla"   # what docs/faults.md measured: each device receives only its slice
max_rank = 16
lora_alpha = 32.0

[evaluation]
test_data = "$data_dir"
skip_samples = 5000
max_samples = 2000

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
hidden = [256, 128]
classes = 10
TOML

echo "==> coordinator in $tag-coordinator on $coordinator_ip:$port"
ip netns exec "$tag-coordinator" "$bin/flotilla-coordinator" serve --config "$run_dir/coordinator.toml" \
    >"$run_dir/summary.txt" 2>"$run_dir/logs/coordinator.log" &
coordinator_pid=$!
pids+=("$coordinator_pid")
for _ in $(seq 1 1200); do
    [ -s "$run_dir/coordinator.addr" ] && break
    kill -0 "$coordinator_pid" 2>/dev/null || { cat "$run_dir/logs/coordinator.log" >&2; exit 1; }
    sleep 0.1
done

echo "==> ${#fleet[@]} devices, each in its namespace, over its capped link"
edge_pids=()
index=0
for member in "${fleet[@]}"; do
    read -r id class rank _ <<<"$member"
    ip netns exec "$tag-$id" "$bin/flotilla-edge" --log-format text run \
        --coordinator "$coordinator_ip:$port" --server-name localhost --kit "$run_dir/pki/kits/$id" \
        --rank "$rank" --device-class "$class" --data "$data_dir" --partition dirichlet:1.0 \
        --devices "${#fleet[@]}" --device-index "$index" \
        >"$run_dir/logs/$id.out" 2>"$run_dir/logs/$id.log" &
    edge_pids+=("$!")
    pids+=("$!")
    index=$((index + 1))
done

status=0
wait "$coordinator_pid" || status=$?
for pid in "${edge_pids[@]}"; do wait "$pid" || status=$?; done
if [ "$status" != 0 ]; then
    echo "netns-trial: a process failed (exit $status); logs in $run_dir/logs" >&2
    tail -n 20 "$run_dir"/logs/*.log >&2
    exit "$status"
fi

echo "==> results"
cat "$run_dir/summary.txt"
fleet_spec="$(printf '%s\n' "${fleet[@]}")"
FLEET="$fleet_spec" RUN_DIR="$run_dir" python3 - <<'PY' | tee "$run_dir/links.txt"
import json, os, re
from datetime import datetime

run_dir = os.environ["RUN_DIR"]
units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}

def rate_bits(text):
    number, unit = re.fullmatch(r"(\d+)([kmg]bit)", text).groups()
    return float(number) * units[unit]

def stamp(line):
    return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

summary = json.load(open(os.path.join(run_dir, "summary.json")))
wire = {}
for round_ in summary["rounds"]:
    for update in round_["updates"]:
        wire.setdefault(update["device"], []).append(update["wire_bytes"])

print(f"{'device':<10} {'class':<8} {'rank':>4} {'link':>7} {'base download':>14} {'update':>8} {'upload':>9} {'tbf minimum':>12}")
for spec in os.environ["FLEET"].splitlines():
    device, klass, rank, rate, burst = spec.split()
    lines = open(os.path.join(run_dir, "logs", device + ".log")).read().splitlines()
    started = next(stamp(l) for l in lines if "starting" in l)
    admitted = next(stamp(l) for l in lines if "admitted by the coordinator" in l)
    uploads, sending = [], None
    for line in lines:
        if "; uploading" in line:
            sending = stamp(line)
        elif "update accepted" in line and sending is not None:
            uploads.append(stamp(line) - sending)
            sending = None
    size = sum(wire[device]) / len(wire[device])
    mean_upload = sum(uploads) / len(uploads)
    # What the token bucket alone allows: the burst at once, the rest at the rate.
    burst_bytes = float(burst[:-2]) * {"kb": 1024, "mb": 1024 * 1024}[burst[-2:]]
    minimum = max(0.0, size - burst_bytes) * 8 / rate_bits(rate)
    print(f"{device:<10} {klass:<8} {rank:>4} {rate:>7} {admitted - started:>12.3f} s {size / 1024:>4.0f} KiB "
          f"{mean_upload:>7.3f} s {minimum:>10.3f} s")
PY
echo "run directory: $run_dir (logs/, links.txt, summary.json)"
