//! The command line ([`cli`]) and the commands beside `serve`: [`check`] (every check `serve` makes,
//! read-only), [`export`], [`aggregate`] on the libtorch path, [`finetune_full`] and [`generate`].

pub(crate) mod aggregate;
pub(crate) mod check;
pub mod cli;
pub(crate) mod export;
pub(crate) mod finetune_full;
pub(crate) mod generate;
