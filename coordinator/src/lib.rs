//! The libtorch-free side of `flotilla-coordinator`: the front-end binary (`src/main.rs`) and the
//! one definition of the offline `aggregate` command ([`aggregate`]) that the front end and
//! `flotilla-coordinator-torch` both parse and print with. Nothing in this crate's dependency
//! graph links libtorch; a test in the suite checks it.

pub mod aggregate;
