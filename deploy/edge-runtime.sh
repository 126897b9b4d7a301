#!/usr/bin/env bash
# The edge client's CPU-only libtorch runtime, taken from pinned PyPI wheels (sha256-checked) into a
# per-user cache: only the libraries the CPU path loads, plus the C++ headers for building.
#
#   bash deploy/edge-runtime.sh x86_64        # install if missing; print the runtime's directory
#   bash deploy/edge-runtime.sh aarch64       # the same for 64-bit ARM (for cross-building)
#   source deploy/edge-runtime.sh x86_64      # same, and export FLOTILLA_EDGE_RUNTIME
#
# Why not the torch wheel as pip installs it: on x86-64 PyPI's torch pulls 2.7 GB of NVIDIA
# libraries and Triton, and its libtorch.so links libtorch_cuda.so (456 MB) even on a laptop with
# no GPU. The CPU path needs libtorch_cpu.so, libc10.so, the OpenMP runtime, two small CUDA
# runtime libraries libtorch_cpu.so names (libcudart, libcupti: they load without a GPU or a
# driver), and on aarch64 the Arm Compute Library and NVPL BLAS/LAPACK it is built against.
# torch-sys always links `-ltorch`: the runtime's lib/ has an empty libtorch.so built here, which
# the linker then drops (the wheel's one exists only to pull in libtorch_cuda.so).
#
# Layout: $FLOTILLA_CACHE/edge-runtime-2.11.0-<arch>/{lib/,include/,build-version}
#   lib/      what a device needs at run time (docs/edge.md gives the sizes)
#   include/  libtorch's headers, only for building the edge client against this runtime
# Environment: FLOTILLA_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/flotilla)

FLOTILLA_EDGE_TORCH_VERSION="2.11.0"
FLOTILLA_PYPI="https://files.pythonhosted.org/packages"

# arch -> "url sha256" per wheel: torch, the CUDA runtime, CUPTI.
flotilla_edge_wheels() {
    case "$1" in
        x86_64)
            echo "$FLOTILLA_PYPI/8c/8b/d7be22fbec9ffee6cff31a39f8750d4b3a65d349a286cf4aec74c2375662/torch-2.11.0-cp311-cp311-manylinux_2_28_x86_64.whl 7aa2f9bbc6d4595ba72138026b2074be1233186150e9292865e04b7a63b8c67a"
            echo "$FLOTILLA_PYPI/2e/24/d1558f3b68b1d26e706813b1d10aa1d785e4698c425af8db8edc3dced472/nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl 7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548"
            echo "$FLOTILLA_PYPI/33/6d/737d164b4837a9bbd202f5ae3078975f0525a55730fe871d8ed4e3b952b0/nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_x86_64.whl 4eb01c08e859bf924d222250d2e8f8b8ff6d3db4721288cf35d14252a4d933c8"
            ;;
        aarch64)
            echo "$FLOTILLA_PYPI/84/03/acea680005f098f79fd70c1d9d5ccc0cb4296ec2af539a0450108232fc0c/torch-2.11.0-cp311-cp311-manylinux_2_28_aarch64.whl d91aac77f24082809d2c5a93f52a5f085032740a1ebc9252a7b052ef5a4fddc6"
            echo "$FLOTILLA_PYPI/87/4f/17d7b9b8e285199c58ce28e31b5c5bbaa4d8271af06a89b6405258245de2/nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_aarch64.manylinux_2_17_aarch64.whl ef9bcbe90493a2b9d810e43d249adb3d02e98dd30200d86607d8d02687c43f55"
            echo "$FLOTILLA_PYPI/2a/2a/80353b103fc20ce05ef51e928daed4b6015db4aaa9162ed0997090fe2250/nvidia_cuda_cupti-13.0.85-py3-none-manylinux_2_25_aarch64.whl 796bd679890ee55fb14a94629b698b6db54bcfd833d391d5e94017dd9d7d3151"
            ;;
        *) return 1 ;;
    esac
}

