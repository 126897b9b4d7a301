include!("../../build-support/tch_link.rs");

fn main() {
    link_libtorch();
}
