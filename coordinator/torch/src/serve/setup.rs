//! `serve`: everything a run needs before its first round — the run directory, the frozen base
//! model (pretrained if configured), the checkpoint to resume from, the evaluation set, the
//! aggregation worker, the QUIC endpoint and the metrics port — then the round driver.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flotilla_torch::adapter::Adapter;
use flotilla_torch::tensor::wire_from_tensors;
use flotilla_wire::protocol::{close, ModelSpec};
use flotilla_wire::quic;
use flotilla_wire::tensor::DType;
use flotilla_wire::tls::KitPaths;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::CoordinatorConfig;
use crate::model::base::Base;
use crate::model::evaluation::{describe, EvaluationReport, Evaluator, RankAccuracy};
use crate::records::report::{previous_summary, RoundRecord, RunSummary, SkippedRound};
use crate::records::report_files::write_summary;
use crate::serve::aggregation_worker::{AggregationWorker, WorkerSettings};
use crate::serve::checkpoint;
use crate::serve::driver::DriverInput;
use crate::serve::driver::{DriverStart, RoundDriver};
use crate::serve::metrics::SharedStatus;
use crate::serve::session::{accept_loop, SessionContext};

/// Where a run starts: the global adapter, the first round, and the records of earlier rounds
/// (when resuming after a checkpoint).
struct RunStart {
    initial_global: Adapter,
    first_round: u32,
    history: Option<Vec<RoundRecord>>,
}

/// Runs the configured rounds (resuming after the last checkpoint unless `fresh`) and returns the
/// run's summary, also written to `<run_dir>/summary.json`. With `evaluate_only`, trains nothing:
/// a checkpoint's model (the last, or a chosen round's) is scored on the devices' held-out data
/// (`[federated_evaluation]`).
pub async fn serve(
    config: CoordinatorConfig,
    fresh: bool,
    evaluate_only: Option<EvaluateOnly>,
) -> anyhow::Result<RunSummary> {
    let configured_rounds = config.round.rounds;
    let (config, privacy_plan) = budgeted_and_planned(config)?;
    let run_dir = config.server.run_dir.clone();
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create run directory {}", run_dir.display()))?;
    let mut run_lock = crate::serve::run_lock::RunLock::take(&run_dir)?;
    let renewal = open_renewal(&config)?;
    let base = crate::model::base::prepare(&config)?;
    let start = run_start(&config, &base, fresh, evaluate_only.and_then(EvaluateOnly::round))?;
    let (config, ledger) = limit_rounds_to_ledger(config, start.first_round)?;
    check_evaluate_only(&config, &start, fresh, evaluate_only)?;
    if evaluate_only.is_none() && start.first_round > config.round.rounds {
        return Ok(nothing_left_to_run(&config, start, &ledger, configured_rounds));
    }
    let (inputs, receiver) = mpsc::unbounded_channel();
    let evaluated = inputs.clone();
    let report_evaluation: EvaluationReport =
        Box::new(move |round, result| drop(evaluated.send(DriverInput::Evaluated { round, result })));
    let update_bound = update_bound(&start.initial_global);
    let secure_layout = config.secure_aggregation.as_ref().map(|_| update_bound.layout);
    let (worker, initial_evaluation) =
        start_worker(&config, &base, start.initial_global, start.first_round, report_evaluation)?;
    let (endpoint, revoked) = open_endpoint(&config)?;
    let status = open_ports(&config, &endpoint).await?;
    run_lock.record(&format!("pid {}, listening on {}", std::process::id(), endpoint.local_addr()?))?;

    let config = Arc::new(config);
    let context = Arc::new(SessionContext {
        model: ModelSpec {
            architecture: config.model.architecture.clone(),
            lora_alpha: config.aggregation.lora_alpha,
            max_rank: config.aggregation.max_rank,
        },
        base_version: base.version.clone(),
        // A checkpoint's weights are not sent with every Welcome: devices use their own copy or
        // fetch the files once.
        welcome_tensors: match &base.checkpoint {
            Some(_) => Default::default(),
            None => wire_from_tensors(base.weights.iter().map(|(n, t)| (n.as_str(), t)), DType::F32)?,
        },
        served_checkpoint: base.checkpoint.clone(),
        config: config.clone(),
        inputs: inputs.clone(),
        renewal,
        revoked,
        update_bound,
    });
    let acceptor = tokio::spawn(accept_loop(endpoint.clone(), context));
    let first_round = start.first_round;
    let start = StartingPoint { history: start.history, initial_evaluation, configured_rounds };
    let summary = starting_summary(&config, first_round, start, &ledger, evaluate_only.is_some());
    let driver = RoundDriver::new(DriverStart {
        config,
        base_version: base.version,
        inputs,
        worker,
        summary,
        first_round,
        status,
        secure_layout,
        ledger,
        privacy_plan,
        evaluate_only: evaluate_only.map(|_| first_round - 1),
    });
    let summary = driver.run(receiver).await;
    acceptor.abort();
    // Give devices a moment to read `Finished` and close first, then close what is left.
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    close_endpoint(&endpoint, summary.is_ok());
    let summary = summary?;
    write_summary(&run_dir, &summary)?;
    Ok(summary)
}