# The run-time libraries each architecture's CPU path loads (libtorch_cpu.so's NEEDED entries that
# are not the C library's, and theirs); tests/tests/edge_package.rs checks nothing else is needed.
flotilla_edge_runtime_libs() {
    case "$1" in
        x86_64) echo "torch/lib/libtorch_cpu.so torch/lib/libc10.so torch/lib/libgomp.so.1 nvidia/cu13/lib/libcudart.so.13 nvidia/cu13/lib/libcupti.so.13" ;;
        aarch64) echo "torch/lib/libtorch_cpu.so torch/lib/libc10.so torch/lib/libgomp.so.1 torch/lib/libarm_compute.so torch/lib/libarm_compute_graph.so torch/lib/libnvpl_blas_core.so.0 torch/lib/libnvpl_blas_lp64_gomp.so.0 torch/lib/libnvpl_lapack_core.so.0 torch/lib/libnvpl_lapack_lp64_gomp.so.0 nvidia/cu13/lib/libcudart.so.13 nvidia/cu13/lib/libcupti.so.13" ;;
        *) return 1 ;;
    esac
}

flotilla_edge_runtime() {
    local arch="${1:-$(uname -m)}"
    local version="$FLOTILLA_EDGE_TORCH_VERSION"
    if ! flotilla_edge_wheels "$arch" >/dev/null; then
        echo "edge-runtime: unknown architecture '$arch' (x86_64 or aarch64)" >&2
        return 1
    fi
    local cache_root="${FLOTILLA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}"
    local prefix="$cache_root/edge-runtime-$version-$arch"
    if [ ! -f "$prefix/.complete" ]; then
        echo "edge-runtime: building the $arch CPU runtime in $prefix (downloads about 0.5 GB once)" >&2
        flotilla_edge_runtime_install "$arch" "$prefix" || { echo "edge-runtime: failed; nothing was installed" >&2; return 1; }
    fi
    FLOTILLA_EDGE_RUNTIME="$prefix"
    export FLOTILLA_EDGE_RUNTIME
}

flotilla_edge_runtime_install() {
    local arch="$1" prefix="$2" staging="$2.partial"
    rm -rf "$staging"
    mkdir -p "$staging/wheels" "$staging/lib" || return 1
    local url sha file
    while read -r url sha; do
        file="$staging/wheels/${url##*/}"
        curl -sSfL --retry 3 -o "$file" "$url" || { echo "edge-runtime: download failed: $url" >&2; return 1; }
        if [ "$(sha256sum "$file" | cut -d' ' -f1)" != "$sha" ]; then
            echo "edge-runtime: ${url##*/} does not match its pinned sha256 $sha" >&2
            return 1
        fi
    done < <(flotilla_edge_wheels "$arch")
    # shellcheck disable=SC2046
    python3 - "$staging" $(flotilla_edge_runtime_libs "$arch") <<'PY' || return 1
import pathlib, shutil, sys, zipfile
staging = pathlib.Path(sys.argv[1])
wanted = set(sys.argv[2:])
for wheel in sorted((staging / "wheels").glob("*.whl")):
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            name = info.filename
            if name in wanted:
                target = staging / "lib" / pathlib.PurePosixPath(name).name
                wanted.discard(name)
            elif name.startswith("torch/include/") and not name.endswith("/"):
                target = staging / name[len("torch/"):]
            elif name == "torch/version.py":
                target = staging / "version.py"
            else:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "wb") as sink:
                shutil.copyfileobj(source, sink)
            target.chmod(0o755 if "/lib/" in name else 0o644)
if wanted:
    sys.exit("edge-runtime: the wheels lack " + ", ".join(sorted(wanted)))
PY
    sed -n "s/^__version__ = '\([^']*\)'.*/\1/p" "$staging/version.py" > "$staging/build-version"
    rm -rf "$staging/wheels"
    local compiler=cc
    [ "$arch" != "$(uname -m)" ] && compiler="$arch-linux-gnu-gcc"
    if ! command -v "$compiler" >/dev/null 2>&1; then
        echo "edge-runtime: need $compiler to build the empty libtorch.so (Debian: apt-get install gcc-$arch-linux-gnu)" >&2
        return 1
    fi
    "$compiler" -shared -o "$staging/lib/libtorch.so" -x c /dev/null || return 1
    rm -rf "$prefix"
    mv "$staging" "$prefix" && touch "$prefix/.complete"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    flotilla_edge_runtime "${1:-}"
    echo "$FLOTILLA_EDGE_RUNTIME"
else
    flotilla_edge_runtime "${1:-}" || return 1
fi
