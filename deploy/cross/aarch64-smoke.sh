#!/usr/bin/env bash
# The aarch64 edge client, cross-built on this x86-64 machine, run under qemu-user against an x86-64
# coordinator on loopback: `probe` reports the aarch64 machine, and a real round with mutual TLS
# completes, its update accepted and aggregated (the small MLP, so emulation stays within minutes).
#
#   bash deploy/cross/aarch64-smoke.sh               # packages the aarch64 archive first if missing
#   FLOTILLA_BIN_DIR=target/debug bash deploy/cross/aarch64-smoke.sh   # the coordinator from a debug build
#
# Needs (installed with apt-get when missing and run as root): qemu-user, and the aarch64 C and C++
# runtime (libc6-arm64-cross, libstdc++6-arm64-cross; g++-aarch64-linux-gnu brings both).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
source "$root/deploy/env.sh"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
archive="$root/dist/flotilla-edge-$version-aarch64.tar.gz"
[ -f "$archive" ] || bash "$root/deploy/package-edge.sh" aarch64
sysroot=/usr/aarch64-linux-gnu
if ! command -v qemu-aarch64 >/dev/null 2>&1 || [ ! -e "$sysroot/lib/libstdc++.so.6" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user libc6-arm64-cross libstdc++6-arm64-cross >&2
    else
        echo "aarch64-smoke: need qemu-user, libc6-arm64-cross and libstdc++6-arm64-cross (apt-get install)" >&2
        exit 1
    fi
fi
bin="${FLOTILLA_BIN_DIR:-$root/target/release}"
[ -x "$bin/flotilla-coordinator" ] || cargo build --release --bins --quiet

work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
tar -xzf "$archive" -C "$work"
edge="$work/flotilla-edge-$version-aarch64/bin/flotilla-edge"
# Neoverse N1 (Armv8.2, no SVE): qemu's default `max` CPU has SVE, which the wheel's kernels then
# use and qemu emulates about 10x slower (an MLP step: 406 against 40 ms here).
export FLOTILLA_EDGE_EMULATOR=qemu-aarch64 QEMU_LD_PREFIX="$sysroot" QEMU_CPU="${QEMU_CPU:-neoverse-n1}"
echo "==> $(od -An -j18 -N2 -tu2 "$work/flotilla-edge-$version-aarch64/libexec/flotilla-edge" | tr -d ' ' | sed 's/^183$/an aarch64 (ELF machine 183) client/')"

echo "==> probe under qemu-aarch64"
started=$(date +%s)
"$edge" probe --format json > "$work/probe.json"
python3 - "$work/probe.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
assert report["cpu_arch"] == "aarch64", report["cpu_arch"]
print(f"    machine {report['cpu_arch']}, {report['logical_cores']} cores, rank {report['choice']['rank']} "
      f"({report['choice']['reason']}), step times {report['step_ms']}")
PY
echo "    ($(( $(date +%s) - started )) s)"

echo "==> a round: x86-64 coordinator, the aarch64 device over mutual-TLS QUIC"
"$bin/flotilla-certs" --dir "$work/pki" init >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue coordinator --name localhost >/dev/null
"$bin/flotilla-certs" --dir "$work/pki" issue device --id arm-1 >/dev/null
cat > "$work/c.toml" <<TOML
[server]
listen = "127.0.0.1:0"
run_dir = "$work/run"
address_file = "$work/addr"
[tls]
kit = "$work/pki/kits/coordinator"
[round]
rounds = 1
min_devices = 1
deadline_secs = 1200
local_steps = 20
batch_size = 32
learning_rate = 0.01
[aggregation]
method = "fold-and-fill"
max_rank = 8
lora_alpha = 16.0
[model.architecture.mlp]
input = 32
hidden = [24, 16]
classes = 5
TOML
"$bin/flotilla-coordinator" serve --config "$work/c.toml" >"$work/coordinator.out" 2>"$work/coordinator.log" &
coordinator=$!
for _ in $(seq 1 600); do [ -s "$work/addr" ] && break; sleep 0.1; done
started=$(date +%s)
"$edge" run --coordinator "$(cat "$work/addr")" --server-name localhost --kit "$work/pki/kits/arm-1" \
    --rank 4 --samples 512 2>"$work/edge.log" | tee "$work/edge.out"
wait "$coordinator"
python3 - "$work/run/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
assert summary["rounds_completed"] == 1, summary["rounds_completed"]
update = summary["rounds"][0]["updates"][0]
assert update["device"] == "arm-1" and update["rank"] == 4, update
metrics = update["metrics"]
print(f"    round 1 aggregated the update of {update['device']} at rank {update['rank']}: "
      f"{update['wire_bytes']} bytes, local loss {metrics['loss_before']:.3f} -> {metrics['loss_after']:.3f}, "
      f"{metrics['train_seconds']:.1f} s of emulated training")
PY
echo "    ($(( $(date +%s) - started )) s from start to the run's end)"
echo "aarch64 smoke: passed"