/// The CA that renews devices' certificates online, under `[renewal]`.
fn open_renewal(config: &CoordinatorConfig) -> anyhow::Result<Option<crate::serve::renewal::Renewal>> {
    let renewal = crate::serve::renewal::Renewal::open(&config.renewal)?;
    if renewal.is_some() {
        info!("devices may renew their certificates online ([renewal])");
    }
    Ok(renewal)
}

/// The rounds that have spent privacy: the ledger's count, or every round before `first_round`.
fn sampled(ledger: &Option<crate::serve::privacy_ledger::PrivacyLedger>, first_round: u32) -> u32 {
    ledger.as_ref().map_or(first_round - 1, |l| l.sampled())
}

/// `serve --evaluate-only`: which checkpoint the devices score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvaluateOnly {
    Last,
    Round(u32),
}

impl EvaluateOnly {
    fn round(self) -> Option<u32> {
        match self {
            EvaluateOnly::Last => None,
            EvaluateOnly::Round(round) => Some(round),
        }
    }
}

/// `serve --evaluate-only` needs a model to evaluate (a checkpoint in the run directory) and devices
/// to evaluate it on (`[federated_evaluation]`).
fn check_evaluate_only(
    config: &CoordinatorConfig,
    start: &RunStart,
    fresh: bool,
    evaluate_only: Option<EvaluateOnly>,
) -> anyhow::Result<()> {
    let Some(which) = evaluate_only else { return Ok(()) };
    anyhow::ensure!(
        !fresh,
        "--evaluate-only evaluates one of the run directory's checkpoints; --fresh would set them aside"
    );
    anyhow::ensure!(
        config.federated_evaluation.is_some(),
        "--evaluate-only needs a [federated_evaluation] section: it asks the devices to score the model"
    );
    let round = start.first_round - 1;
    anyhow::ensure!(
        start.history.is_some() && which.round().is_none_or(|wanted| wanted == round),
        "--evaluate-only: {} holds no checkpoint {} to evaluate",
        config.server.run_dir.display(),
        which.round().map_or("(global/round-N)".to_string(), |r| format!("of round {r}"))
    );
    info!(round, "evaluation only: the devices will score this round's global adapter");
    Ok(())
}

/// What the run's summary starts from besides the configuration.
struct StartingPoint {
    history: Option<Vec<crate::records::report::RoundRecord>>,
    initial_evaluation: Vec<crate::model::evaluation::RankAccuracy>,
    configured_rounds: u32,
}

/// The summary a run starts from: a resumed run continues the records of the rounds before its
/// checkpoint; an evaluation-only run keeps the whole run's records (the summary written before),
/// not only those up to the checkpoint it evaluates.
fn starting_summary(
    config: &CoordinatorConfig,
    first_round: u32,
    start: StartingPoint,
    ledger: &Option<crate::serve::privacy_ledger::PrivacyLedger>,
    evaluate_only: bool,
) -> RunSummary {
    let previous = previous_summary(&config.server.run_dir);
    if let Some(previous) =
        previous.as_ref().filter(|p| evaluate_only && p.rounds.iter().any(|r| r.round == first_round - 1))
    {
        return previous.clone();
    }
    let (initial, skipped) = match (&start.history, previous) {
        (Some(_), Some(previous)) => (previous.initial_evaluation, previous.skipped),
        _ => (start.initial_evaluation, Vec::new()),
    };
    let rounds = start.history.unwrap_or_default();
    let sampled = sampled(ledger, first_round);
    summary_so_far(config, first_round, sampled, rounds, initial, skipped, start.configured_rounds)
}

