#!/usr/bin/env bash
# Sourced by the project's scripts: checks the base toolchain and puts libtorch in the environment.
# A developer can `source deploy/env.sh` too, then use plain cargo commands.

flotilla_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    else
        echo "flotilla: cargo not found; install Rust with rustup (https://rustup.rs), then run this again" >&2
        return 1 2>/dev/null || exit 1
    fi
fi
if ! command -v cc >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "flotilla: installing a C compiler (build-essential) with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential >&2
    else
        echo "flotilla: a C compiler is needed (Debian: sudo apt-get install build-essential)" >&2
        return 1 2>/dev/null || exit 1
    fi
fi
# shellcheck source=deploy/bootstrap-libtorch.sh
source "$flotilla_root/deploy/bootstrap-libtorch.sh" || { return 1 2>/dev/null || exit 1; }

# Debian's dataset-fashion-mnist (the real data of the demo and of some tests), installed when
# missing and this runs as root; otherwise a clear message.
flotilla_ensure_fashion_mnist() {
    [ -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && return 0
    [ -n "${FLOTILLA_FASHION_MNIST:-}" ] && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "flotilla: installing Debian's dataset-fashion-mnist with apt-get" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >&2 ||
            { DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
              DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >&2; }
    else
        echo "flotilla: Fashion-MNIST is missing: sudo apt-get install dataset-fashion-mnist (or set FLOTILLA_FASHION_MNIST to an IDX directory)" >&2
        return 1
    fi
}
