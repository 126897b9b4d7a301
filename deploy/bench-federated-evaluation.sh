#!/usr/bin/env bash
# What federated evaluation costs the main command: the quickstart's task run twice in a row on
# the same build and machine, without [federated_evaluation] (FLOTILLA_FEDERATED_EVALUATION=0) and
# with it; prints each run's wall time, the rounds' time and the bytes down and up, and the ratios.
# docs/benchmarks.md records the last run.
#
#   bash deploy/bench-federated-evaluation.sh        # release binaries (built if missing)
#   FLOTILLA_BIN_DIR=target/debug bash deploy/bench-federated-evaluation.sh
#   FLOTILLA_SECURE_AGGREGATION=1 bash deploy/bench-federated-evaluation.sh   # both runs under
#       [secure_aggregation]: the evaluation's own secure sum between rounds
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bin="${FLOTILLA_BIN_DIR:-$root/target/release}"
if [ ! -x "$bin/flotilla-coordinator" ]; then
    source "$root/deploy/env.sh"
    cargo build --release --bins --quiet
fi
bin="$(cd "$bin" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

quickstart() {
    local name="$1" federated="$2" started
    started="$(date +%s%N)"
    FLOTILLA_BIN_DIR="$bin" FLOTILLA_RUN_DIR="$work/$name" FLOTILLA_FEDERATED_EVALUATION="$federated" \
        FLOTILLA_SECURE_AGGREGATION="${FLOTILLA_SECURE_AGGREGATION:-0}" \
        bash "$root/deploy/quickstart.sh" >"$work/$name.log" 2>&1 || { tail -30 "$work/$name.log" >&2; exit 1; }
    echo $(( ($(date +%s%N) - started) / 1000000 )) >"$work/$name.ms"
}
quickstart without 0
quickstart with 1

python3 - "$work" <<'PY'
import json, sys
work = sys.argv[1]
def run(name):
    summary = json.load(open(f"{work}/{name}/summary.json"))
    rounds = summary["rounds"]
    federated = [r["federated_evaluation"] for r in rounds if r.get("federated_evaluation")]
    return {
        "wall": int(open(f"{work}/{name}.ms").read()) / 1000,
        "rounds": sum(r["round_seconds"] for r in rounds),
        "down": sum(r["task_bytes"] for r in rounds) + sum(f["bytes_down"] for f in federated),
        "up": sum(r["update_bytes"] for r in rounds) + sum(f["bytes_up"] for f in federated),
        "evaluations": len(federated),
        "eval_seconds": [round(f["seconds"], 2) for f in federated],
        "eval_up": sum(f["bytes_up"] for f in federated),
        "eval_down": sum(f["bytes_down"] for f in federated),
        "final": (rounds[-1]["evaluation"] or [{}])[0].get("accuracy"),
        "federated_final": federated[-1]["overall"]["accuracy"] if federated else None,
        "masked": [f.get("masked") for f in federated],
    }
off, on = run("without"), run("with")
print(f"| | without | with federated evaluation | ratio |")
print(f"|---|---|---|---|")
print(f"| quickstart wall time | {off['wall']:.1f} s | {on['wall']:.1f} s | {on['wall'] / off['wall']:.2f} |")
print(f"| rounds (sum of round_seconds) | {off['rounds']:.1f} s | {on['rounds']:.1f} s | {on['rounds'] / off['rounds']:.2f} |")
print(f"| bytes down (round and evaluation tasks) | {off['down'] / 1e6:.2f} MB | {on['down'] / 1e6:.2f} MB | {on['down'] / off['down']:.3f} |")
print(f"| bytes up (updates and reports) | {off['up'] / 1e6:.2f} MB | {on['up'] / 1e6:.4f} MB | {on['up'] / off['up']:.5f} |")
print()
print(f"evaluations: {on['evaluations']}, seconds from request to record: {on['eval_seconds']}; "
      f"evaluation tasks' bytes down {on['eval_down']}, reports (and secure sums' protocol) up {on['eval_up']} bytes in all")
print(f"final central accuracy: without {off['final']}, with {on['final']}; federated {on['federated_final']}")
if any(on["masked"]):
    print(f"secure sums of the evaluations: {on['masked']}")
PY
