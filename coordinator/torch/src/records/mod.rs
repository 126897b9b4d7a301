//! What a run reports: one record per round (kept in that round's checkpoint), the report files
//! and plots written from them, and the end-of-run summaries.

pub(crate) mod decoder_summary;
pub(crate) mod federated_evaluation;
pub(crate) mod federated_summary;
pub(crate) mod plots;
pub(crate) mod report;
pub(crate) mod report_files;