/// Closes every connection left. DONE tells a device still training that the run is over; after
/// an error the run is not over, and TRY_AGAIN keeps devices reconnecting for a restarted
/// coordinator.
fn close_endpoint(endpoint: &quinn::Endpoint, finished: bool) {
    match finished {
        true => endpoint.close(close::DONE.into(), b"run finished"),
        false => endpoint.close(close::TRY_AGAIN.into(), b"coordinator stopped on an error"),
    }
}

/// The global adapter and round to start from: the last checkpoint's, or the base's initial adapter.
/// Where the run starts: after the newest checkpoint (or `round`'s), or from the initial adapter.
fn run_start(config: &CoordinatorConfig, base: &Base, fresh: bool, round: Option<u32>) -> anyhow::Result<RunStart> {
    let run_dir = &config.server.run_dir;
    if fresh {
        if let Some(aside) = checkpoint::set_aside(run_dir)? {
            info!("--fresh: earlier checkpoints moved to {}", aside.display());
        }
    }
    Ok(match checkpoint::find(run_dir, round)? {
        Some((dir, state)) => {
            let initial_global = checkpoint::resume(&dir, &state, config)?;
            info!(round = state.round, checkpoint = %dir.display(), "resuming after the last finished round");
            let history = Some(checkpoint::records(run_dir, state.round));
            RunStart { initial_global, first_round: state.round + 1, history }
        }
        None => RunStart { initial_global: base.initial_adapter(config)?, first_round: 1, history: None },
    })
}

/// The summary of a run with no round left to run (all done, or the budget spent).
fn nothing_left_to_run(
    config: &CoordinatorConfig,
    start: RunStart,
    ledger: &Option<crate::serve::privacy_ledger::PrivacyLedger>,
    configured_rounds: u32,
) -> RunSummary {
    let sampled = sampled(ledger, start.first_round);
    info!(
        "no round left to run: {} round(s) already completed here, the run's last is round {}; nothing to do",
        start.first_round - 1,
        config.round.rounds
    );
    let previous = previous_summary(&config.server.run_dir);
    let initial = previous.as_ref().map(|s| s.initial_evaluation.clone()).unwrap_or_default();
    let skipped = previous.map(|s| s.skipped).unwrap_or_default();
    let rounds = start.history.unwrap_or_default();
    summary_so_far(config, start.first_round, sampled, rounds, initial, skipped, configured_rounds)
}

/// The run summary as it stands before `first_round`, `sampled` rounds having spent privacy
/// budget (the ledger's count under `[privacy]`: re-run rounds and earlier runs included).
fn summary_so_far(
    config: &CoordinatorConfig,
    first_round: u32,
    sampled: u32,
    rounds: Vec<RoundRecord>,
    initial_evaluation: Vec<RankAccuracy>,
    skipped: Vec<SkippedRound>,
    configured_rounds: u32,
) -> RunSummary {
    RunSummary {
        method: config.aggregation.method.to_string(),
        max_rank: config.aggregation.max_rank,
        rounds_completed: first_round - 1,
        final_global: rounds.last().and_then(|r| r.global_dir.clone()),
        privacy: config.privacy.as_ref().map(|p| crate::config::privacy::PrivacySummary {
            mode: p.mode,
            clip_norm: p.clip_norm,
            noise_multiplier: p.noise_multiplier,
            sampling_rate: config.round.fraction,
            delta: p.delta,
            epsilon_budget: p.epsilon,
            epsilon_spent: p.epsilon_after(config.round.fraction, sampled).unwrap_or(f64::NAN),
            rounds_allowed: config.round.rounds,
            rounds_configured: configured_rounds,
        }),
        rounds,
        initial_evaluation,
        // Rounds skipped before the checkpoint the run resumes from (a round re-run after it is
        // recorded anew).
        skipped: skipped.into_iter().filter(|s| s.round < first_round).collect(),
    }
}

