#!/usr/bin/env bash
# Builds the edge client's self-contained archives and its Debian package: what a device owner
# installs without Rust, a compiler or Python (docs/edge.md, "Installing on a device").
#
#   bash deploy/package-edge.sh                # for this machine: x86_64-cuda only where an NVIDIA GPU is
#                                              # present (/proc/driver/nvidia or nvidia-smi), else the CPU target
#   bash deploy/package-edge.sh x86_64-cpu     # dist/flotilla-edge-<version>-x86_64-cpu.tar.gz and _amd64.deb
#   bash deploy/package-edge.sh aarch64        # cross-built here: dist/flotilla-edge-<version>-aarch64.tar.gz and _arm64.deb
#   bash deploy/package-edge.sh x86_64-cuda    # the GPU box: libtorch's CUDA build and NVIDIA's libraries (about 4 GB)
#   FLOTILLA_PACKAGE_FAST=1 bash deploy/package-edge.sh x86_64-cpu   # gzip -1 instead of gzip -9 / xz (the test command)
#
# Each target builds in its own target directory (target/package/<target>/) against its runtime:
# the CPU-only runtime of deploy/edge-runtime.sh, or for x86_64-cuda the full libtorch of
# deploy/bootstrap-libtorch.sh. The binary's rpath is relative ($ORIGIN/../lib), so the archive
# works wherever it is unpacked.
#
# Archive layout (also /opt/flotilla-edge in the Debian package):
#   bin/flotilla-edge       launcher: checks lib/ (present, right architecture), then starts the client
#   libexec/flotilla-edge   the client (stripped)
#   lib/                    the runtime libraries, lib/MANIFEST names them
#   flotilla-edge.service   a systemd unit reading the kit from /etc/flotilla/kit
#   README.md               install, kit layout, first run
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

target="${1:-auto}"
if [ "$target" = auto ]; then
    case "$(uname -m)" in
        x86_64)
            target=x86_64-cpu
            if [ -e /proc/driver/nvidia/version ] || command -v nvidia-smi >/dev/null 2>&1; then target=x86_64-cuda; fi
            ;;
        aarch64) target=aarch64 ;;
        *) echo "package-edge: no archive for $(uname -m) (x86_64-cpu, x86_64-cuda, aarch64)" >&2; exit 2 ;;
    esac
    echo "package-edge: packaging for this machine: $target" >&2
fi
case "$target" in
    x86_64-cpu) arch=x86_64; rust_target=x86_64-unknown-linux-gnu; deb_arch=amd64 ;;
    aarch64) arch=aarch64; rust_target=aarch64-unknown-linux-gnu; deb_arch=arm64 ;;
    x86_64-cuda) arch=x86_64; rust_target=x86_64-unknown-linux-gnu; deb_arch=amd64 ;;
    *) echo "usage: bash deploy/package-edge.sh [x86_64-cpu|aarch64|x86_64-cuda]" >&2; exit 2 ;;
esac

# shellcheck source=deploy/env.sh
source "$root/deploy/env.sh"

build_dir="$root/target/package/$target"
strip_tool=strip target_args=() binary="$build_dir/release/flotilla-edge"
if [ "$arch" != "$(uname -m)" ]; then
    if ! command -v "$arch-linux-gnu-g++" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            echo "package-edge: installing the $arch cross compiler with apt-get" >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "g++-$arch-linux-gnu" >&2
        else
            echo "package-edge: need $arch-linux-gnu-g++ (Debian: sudo apt-get install g++-$arch-linux-gnu)" >&2
            exit 1
        fi
    fi
    if ! rustup target list --installed 2>/dev/null | grep -qx "$rust_target"; then
        rustup target add "$rust_target" >&2
    fi
    upper="$(echo "$rust_target" | tr 'a-z-' 'A-Z_')"
    export "CARGO_TARGET_${upper}_LINKER=$arch-linux-gnu-gcc"
    export "CC_${rust_target//-/_}=$arch-linux-gnu-gcc" "CXX_${rust_target//-/_}=$arch-linux-gnu-g++"
    strip_tool="$arch-linux-gnu-strip"
    target_args=(--target "$rust_target") binary="$build_dir/$rust_target/release/flotilla-edge"
fi

# The cross compiler first: the aarch64 runtime's empty libtorch.so is built with it.
if [ "$target" = x86_64-cuda ]; then
    runtime="$LIBTORCH"
else
    # shellcheck source=deploy/edge-runtime.sh
    source "$root/deploy/edge-runtime.sh" "$arch"
    runtime="$FLOTILLA_EDGE_RUNTIME"
fi

version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
echo "==> building flotilla-edge for $target against $runtime" >&2
LIBTORCH="$runtime" FLOTILLA_RPATH='$ORIGIN/../lib' CARGO_TARGET_DIR="$build_dir" \
    cargo build --release --locked -p flotilla-edge --bin flotilla-edge "${target_args[@]}"

name="flotilla-edge-$version-$target"
stage="$root/dist/$name"
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/libexec" "$stage/lib"
"$strip_tool" -o "$stage/libexec/flotilla-edge" "$binary"

