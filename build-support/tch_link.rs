// Shared by the build.rs of every crate whose binaries or tests link libtorch (via `include!`).
//
// Two problems this solves:
// - The linker's `--as-needed` drops `libtorch_cuda`, because no Rust code references it by symbol
//   (libtorch registers its CUDA kernels from static initialisers), so CUDA is silently unavailable
//   even on a GPU host. Link it explicitly with `--no-as-needed`.
// - Without an rpath the binaries need LD_LIBRARY_PATH. torch-sys reports its lib dir to crates that
//   depend on it directly as DEP_TCH_LIBTORCH_LIB. `FLOTILLA_RPATH` replaces that rpath, e.g. with
//   `$ORIGIN/../lib` for the relocatable archives of deploy/package-edge.sh.
// Link arguments printed by a dependency's build script do not reach the binaries downstream, so
// each crate whose targets link libtorch has its own build.rs that includes this file.
fn link_libtorch() {
    let directives = ["cargo:rustc-link-arg="];
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=FLOTILLA_RPATH");
    let lib_dir = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(dir) => dir,
        Err(_) => panic!(
            "flotilla: torch-sys did not report where libtorch is. Run `source deploy/bootstrap-libtorch.sh` \
             (it installs libtorch 2.11.0 into ~/.cache/flotilla and exports LIBTORCH), then build again."
        ),
    };
    let lib_path = std::path::Path::new(&lib_dir);
    if !lib_path.join("libtorch_cpu.so").exists() {
        panic!(
            "flotilla: no libtorch_cpu.so in {lib_dir}. LIBTORCH must point at a libtorch 2.11.0 \
             (run `source deploy/bootstrap-libtorch.sh`)."
        );
    }
    check_libtorch_version(lib_path);
    let rpath = std::env::var("FLOTILLA_RPATH").unwrap_or_else(|_| lib_dir.clone());
    for directive in directives {
        println!("{directive}-Wl,-rpath,{rpath}");
        // Where the linker finds what libtorch's libraries need when the rpath is relative.
        println!("{directive}-Wl,-rpath-link,{lib_dir}");
        // A CPU-only runtime (deploy/edge-runtime.sh) has no libtorch_cuda.so, and its libtorch.so
        // is empty: nothing to force in.
        if lib_path.join("libtorch_cuda.so").exists() {
            println!("{directive}-Wl,--no-as-needed");
            println!("{directive}-ltorch_cuda");
            println!("{directive}-ltorch");
            println!("{directive}-Wl,--as-needed");
        }
    }
}

/// torch-sys only checks the version of a libtorch that has a `build-version` file; a PyTorch
/// install has `version.py` instead. A mismatch would otherwise surface as linker or runtime errors.
fn check_libtorch_version(lib_dir: &std::path::Path) {
    const EXPECTED: &str = "2.11.0";
    let Some(root) = lib_dir.parent() else { return };
    let found = std::fs::read_to_string(root.join("build-version"))
        .ok()
        .map(|v| v.trim().to_string())
        .or_else(|| {
            let text = std::fs::read_to_string(root.join("version.py")).ok()?;
            let line = text.lines().find(|l| l.starts_with("__version__"))?;
            Some(line.split('\'').nth(1)?.to_string())
        });
    if let Some(found) = found {
        let release = found.split('+').next().unwrap_or(&found);
        if release != EXPECTED && std::env::var_os("LIBTORCH_BYPASS_VERSION_CHECK").is_none() {
            panic!(
                "flotilla: libtorch at {} is version {found}, but this build needs {EXPECTED} (tch 0.24). \
                 Run `source deploy/bootstrap-libtorch.sh` to get the right one.",
                root.display()
            );
        }
    }
}