/// Under `[privacy]`, opens the run directory's ledger and counts the rounds it says were sampled
/// before (re-run rounds and earlier runs included) against the budget: the run ends when their
/// total reaches what the budget pays for.
fn limit_rounds_to_ledger(
    mut config: CoordinatorConfig,
    first_round: u32,
) -> anyhow::Result<(CoordinatorConfig, Option<crate::serve::privacy_ledger::PrivacyLedger>)> {
    let Some(privacy) = &config.privacy else { return Ok((config, None)) };
    let ledger = crate::serve::privacy_ledger::PrivacyLedger::open(&config.server.run_dir)?;
    let sampled = ledger.sampled();
    let checkpointed = first_round - 1;
    if sampled > checkpointed {
        warn!(
            "privacy ledger: {sampled} round(s) were sampled in this run directory, {checkpointed} of them kept in \
             checkpoints; the {} others (rounds re-run after a restart, or earlier runs) count against the budget",
            sampled - checkpointed
        );
    }
    let allowed = privacy.budget(config.round.fraction, config.round.rounds.max(sampled) + 1)?.rounds_allowed();
    let remaining = allowed.saturating_sub(sampled);
    let last = checkpointed + remaining;
    if last < config.round.rounds {
        warn!(
            "privacy budget: ε = {} pays for {allowed} sampled rounds and {sampled} are spent; the run ends after \
             round {last}",
            privacy.epsilon
        );
        config.round.rounds = last;
    }
    Ok((config, Some(ledger)))
}

/// Under `[privacy]`: the rounds the budget pays for (see [`limit_rounds_to_privacy_budget`]),
/// and what the noise will cost the model, logged (with the warning when the run would learn
/// almost nothing) and kept for `/status`.
fn budgeted_and_planned(
    config: CoordinatorConfig,
) -> anyhow::Result<(CoordinatorConfig, Option<crate::config::privacy_plan::PrivacyPlan>)> {
    let config = limit_rounds_to_privacy_budget(config)?;
    let plan = crate::config::privacy_plan::PrivacyPlan::of(&config)?;
    if let Some(plan) = &plan {
        info!("{}", plan.describe());
        if let Some(warning) = plan.warning() {
            warn!("{warning}");
        }
    }
    Ok((config, plan))
}

/// Under `[privacy]`, ends the run at the last round the ε budget pays for: the noise and the
/// sampling rate are fixed, so a round that would take ε past the budget is known before the run.
fn limit_rounds_to_privacy_budget(mut config: CoordinatorConfig) -> anyhow::Result<CoordinatorConfig> {
    let Some(privacy) = &config.privacy else { return Ok(config) };
    let budget = privacy.budget(config.round.fraction, config.round.rounds)?;
    let allowed = budget.rounds_allowed();
    if budget.cuts_the_run() {
        warn!(
            "privacy budget: ε = {} at δ = {} pays for {allowed} of the {} configured rounds (ε = {:.3} after round \
             {allowed}, {:.3} after one more); the run ends after round {allowed}",
            privacy.epsilon,
            privacy.delta,
            config.round.rounds,
            budget.epsilon_at(allowed),
            privacy.epsilon_after(config.round.fraction, allowed + 1)?,
        );
        config.round.rounds = allowed;
    } else {
        info!(
            "privacy: clip {} noise multiplier {} sampling rate {}: ε = {:.3} at δ = {} after all {allowed} rounds \
             (budget {})",
            privacy.clip_norm,
            privacy.noise_multiplier,
            config.round.fraction,
            budget.epsilon_at(allowed),
            privacy.delta,
            privacy.epsilon
        );
    }
    Ok(config)
}

/// The evaluator (when a test set is configured) and the aggregation worker that owns it.
fn start_worker(
    config: &CoordinatorConfig,
    base: &Base,
    initial_global: Adapter,
    first_round: u32,
    report_evaluation: EvaluationReport,
) -> anyhow::Result<(AggregationWorker, Vec<RankAccuracy>)> {
    let max_rank = config.aggregation.max_rank;
    let evaluator = match crate::model::evaluation_set::EvaluationSet::of(config, true) {
        Some(set) => Some(
            Evaluator::load(
                config.model.architecture.clone(),
                base.weights.iter().map(|(n, t)| (n.clone(), t.copy())).collect(),
                config.aggregation.scale(),
                &set,
            )
            .context("cannot load the evaluation set")?
            .delivering_whole_adapter(config.aggregation.method.folds_tail())
            .writing_headlines(
                config
                    .model
                    .decoder
                    .as_ref()
                    .map_or(crate::model::evaluation::DEFAULT_ROUGE_SAMPLES, |d| d.rouge_samples),
            ),
        ),
        None => None,
    };
    let (worker, initial_evaluation) = AggregationWorker::spawn(
        initial_global,
        WorkerSettings {
            method: config.aggregation.method,
            lora_alpha: config.aggregation.lora_alpha,
            max_rank,
            run_dir: config.server.run_dir.clone(),
            record_updates: config.aggregation.record_updates,
            shrink_to_round_rank: config.aggregation.ablation_shrink_to_round_rank,
            evaluator,
            fingerprint: checkpoint::fingerprint(config),
            policy: config.round_policy(),
            first_round,
            privacy: config.privacy.as_ref().map(|p| p.parameters()),
        },
        report_evaluation,
    )?;
    if !initial_evaluation.is_empty() {
        let what = crate::model::evaluation::measured(&config.model.architecture);
        info!("[round 0] {what} of the base model with the initial adapter: {}", describe(&initial_evaluation));
    }
    Ok((worker, initial_evaluation))
}