# The runtime libraries, by their paths: the CPU runtime's lib/ (less its empty libtorch.so, which
# the client does not name), or libtorch's CUDA build with NVIDIA's libraries beside it in the
# wheel layout. All go flat into lib/: libtorch's own rpath includes $ORIGIN.
runtime_lib_paths() {
    if [ "$target" != x86_64-cuda ]; then
        find "$runtime/lib" -maxdepth 1 -type f ! -name libtorch.so
        return
    fi
    find "$runtime/lib" -maxdepth 1 -name '*.so*' ! -name 'libtorch_python*' ! -name 'libshm*'
    find "$runtime/../nvidia" -name '*.so*'
}
runtime_lib_paths | while read -r path; do cp -L "$path" "$stage/lib/"; done
libraries="$(ls -1 "$stage/lib")"
echo "$libraries" > "$stage/lib/MANIFEST"

cat > "$stage/bin/flotilla-edge" <<'LAUNCHER'
#!/bin/sh
# Starts the Flotilla edge client of this archive after checking its runtime libraries: a missing or
# foreign library gets one line saying which and what to do, not a bare loader error.
# FLOTILLA_EDGE_EMULATOR (e.g. qemu-aarch64) runs a client built for another architecture.
self="$(readlink -f "$0")"
home="${self%/bin/*}"
client="$home/libexec/flotilla-edge"
elf_machine() { od -An -j18 -N2 -tu2 "$1" 2>/dev/null | tr -d ' '; }
machine_name() { case "$1" in 62) echo x86_64 ;; 183) echo aarch64 ;; *) echo "machine $1" ;; esac; }
want="$(elf_machine "$client")"
if [ -z "$want" ]; then
    echo "flotilla-edge: $client is missing or unreadable; reinstall the archive" >&2
    exit 127
fi
if [ ! -f "$home/lib/MANIFEST" ]; then
    echo "flotilla-edge: $home/lib/MANIFEST is missing; reinstall the archive" >&2
    exit 127
fi
while read -r lib; do
    if [ ! -f "$home/lib/$lib" ]; then
        echo "flotilla-edge: runtime library $home/lib/$lib is missing; reinstall the archive (it ships every library the client needs)" >&2
        exit 127
    fi
    got="$(elf_machine "$home/lib/$lib")"
    if [ "$got" != "$want" ]; then
        echo "flotilla-edge: runtime library $home/lib/$lib is built for $(machine_name "$got"), the client for $(machine_name "$want"); reinstall the $(machine_name "$want") archive" >&2
        exit 127
    fi
done < "$home/lib/MANIFEST"
if [ -n "${FLOTILLA_EDGE_EMULATOR:-}" ]; then
    exec "$FLOTILLA_EDGE_EMULATOR" "$client" "$@"
fi
host="$(uname -m)"
if [ "$(machine_name "$want")" != "$host" ]; then
    echo "flotilla-edge: this archive is for $(machine_name "$want"), this machine is $host; install the $host archive" >&2
    exit 127
fi
exec "$client" "$@"
LAUNCHER
chmod 755 "$stage/bin/flotilla-edge"

cp deploy/systemd/flotilla-edge.service "$stage/flotilla-edge.service"
sed -e "s#@NAME@#$name#g" -e "s#@TARGET@#$target#g" -e "s#@VERSION@#$version#g" \
    deploy/package/README.md.in > "$stage/README.md"

compress=(gzip -9) deb_compression=(-Zxz)
if [ -n "${FLOTILLA_PACKAGE_FAST:-}" ]; then
    compress=(gzip -1) deb_compression=(-Zgzip -z1)
fi
mkdir -p dist
tar -C dist -cf - "$name" | "${compress[@]}" > "dist/$name.tar.gz"

# The Debian package: the same tree under /opt/flotilla-edge, the unit, a system user.
deb_root="$root/target/package/deb-$target"
rm -rf "$deb_root" && mkdir -p "$deb_root/DEBIAN" "$deb_root/opt" "$deb_root/usr/bin" \
    "$deb_root/lib/systemd/system" "$deb_root/etc/flotilla/kit" "$deb_root/var/lib/flotilla-edge/data"
cp -a "$stage" "$deb_root/opt/flotilla-edge"
mv "$deb_root/opt/flotilla-edge/flotilla-edge.service" "$deb_root/lib/systemd/system/"
ln -s /opt/flotilla-edge/bin/flotilla-edge "$deb_root/usr/bin/flotilla-edge"
installed_kib="$(du -sk "$deb_root" | cut -f1)"
# The GPU box's package is another package that replaces the CPU one (the same files, more libraries).
deb_package=flotilla-edge deb_relations=""
if [ "$target" = x86_64-cuda ]; then
    deb_package=flotilla-edge-cuda
    deb_relations="Provides: flotilla-edge\nConflicts: flotilla-edge\nReplaces: flotilla-edge\n"
fi
sed -e "s#@PACKAGE@#$deb_package#" -e "s#@VERSION@#$version#" -e "s#@ARCH@#$deb_arch#" -e "s#@SIZE@#$installed_kib#" \
    -e "s#@TARGET@#$target#" -e "s#@RELATIONS@#$deb_relations#" deploy/package/debian/control.in |
    sed '/^$/d' > "$deb_root/DEBIAN/control"
install -m 755 deploy/package/debian/postinst deploy/package/debian/prerm deploy/package/debian/postrm "$deb_root/DEBIAN/"
deb="dist/${deb_package}_${version}_${deb_arch}.deb"
dpkg-deb --root-owner-group "${deb_compression[@]}" --build "$deb_root" "$deb" >/dev/null
rm -rf "$deb_root"

echo "==> dist/$name.tar.gz ($(du -h "dist/$name.tar.gz" | cut -f1) packed, $(du -sh "$stage" | cut -f1) unpacked)"
echo "==> $deb ($(du -h "$deb" | cut -f1))"
