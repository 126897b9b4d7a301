//! `flotilla-study`: the aggregation methods against each other and against their bounds, run
//! through the real coordinator and simulated devices over QUIC, then written up as generated
//! blocks of `docs/study.md` with plots.
//!
//! - `--suite image` (the first edition): RBLA against every baseline on label-skewed
//!   Fashion-MNIST with an MLP.
//! - `--suite text` and `--suite image-shift` (the second edition, [`second`]): all-MiniLM-L6-v2
//!   on text tasks, and the MLP on rotated Fashion-MNIST, with learning rates tuned on a validation
//!   split, bounds, a centralized rank sweep and gain recovered.
//!
//! Every finished cell is cached in `<work>/results/`; a rerun only runs what is missing, so an
//! interrupted study resumes. `deploy/study.sh` builds the binaries and runs this.

mod cell;
mod grid;
mod report;
mod results;
mod second;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;

use crate::grid::Plan;
use crate::results::CellResult;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Which study: `image` (the first edition: Fashion-MNIST, MLP), `text` (all-MiniLM-L6-v2 on
    /// BBC News; needs deploy/fetch-text-assets.sh), `text-reviews` (the same on Rotten Tomatoes),
    /// `image-shift` (the MLP pretrained on upright images, fine-tuned on rotated ones) or
    /// `headlines` (SmolLM2-135M-Instruct writing BBC headlines).
    #[arg(long, default_value = "image", value_parser = ["image", "text", "text-reviews", "image-shift", "headlines"])]
    suite: String,
    /// One label skew, one seed, a few short rounds: checks the whole pipeline in minutes. Writes
    /// into `runs/study-quick/` unless told otherwise.
    #[arg(long)]
    quick: bool,
    /// Where flotilla-coordinator, flotilla-edge and flotilla-certs are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Fashion-MNIST in IDX format (Debian's dataset-fashion-mnist by default).
    #[arg(long, env = "FLOTILLA_FASHION_MNIST", default_value = "/usr/share/datasets/fashion-mnist")]
    data: PathBuf,
    /// Run directories and credentials, and the first edition's and --quick's cached results
    /// [default: runs/study, runs/study-<suite> or runs/study-quick].
    #[arg(long)]
    work: Option<PathBuf>,
    /// Where the second edition caches its finished runs [default: study/results/<suite>, which
    /// is committed so that the reports regenerate on any machine; <work>/results with --quick].
    #[arg(long)]
    results: Option<PathBuf>,
    /// The document whose generated block is rewritten [default: docs/study.md, or
    /// <work>/study.md with --quick]; figures go to `figures/study/` beside it.
    #[arg(long)]
    doc: Option<PathBuf>,
    /// Virtual devices training at once.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Only rewrite the document and figures from the cached results.
    #[arg(long)]
    report_only: bool,
    /// Run only the cells whose key contains one of these (comma-separated), e.g.
    /// `alpha0.5-full-rbla,quarter-flora`; the report still covers every cached cell.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Apply issue 15's rule for the default method across the second edition's suites, from their
    /// cached results (study/results/image-shift, study/results/text, study/results/text-reviews), and print
    /// each method's standing and the choice. Runs nothing.
    #[arg(long)]
    choose_default: bool,
    /// With --choose-default: the suites to combine (comma-separated) [default: all three].
    #[arg(long, value_delimiter = ',', requires = "choose_default")]
    suites: Vec<String>,
    /// With --choose-default: read each suite's side of the rule from the rule table of its
    /// generated block in this document (e.g. docs/study.md) instead of from its cached results.
    #[arg(long, requires = "choose_default")]
    from_doc: Option<PathBuf>,
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("flotilla-study: {error:#}");
        std::process::exit(1);
    }
}

fn load_results(plan: &Plan, dir: &Path) -> Result<BTreeMap<String, CellResult>> {
    let mut results = BTreeMap::new();
    for cell in plan.cells() {
        let path = dir.join(format!("{}.json", cell.key()));
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let cached: serde_json::Value =
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", path.display()))?;
        let wall = cached["wall_seconds"].as_f64().unwrap_or(0.0);
        let result = CellResult::from_summary(&cached["summary"], wall).with_context(|| path.display().to_string())?;
        results.insert(cell.key(), result);
    }
    Ok(results)
}