/// What an update may carry: every tensor of the global adapter a device trains (not a merged
/// delta), at most at the global's shape, and the values a rank holds (the secure layout).
fn update_bound(global: &Adapter) -> crate::serve::session::UpdateBound {
    let allowed = global
        .tensors()
        .iter()
        .filter(|(name, _)| !global.merged_delta_names().any(|m| m == name.as_str()))
        .map(|(name, t)| (name.clone(), t.size().iter().map(|&d| d.max(0) as u64).collect()))
        .collect();
    crate::serve::session::UpdateBound {
        allowed: Arc::new(allowed),
        layout: flotilla_torch::aggregate::secure::layout(global),
    }
}

/// The QUIC endpoint, with the CRL watched for changes, and the serials it revokes (live sessions
/// of a serial revoked later are closed).
fn open_endpoint(
    config: &CoordinatorConfig,
) -> anyhow::Result<(quinn::Endpoint, crate::serve::session::RevokedSerials)> {
    let kit = KitPaths::in_dir(&config.tls.kit);
    let crl = config.tls.crl.clone();
    let reset_secret = crate::serve::reset_secret::load_or_create(&config.server.run_dir)?;
    let endpoint = quic::server_endpoint(config.server.listen, &kit, crl.as_deref(), &config.transport, &reset_secret)
        .context("cannot start the QUIC endpoint")?;
    let initial = match &crl {
        Some(path) => flotilla_wire::tls::revoked_serials(path).context("[tls] crl")?,
        None => BTreeSet::new(),
    };
    let (publish, revoked) = tokio::sync::watch::channel(Arc::new(initial));
    if let Some(crl) = crl {
        tokio::spawn(reload_crl(endpoint.clone(), kit, crl, config.clone(), publish));
    }
    Ok((endpoint, revoked))
}

/// The metrics port, then the address file: every port listens before the file says the
/// coordinator is up.
async fn open_ports(config: &CoordinatorConfig, endpoint: &quinn::Endpoint) -> anyhow::Result<SharedStatus> {
    let status = SharedStatus::default();
    if let Some(listen) = config.metrics.listen {
        let bound = crate::serve::metrics::serve(listen, status.clone()).await?;
        info!(address = %bound, "metrics on http://{bound}/metrics, health on /healthz, state on /status");
    }
    let local = endpoint.local_addr()?;
    if let Some(path) = &config.server.address_file {
        std::fs::write(path, local.to_string()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    info!(address = %local, method = %config.aggregation.method, max_rank = config.aggregation.max_rank, "coordinator listening");
    Ok(status)
}

/// Watches the CRL file and swaps the endpoint's TLS configuration when it changes: new handshakes
/// see revocations without a restart, and live sessions whose certificate it now lists are closed
/// (`publish`). A broken CRL is logged and the previous one stays in force.
async fn reload_crl(
    endpoint: quinn::Endpoint,
    kit: KitPaths,
    crl: PathBuf,
    config: CoordinatorConfig,
    publish: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
) {
    let modified = |path: &PathBuf| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut last = modified(&crl);
    let mut ticker = tokio::time::interval(Duration::from_secs(config.tls.crl_reload_secs.max(1)));
    loop {
        ticker.tick().await;
        let now = modified(&crl);
        if now == last {
            continue;
        }
        last = now;
        let reloaded = quic::server_config(&kit, Some(&crl), &config.transport)
            .and_then(|server_config| Ok((server_config, flotilla_wire::tls::revoked_serials(&crl)?)));
        match reloaded {
            Ok((server_config, serials)) => {
                endpoint.set_server_config(Some(server_config));
                info!(crl = %crl.display(), revoked = serials.len(), "revocation list reloaded");
                publish.send_replace(Arc::new(serials));
            }
            Err(error) => warn!(crl = %crl.display(), "revocation list not reloaded, the previous one stays: {error}"),
        }
    }
}
