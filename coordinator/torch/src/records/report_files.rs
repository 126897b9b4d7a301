//! A run's report files in its run directory: `summary.json`, `rounds.csv`, `rounds.json` and the
//! plots, written by a thread of their own ([`ReportWriter`]) so the round driver never waits for a
//! disk or a plot.

use std::path::{Path, PathBuf};

use flotilla_torch::adapter::write_atomically;

use crate::records::report::{round_rows, rounds_csv, RunSummary};

/// Writes `summary.json` and the per-round reports: `rounds.csv`, `rounds.json` and the plots
/// (`accuracy.{png,svg}`, `participation.{png,svg}`). A plot that cannot be drawn is logged; the
/// run goes on.
pub fn write_summary(run_dir: &Path, summary: &RunSummary) -> anyhow::Result<()> {
    let path = run_dir.join("summary.json");
    write_atomically(&path, &serde_json::to_vec_pretty(summary)?).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows = round_rows(summary);
    write_atomically(&run_dir.join("rounds.json"), &serde_json::to_vec_pretty(&rows)?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomically(&run_dir.join("rounds.csv"), rounds_csv(&rows).as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Err(error) = crate::records::plots::draw(run_dir, &rows) {
        tracing::warn!("cannot draw the round plots: {error:#}");
    }
    Ok(())
}

/// Writes the reports on a thread of its own, so the round driver never waits for a disk or a
/// plot. Each submitted summary replaces any not yet written: only the newest matters.
pub struct ReportWriter {
    submit: Option<std::sync::mpsc::Sender<RunSummary>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ReportWriter {
    pub fn start(run_dir: PathBuf) -> ReportWriter {
        let (submit, receive) = std::sync::mpsc::channel::<RunSummary>();
        let thread = std::thread::Builder::new()
            .name("reports".into())
            .spawn(move || {
                while let Ok(mut summary) = receive.recv() {
                    while let Ok(newer) = receive.try_recv() {
                        summary = newer;
                    }
                    if let Err(error) = write_summary(&run_dir, &summary) {
                        tracing::warn!("cannot write the run's reports: {error:#}");
                    }
                }
            })
            .map_err(|error| tracing::warn!("cannot start the report writer; reports are written at the end: {error}"))
            .ok();
        ReportWriter { submit: thread.is_some().then_some(submit), thread }
    }

    pub fn submit(&self, summary: RunSummary) {
        if let Some(submit) = &self.submit {
            let _ = submit.send(summary);
        }
    }

    /// Writes what is still queued and stops the thread.
    pub fn finish(mut self) {
        drop(self.submit.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
