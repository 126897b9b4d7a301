//! The model side of the coordinator: the frozen base every participant shares, the held-out set
//! and its evaluation, per-class scores, and fine-tuned models as HF directories.

pub(crate) mod base;
pub(crate) mod class_scores;
pub(crate) mod evaluation;
pub(crate) mod evaluation_set;
pub(crate) mod hf_decoder;
pub(crate) mod hf_model;
