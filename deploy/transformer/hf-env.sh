#!/usr/bin/env bash
# Runs a command with Python, HF transformers, PEFT and tokenizers available, for the reference
# scripts in this directory (parity fixtures, PEFT interop, PyTorch benchmarks). Never used by the
# build, the tests or a run: those need no Python.
#
#   bash deploy/transformer/hf-env.sh python deploy/transformer/hf_reference.py tiny
#
# The PyTorch is the torch==2.11.0 of the libtorch cache (deploy/bootstrap-libtorch.sh); the rest
# goes into its own virtualenv in the cache, made on first use (about 100 MB from PyPI).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=deploy/bootstrap-libtorch.sh
source "$root/deploy/bootstrap-libtorch.sh" >/dev/null
cache_root="${FLOTILLA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
torch_python="$cache_root/libtorch-2.11.0/venv/bin/python"
venv="$cache_root/hf-tools-venv"
if [ ! -f "$venv/.complete" ]; then
    echo "hf-env: creating $venv (transformers, peft, tokenizers, numpy)" >&2
    python3 -m venv "$venv"
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    torch_site="$("$torch_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$torch_site" > "$site/flotilla-torch.pth"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "transformers>=4.40" "peft>=0.11" tokenizers numpy safetensors
    touch "$venv/.complete"
fi
cmd="$1"
shift
if [ "$cmd" = python ]; then cmd="$venv/bin/python"; fi
exec "$cmd" "$@"
