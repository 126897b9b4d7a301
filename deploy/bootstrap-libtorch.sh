#!/usr/bin/env bash
# Installs libtorch 2.11.0 (from PyPI's torch==2.11.0 wheel, into a virtualenv) into a per-user cache
# outside the checkout, keyed by version. A no-op when it is already there.
#
#   bash deploy/bootstrap-libtorch.sh            # install if missing, print the environment to use
#   source deploy/bootstrap-libtorch.sh          # same, and export LIBTORCH etc. into this shell
#
# Environment:
#   FLOTILLA_CACHE   cache root (default: ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla)
#   LIBTORCH         if set and pointing at a libtorch 2.11.0, it is used as is (nothing is installed)

FLOTILLA_TORCH_VERSION="2.11.0"

flotilla_bootstrap_libtorch() {
    local version="$FLOTILLA_TORCH_VERSION"
    local cache_root="${FLOTILLA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
    local prefix="$cache_root/libtorch-$version"
    local marker="$prefix/.complete"

    if [ -n "${LIBTORCH:-}" ] && [ -z "${FLOTILLA_LIBTORCH_FROM_CACHE:-}" ]; then
        if flotilla_check_libtorch "$LIBTORCH" "$version"; then
            flotilla_export_libtorch "$LIBTORCH"
            return 0
        fi
        echo "bootstrap-libtorch: LIBTORCH=$LIBTORCH is not a libtorch $version; unset it to use the cache" >&2
        return 1
    fi

    if [ ! -f "$marker" ]; then
        echo "bootstrap-libtorch: libtorch $version not found in $prefix; installing torch==$version from PyPI (about 3.5 GB, a few minutes)" >&2
        flotilla_install_libtorch "$prefix" "$version" || return 1
    fi

    local torch_dir
    torch_dir="$(cat "$marker")"
    if ! flotilla_check_libtorch "$torch_dir" "$version"; then
        echo "bootstrap-libtorch: cached install at $prefix is broken; remove it and run again" >&2
        return 1
    fi
    FLOTILLA_LIBTORCH_FROM_CACHE=1
    export FLOTILLA_LIBTORCH_FROM_CACHE
    flotilla_export_libtorch "$torch_dir"
}

flotilla_find_python() {
    local candidate
    for candidate in python3.12 python3.11 python3 ; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

flotilla_install_libtorch() {
    local prefix="$1" version="$2" python
    if ! python="$(flotilla_find_python)"; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "bootstrap-libtorch: installing python3-venv with apt-get" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >&2 || return 1
            python="$(flotilla_find_python)" || return 1
        else
            echo "bootstrap-libtorch: need python3 with the venv module (Debian: sudo apt-get install python3-venv)" >&2
            return 1
        fi
    fi
    local staging="$prefix.partial"
    rm -rf "$staging"
    mkdir -p "$(dirname "$prefix")" || return 1
    "$python" -m venv "$staging/venv" >&2 || return 1
    "$staging/venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
        "torch==$version" >&2 || { echo "bootstrap-libtorch: pip install torch==$version failed" >&2; return 1; }
    local site
    site="$("$staging/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || return 1
    # The venv is used where it was created: move the staging dir into place, then fix the paths.
    rm -rf "$prefix"
    mv "$staging" "$prefix" || return 1
    site="${site/$staging/$prefix}"
    # Scripts inside the venv hard-code the staging path; libtorch itself does not care, but keep
    # the venv usable for the Python comparison benchmarks.
    grep -rlI --null "$staging" "$prefix/venv/bin" 2>/dev/null | xargs -0 -r sed -i "s#$staging#$prefix#g"
    echo "$site/torch" > "$prefix/.complete.tmp" && mv "$prefix/.complete.tmp" "$prefix/.complete"
}

flotilla_check_libtorch() {
    local dir="$1" version="$2"
    [ -f "$dir/lib/libtorch_cpu.so" ] || return 1
    [ -d "$dir/include/torch" ] || return 1
    # build-version is what the torch wheel records, e.g. "2.11.0+cu130".
    local found=""
    if [ -f "$dir/version.py" ]; then
        found="$(sed -n "s/^__version__ = '\([^']*\)'.*/\1/p" "$dir/version.py")"
    elif [ -f "$dir/build-version" ]; then
        found="$(cat "$dir/build-version")"
    fi
    case "$found" in
        "$version"|"$version"+*) return 0 ;;
        *) echo "bootstrap-libtorch: $dir holds libtorch '${found:-unknown}', need $version" >&2; return 1 ;;
    esac
}

flotilla_export_libtorch() {
    LIBTORCH="$1"
    LIBTORCH_BYPASS_VERSION_CHECK=""
    export LIBTORCH
    unset LIBTORCH_BYPASS_VERSION_CHECK
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    flotilla_bootstrap_libtorch
    echo "export LIBTORCH=$LIBTORCH"
else
    flotilla_bootstrap_libtorch || return 1
fi
