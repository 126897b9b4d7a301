include!("../build-support/tch_link.rs");

fn main() {
    // Not the front end `flotilla-coordinator` (src/launcher.rs), which must start without libtorch.
    link_libtorch_into(&["cargo:rustc-link-arg-bin=flotilla-coordinator-torch=", "cargo:rustc-link-arg-benches="]);
}