fn run(cli: Cli) -> Result<()> {
    if cli.choose_default {
        return second::print_default_choice(&cli.suites, cli.from_doc.as_deref());
    }
    if cli.suite != "image" {
        return run_second_edition(cli);
    }
    let plan = if cli.quick { Plan::quick() } else { Plan::full() };
    let work = cli.work.unwrap_or_else(|| PathBuf::from(if cli.quick { "runs/study-quick" } else { "runs/study" }));
    let doc = cli.doc.unwrap_or_else(|| if cli.quick { work.join("study.md") } else { PathBuf::from("docs/study.md") });
    let results_dir = work.join("results");
    std::fs::create_dir_all(&results_dir).with_context(|| format!("cannot create {}", results_dir.display()))?;
    let work = work.canonicalize()?;
    let setup = cell::Setup {
        bin_dir: cli.bin_dir.canonicalize().with_context(|| format!("no binaries in {}", cli.bin_dir.display()))?,
        work: work.clone(),
        concurrency: cli.concurrency.max(1),
    };
    let data = cli.data.canonicalize().with_context(|| format!("no Fashion-MNIST in {}", cli.data.display()))?;

    let mut failed_any = false;
    if !cli.report_only {
        setup.provision(grid::fleet_size())?;
        let cells: Vec<_> = plan
            .cells()
            .into_iter()
            .filter(|c| cli.only.is_empty() || cli.only.iter().any(|o| c.key().contains(o.as_str())))
            .collect();
        let mut failed = Vec::new();
        for (i, cell) in cells.iter().enumerate() {
            let cached = results_dir.join(format!("{}.json", cell.key()));
            if cached.exists() {
                continue;
            }
            let started = Instant::now();
            eprintln!("[{}/{}] {} ...", i + 1, cells.len(), cell.key());
            match cell::run(&plan, cell, &setup, &data) {
                Ok((summary, wall_seconds)) => {
                    let result = CellResult::from_summary(&summary, wall_seconds)?;
                    eprintln!(
                        "[{}/{}] {}: final accuracy {:.2}% in {:.0} s",
                        i + 1,
                        cells.len(),
                        cell.key(),
                        100.0 * result.final_accuracy().unwrap_or(f64::NAN),
                        started.elapsed().as_secs_f64()
                    );
                    let record = serde_json::json!({ "wall_seconds": wall_seconds, "summary": summary });
                    flotilla_files::write_atomically(&cached, &serde_json::to_vec(&record)?)?;
                }
                Err(error) => {
                    eprintln!("[{}/{}] {} failed: {error:#}", i + 1, cells.len(), cell.key());
                    failed.push(cell.key());
                }
            }
        }
        if !failed.is_empty() {
            eprintln!("{} cell(s) failed (rerun to retry them): {}", failed.len(), failed.join(", "));
            failed_any = true;
        }
    }

    let results = load_results(&plan, &results_dir)?;
    let doc_dir = doc.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    report::draw_figures(&plan, &results, &doc_dir.join("figures/study"))?;
    report::write_document(&doc, &report::markdown(&plan, &results, "figures/study"))?;
    eprintln!(
        "wrote {} ({} cells) and its figures in {}",
        doc.display(),
        results.len(),
        doc_dir.join("figures/study").display()
    );
    anyhow::ensure!(!failed_any, "some cells failed (see above); the report covers the others");
    Ok(())
}

fn run_second_edition(cli: Cli) -> Result<()> {
    let plan = match (cli.suite.as_str(), cli.quick) {
        ("text", false) => second::Plan::text(),
        ("text", true) | ("text-reviews", true) => second::Plan::text_quick(),
        ("text-reviews", false) => second::Plan::text_reviews(),
        ("headlines", false) => second::Plan::headlines(),
        ("headlines", true) => second::Plan::headlines_quick(),
        (_, false) => second::Plan::image_shift(),
        (_, true) => second::Plan::image_shift_quick(),
    };
    let work = cli.work.unwrap_or_else(|| {
        PathBuf::from(format!("runs/study-{}{}", plan.suite, if cli.quick { "-quick" } else { "" }))
    });
    let doc = cli.doc.unwrap_or_else(|| if cli.quick { work.join("study.md") } else { PathBuf::from("docs/study.md") });
    let results = cli.results.unwrap_or_else(|| {
        if cli.quick {
            work.join("results")
        } else {
            second::committed_results_dir(plan.suite)
        }
    });
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    std::fs::create_dir_all(&results).with_context(|| format!("cannot create {}", results.display()))?;
    let setup = cell::Setup {
        bin_dir: cli.bin_dir.canonicalize().with_context(|| format!("no binaries in {}", cli.bin_dir.display()))?,
        work: work.canonicalize()?,
        concurrency: cli.concurrency.max(1),
    };
    second::run(&plan, &setup, &results, &doc, &cli.only, cli.report_only)
}
