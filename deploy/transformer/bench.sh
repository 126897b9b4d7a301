#!/usr/bin/env bash
# The transformer's LoRA training step in Flotilla (tch) against the identical step in PyTorch +
# PEFT, on this machine, interleaved so both see the same conditions; prints each run and the
# ratios (docs/benchmarks.md).
#
#   bash deploy/transformer/bench.sh [RUNS]            # default 2 runs of each; about 2 minutes each
#   bash deploy/transformer/bench.sh --decoder [RUNS]  # SmolLM2-135M, f32 and 4-bit bases: step, memory, generation (about 2.5 minutes each)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"
# shellcheck source=deploy/fetch-text-assets.sh
source "$root/deploy/fetch-text-assets.sh"
if [ "${1:-}" = "--decoder" ]; then
    runs="${2:-2}"
    cargo bench -q -p flotilla-edge --bench decoder_step --no-run 2>/dev/null
    for run in $(seq 1 "$runs"); do
        ours="$(cargo bench -q -p flotilla-edge --bench decoder_step -- --json 2>/dev/null | tail -n 1)"
        ours_q4="$(cargo bench -q -p flotilla-edge --bench decoder_step -- --json --q4 2>/dev/null | tail -n 1)"
        theirs="$(bash deploy/transformer/hf-env.sh python deploy/transformer/bench_decoder.py "$FLOTILLA_SMOLLM2" 2>/dev/null | tail -n 1)"
        python3 - "$run" "$ours" "$ours_q4" "$theirs" <<'PY'
import json, sys
run, theirs = sys.argv[1], json.loads(sys.argv[4])
for label, ours in (("f32 base", json.loads(sys.argv[2])), ("4-bit base, layer by layer", json.loads(sys.argv[3]))):
    print(f"run {run}, {label}: step {ours['step_ms']:.0f} ms (tch) vs {theirs['step_ms']:.0f} ms (PyTorch+PEFT) = "
          f"{ours['step_ms'] / theirs['step_ms']:.3f}x; peak RSS {ours['peak_rss_mib']:.0f} vs "
          f"{theirs['peak_rss_mib']:.0f} MiB = {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x; generation "
          f"{ours['tokens_per_s']:.1f} vs {theirs['tokens_per_s']:.1f} tokens/s = {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x; "
          f"load {ours['load_s']:.2f} vs {theirs['load_s']:.2f} s")
PY
    done
    exit 0
fi
runs="${1:-2}"
cargo bench -q -p flotilla-edge --bench transformer_step --no-run 2>/dev/null
for run in $(seq 1 "$runs"); do
    ours="$(cargo bench -q -p flotilla-edge --bench transformer_step -- --json 2>/dev/null | tail -n 1)"
    theirs="$(bash deploy/transformer/hf-env.sh python deploy/transformer/bench_step.py "$FLOTILLA_MINILM" 2>/dev/null | tail -n 1)"
    python3 - "$run" "$ours" "$theirs" <<'PY'
import json, sys
run, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"run {run}: step {ours['step_ms']:.1f} ms (tch) vs {theirs['step_ms']:.1f} ms (PyTorch+PEFT) = "
      f"{ours['step_ms'] / theirs['step_ms']:.3f}x; peak RSS {ours['peak_rss_mib']:.0f} vs "
      f"{theirs['peak_rss_mib']:.0f} MiB = {ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x; "
      f"evaluation {ours['eval_ms_per_text']:.1f} ms/text; tokenization {ours['tokenized_texts_per_s']:.0f} texts/s")
PY
done
