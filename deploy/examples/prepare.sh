#!/usr/bin/env bash
# Prepares what the example configurations in deploy/examples/ refer to, under DIR (default
# runs/example, where the examples point): a CA and the coordinator's kit in DIR/pki (for a
# coordinator reached as localhost, or by --name), and DIR/assets/ linking the verified assets
# (all-MiniLM-L6-v2, SmolLM2-135M-Instruct and BBC News from the cache, fetched if missing; Fashion-MNIST from Debian's
# package). Nothing is overwritten: a PKI already there is kept.
#
#   bash deploy/examples/prepare.sh                 # then, from the repository root:
#   target/release/flotilla-coordinator check --config deploy/examples/minilm.toml
#   bash deploy/examples/prepare.sh DIR [text] [smollm2] [fashion-mnist]   # only these assets
#
# FLOTILLA_BIN_DIR: where flotilla-certs is (default: target/release, built if missing).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
dir="${1:-runs/example}"
shift || true
tasks=("$@")
[ "${#tasks[@]}" -gt 0 ] || tasks=(text smollm2 fashion-mnist)
# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"

bin="${FLOTILLA_BIN_DIR:-$root/target/release}"
if [ ! -x "$bin/flotilla-certs" ]; then
    (cd "$root" && cargo build --release --bins --quiet)
fi

mkdir -p "$dir/assets"
if [ ! -e "$dir/pki/ca.crt" ]; then
    "$bin/flotilla-certs" --dir "$dir/pki" init --name "Flotilla example CA" >/dev/null
    "$bin/flotilla-certs" --dir "$dir/pki" issue coordinator --name "${FLOTILLA_COORDINATOR_NAME:-localhost}" \
        --loopback >/dev/null
    echo "prepare: a CA and the coordinator's kit in $dir/pki"
fi
for task in "${tasks[@]}"; do
    case "$task" in
    text)
        # shellcheck source=deploy/fetch-text-assets.sh
        source "$root/deploy/fetch-text-assets.sh"
        ln -sfn "$FLOTILLA_MINILM" "$dir/assets/all-MiniLM-L6-v2"
        ln -sfn "$FLOTILLA_BBC_NEWS" "$dir/assets/bbc-news"
        ;;
    smollm2)
        # shellcheck source=deploy/fetch-text-assets.sh
        source "$root/deploy/fetch-text-assets.sh"
        ln -sfn "$(dirname "$FLOTILLA_SMOLLM2")" "$dir/assets/SmolLM2-135M-Instruct"
        ln -sfn "$FLOTILLA_BBC_NEWS" "$dir/assets/bbc-news"
        ;;
    fashion-mnist)
        flotilla_ensure_fashion_mnist
        ln -sfn "${FLOTILLA_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}" "$dir/assets/fashion-mnist"
        ;;
    *)
        echo "prepare: unknown task '$task': expected text, smollm2 or fashion-mnist" >&2
        exit 1
        ;;
    esac
done
echo "prepare: assets linked in $dir/assets: $(ls "$dir/assets" | tr '\n' ' ')"
