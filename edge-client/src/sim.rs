//! `flotilla-edge sim`: many virtual devices in one process. Each has its own kit (certificate),
//! its own QUIC connection (all on one UDP socket) and its own shard of the data, and runs the very
//! session and training code of a real device; training runs on a bounded pool of threads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_torch::data::partition::PartitionSpec;
use flotilla_wire::framing::FrameLimits;
use flotilla_wire::protocol::HardwareProfile;
use flotilla_wire::quic::{self, TransportSettings};
use flotilla_wire::tls::{self, KitPaths};

use crate::session::{self, SessionError, SessionSettings, Stop};
use crate::sim_behaviour::{BehavingTrainer, BehaviourMix};
use crate::trainer::{DataChoice, DataSource, Trainer, TrainerPool};

/// Default rank each device class asks for when the mix does not say.
pub fn default_class_rank(class: &str) -> Option<u32> {
    match class {
        "phone" => Some(2),
        "laptop" => Some(8),
        "desktop" => Some(16),
        "gpu" => Some(32),
        _ => None,
    }
}

/// A device profile of the fleet: its class, the rank it asks for, and its share of the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    pub class: String,
    pub rank: u32,
    pub weight: u32,
}

/// `class[:rank]=weight,...`, e.g. `phone=3,laptop:4=2,gpu:32=1`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileMix(pub Vec<Profile>);

impl FromStr for ProfileMix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut profiles = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (who, weight) = item.split_once('=').unwrap_or((item, "1"));
            let weight: u32 =
                weight.parse().map_err(|_| format!("'{item}': the weight after '=' must be a whole number"))?;
            let (class, rank) = match who.split_once(':') {
                Some((class, rank)) => {
                    (class, rank.parse::<u32>().map_err(|_| format!("'{item}': the rank after ':' must be a number"))?)
                }
                None => (
                    who,
                    default_class_rank(who).ok_or_else(|| {
                        format!("'{item}': unknown class '{who}'; give its rank as {who}:<rank>=<weight>")
                    })?,
                ),
            };
            if class.is_empty() || rank == 0 || weight == 0 {
                return Err(format!("'{item}': need a class, a rank ≥ 1 and a weight ≥ 1"));
            }
            profiles.push(Profile { class: class.to_string(), rank, weight });
        }
        if profiles.is_empty() {
            return Err("the profile mix is empty".into());
        }
        Ok(ProfileMix(profiles))
    }
}

impl ProfileMix {
    /// The profile of each of `n` devices: counts in proportion to the weights (largest
    /// remainders), classes interleaved so that any prefix of the fleet is mixed too.
    pub fn assign(&self, n: usize) -> Vec<Profile> {
        let total: u64 = self.0.iter().map(|p| u64::from(p.weight)).sum();
        let mut counts: Vec<(usize, u64)> =
            self.0.iter().map(|p| ((n as u64 * u64::from(p.weight) / total) as usize, 0)).collect();
        let mut remainders: Vec<(u64, usize)> =
            self.0.iter().enumerate().map(|(i, p)| ((n as u64 * u64::from(p.weight)) % total, i)).collect();
        remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let assigned: usize = counts.iter().map(|c| c.0).sum();
        for &(_, i) in remainders.iter().take(n - assigned) {
            counts[i].0 += 1;
        }
        // Interleave: the k-th device of a class sits at position (k + 0.5) / count of the fleet.
        let mut slots: Vec<(f64, usize)> = Vec::with_capacity(n);
        for (i, (count, _)) in counts.iter_mut().enumerate() {
            for k in 0..*count {
                slots.push(((k as f64 + 0.5) / *count as f64, i));
            }
        }
        slots.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        slots.into_iter().map(|(_, i)| self.0[i].clone()).collect()
    }
}

pub struct SimSettings {
    pub coordinator: std::net::SocketAddr,
    pub server_name: String,
    pub kits: PathBuf,
    pub clients: usize,
    pub mix: ProfileMix,
    pub data: DataChoice,
    /// How the IDX training set is split among the clients (device `index` gets part `index`).
    pub partition: Option<PartitionSpec>,
    /// Each device keeps (lowest rank of the mix / its rank)^this of its part: 0 keeps all; 1
    /// makes data size inversely proportional to rank.
    pub data_share_by_rank: f64,
    pub concurrency: usize,
    pub threads: usize,
    pub max_attempts: u32,
    pub transport: TransportSettings,
    pub renew_within: Option<Duration>,
    pub stop: tokio::sync::watch::Receiver<crate::session::Stop>,
    pub base_store: std::sync::Arc<crate::base_store::BaseStore>,
    /// How each class's devices behave (speed, coming and going, dropping mid-training).
    pub behaviour: BehaviourMix,
    pub behaviour_seed: u64,
}

/// The usable device kits in `dir` (subdirectories holding a device certificate), sorted by name,
/// and what was left out and why.
struct FoundKits {
    usable: Vec<(String, KitPaths)>,
    revoked: Vec<String>,
    foreign: Vec<String>,
}

impl FoundKits {
    fn skipped(&self) -> String {
        let mut parts = Vec::new();
        if !self.revoked.is_empty() {
            parts.push(format!("{} revoked ({})", self.revoked.len(), self.revoked.join(", ")));
        }
        if !self.foreign.is_empty() {
            parts.push(format!("{} from another CA ({})", self.foreign.len(), self.foreign.join(", ")));
        }
        if parts.is_empty() {
            "none skipped".into()
        } else {
            format!("skipped {}", parts.join("; "))
        }
    }
}

/// A kit is left out when a revocation list beside the kits (the PKI's `crl.pem` when `dir` is
/// `<pki>/kits`) or in the kit itself lists its certificate, or when its CA is not the PKI's (or,
/// with no PKI around `dir`, not the CA most kits share): the coordinator would refuse it, and a
/// fleet of such kits stalls below `min_devices`.
fn device_kits(dir: &Path) -> Result<FoundKits> {
    let mut kits = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list kits in {}", dir.display()))? {
        let path = entry?.path();
        if !path.join("cert.pem").exists() {
            continue;
        }
        let kit = KitPaths::in_dir(&path);
        if let Ok(id) = tls::own_device_id(&kit) {
            kits.push((id, kit));
        }
    }
    kits.sort_by(|a, b| a.0.cmp(&b.0));
    let pki = dir.parent().unwrap_or(dir);
    let ca_of = |kit: &KitPaths| std::fs::read(&kit.ca_cert).unwrap_or_default();
    let fleet_ca = match std::fs::read(pki.join("ca.crt")) {
        Ok(ca) => ca,
        Err(_) => {
            let mut counts: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
            for (_, kit) in &kits {
                *counts.entry(ca_of(kit)).or_default() += 1;
            }
            counts.into_iter().max_by_key(|(_, n)| *n).map(|(ca, _)| ca).unwrap_or_default()
        }
    };
    let shared_crl = tls::revoked_serials(&pki.join("crl.pem")).unwrap_or_default();
    let mut found = FoundKits { usable: Vec::new(), revoked: Vec::new(), foreign: Vec::new() };
    for (id, kit) in kits {
        if ca_of(&kit) != fleet_ca {
            found.foreign.push(id);
            continue;
        }
        let serial = tls::own_certificate_serial(&kit).unwrap_or_default();
        let own_crl = tls::kit_crl(&kit).and_then(|crl| tls::revoked_serials(&crl).ok()).unwrap_or_default();
        if shared_crl.contains(&serial) || own_crl.contains(&serial) {
            found.revoked.push(id);
        } else {
            found.usable.push((id, kit));
        }
    }
    Ok(found)
}

#[derive(Debug, Default)]
pub struct SimReport {
    pub finished: usize,
    pub rounds_trained: BTreeMap<String, u32>,
    /// `--behaviour`: rounds abandoned mid-training, drop-offs in all, and devices that were
    /// offline when the run ended (they could not reconnect to a coordinator that had finished).
    pub abandoned: u32,
    pub drop_offs: u32,
    pub offline_at_end: usize,
    pub fatal: Vec<(String, String)>,
    pub transient: Vec<(String, String)>,
    pub stopped: Vec<(String, String)>,
}

impl SimReport {
    /// Prints the outcome; returns the exit code: 2 if a device was refused, 130 if stopped, 1 if
    /// one gave up, else 0.
    pub fn print(&self, clients: usize) -> i32 {
        let rounds: u32 = self.rounds_trained.values().sum();
        println!(
            "sim: {} of {clients} device(s) finished, {rounds} local round(s) trained in all; {} refused, {} gave up, \
             {} stopped",
            self.finished,
            self.fatal.len(),
            self.transient.len(),
            self.stopped.len()
        );
        if self.drop_offs > 0 {
            println!(
                "sim: {} drop-off(s), {} of them mid-training (rounds abandoned); {} device(s) offline when the run ended",
                self.drop_offs, self.abandoned, self.offline_at_end
            );
        }
        for (id, message) in self.fatal.iter().chain(&self.transient).chain(&self.stopped) {
            eprintln!("device {id}: {message}");
        }
        match (self.fatal.is_empty(), self.stopped.is_empty(), self.transient.is_empty()) {
            (false, _, _) => 2,
            (true, false, _) => 130,
            (true, true, false) => 1,
            (true, true, true) => 0,
        }
    }
}

/// `--data-share-by-rank`: a number ≥ 0, for a partitioned data set.
pub fn check_data_share(power: f64, partitioned: bool) -> Result<()> {
    anyhow::ensure!(power.is_finite() && power >= 0.0, "--data-share-by-rank must be a number ≥ 0, got {power}");
    anyhow::ensure!(
        power == 0.0 || partitioned,
        "--data-share-by-rank applies to a partitioned data set (--partition)"
    );
    Ok(())
}

/// The kits the simulator takes (the first `--clients` usable ones by id), announced with what
/// was skipped; too few is an error that says why.
fn usable_kits(settings: &SimSettings) -> Result<Vec<(String, KitPaths)>> {
    let found = device_kits(&settings.kits)?;
    if found.usable.len() < settings.clients {
        bail!(
            "{} holds {} usable device kits ({}), fewer than --clients {}; issue more with `flotilla-certs issue \
             devices`",
            settings.kits.display(),
            found.usable.len(),
            found.skipped(),
            settings.clients
        );
    }
    println!(
        "sim: {} device kit(s) from {}, {} of them usable ({}); taking the first {} by id",
        found.usable.len() + found.revoked.len() + found.foreign.len(),
        settings.kits.display(),
        found.usable.len(),
        found.skipped(),
        settings.clients
    );
    Ok(found.usable)
}

pub async fn run(settings: SimSettings) -> Result<SimReport> {
    let kits = usable_kits(&settings)?;
    let profiles = settings.mix.assign(settings.clients);
    let lowest_rank = profiles.iter().map(|p| p.rank).min().unwrap_or(1);
    let pool = TrainerPool::new(settings.concurrency, settings.threads)?;
    let endpoint = quic::endpoint(([0, 0, 0, 0], 0).into(), None, &settings.transport)?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut by_class: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for (index, ((id, kit), profile)) in kits.into_iter().take(settings.clients).zip(profiles).enumerate() {
        *by_class.entry((profile.class.clone(), profile.rank)).or_default() += 1;
        let mut source = settings.data.for_device(&id, settings.partition.map(|p| (p, index)));
        if let DataSource::Path { keep, .. } = &mut source {
            *keep = (f64::from(lowest_rank) / f64::from(profile.rank)).powf(settings.data_share_by_rank);
        }
        let behaviour = settings.behaviour.of(&profile.class);
        let seed = flotilla_wire::fingerprint::fnv1a(format!("{}/{id}", settings.behaviour_seed).as_bytes());
        let trainer = pool.trainer(source, crate::held_out::HeldOut::default())?;
        let trainer = std::sync::Arc::new(BehavingTrainer::new(trainer, behaviour, seed));
        let session = SessionSettings {
            kit,
            transport: settings.transport.clone(),
            renew_within: settings.renew_within,
            coordinator: settings.coordinator,
            server_name: settings.server_name.clone(),
            device_id: id.clone(),
            requested_rank: profile.rank,
            hardware: HardwareProfile { device_class: profile.class, cpu_cores: 1, memory_bytes: 0, cuda_devices: 0 },
            limits: FrameLimits::default(),
            max_attempts: settings.max_attempts,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            stop: trainer.stop_receiver(),
            progress: crate::progress::Progress::none(),
            base_store: settings.base_store.clone(),
            floor: crate::privacy_floor::PrivacyFloor::default(),
            budget: None,
        };
        let (endpoint, simulation) = (endpoint.clone(), settings.stop.clone());
        tasks.spawn(async move {
            let outcome = run_device(&endpoint, &trainer, &session, simulation).await;
            (id, outcome, trainer)
        });
    }
    let fleet: Vec<String> = by_class.iter().map(|((class, rank), n)| format!("{n}×{class}(rank {rank})")).collect();
    tracing::info!(
        clients = settings.clients,
        concurrency = settings.concurrency,
        "simulated fleet: {}",
        fleet.join(", ")
    );
    let mut report = SimReport::default();
    while let Some(joined) = tasks.join_next().await {
        let (id, outcome, trainer) = joined.context("a virtual device panicked")?;
        let (drop_offs, outcome) = outcome;
        report.drop_offs += drop_offs;
        report.abandoned += trainer.abandoned.load(std::sync::atomic::Ordering::Relaxed);
        report.rounds_trained.insert(id.clone(), trainer.rounds.load(std::sync::atomic::Ordering::Relaxed));
        match outcome {
            Ok(_) => report.finished += 1,
            // It dropped off and could not come back: the run had ended meanwhile.
            Err(SessionError::Transient(_)) if drop_offs > 0 => report.offline_at_end += 1,
            Err(SessionError::Fatal(message)) => {
                tracing::error!(device = %id, "virtual device stopped: {message}");
                report.fatal.push((id, message));
            }
            Err(SessionError::Transient(message)) => {
                tracing::warn!(device = %id, "virtual device gave up: {message}");
                report.transient.push((id, message));
            }
            Err(SessionError::Stopped(message)) => report.stopped.push((id, message)),
            // `session::run` reports a run that ended under a busy device as finished.
            Err(SessionError::RunOver(_)) => report.finished += 1,
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    Ok(report)
}

/// One virtual device: sessions until the run is over, with the drop-offs and offline periods its
/// behaviour draws between them; returns the drop-offs and the last session's outcome.
async fn run_device(
    endpoint: &quinn::Endpoint,
    trainer: &std::sync::Arc<BehavingTrainer<Trainer>>,
    session: &SessionSettings,
    simulation: tokio::sync::watch::Receiver<Stop>,
) -> (u32, Result<session::SessionReport, SessionError>) {
    let mut drop_offs = 0;
    loop {
        trainer.reconnecting(*simulation.borrow());
        let forward = {
            let (trainer, mut simulation) = (trainer.clone(), simulation.clone());
            tokio::spawn(async move {
                while simulation.changed().await.is_ok() {
                    let stop = *simulation.borrow();
                    trainer.forward(stop);
                }
            })
        };
        let outcome = session::run(endpoint, trainer.as_ref(), session).await;
        trainer.end_online();
        forward.abort();
        match outcome {
            // The device dropped off (not the simulation stopping): offline for a while, then back.
            Err(SessionError::Stopped(why)) if *simulation.borrow() == Stop::Running => {
                drop_offs += 1;
                let offline = trainer.next_offline();
                tracing::info!(device = %session.device_id, "dropped off ({why}); back in {offline:.1?}");
                tokio::time::sleep(offline).await;
            }
            other => return (drop_offs, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_proportional_interleaved_and_refuses_nonsense() {
        let mix: ProfileMix = "phone=3,laptop:4=2,gpu=1".parse().unwrap();
        let fleet = mix.assign(12);
        let count = |class: &str| fleet.iter().filter(|p| p.class == class).count();
        assert_eq!((count("phone"), count("laptop"), count("gpu")), (6, 4, 2));
        assert!(fleet.iter().all(|p| p.rank
            == match p.class.as_str() {
                "phone" => 2,
                "laptop" => 4,
                _ => 32,
            }));
        // Interleaved: the first half of the fleet already holds every class.
        let first: std::collections::BTreeSet<&str> = fleet[..6].iter().map(|p| p.class.as_str()).collect();
        assert_eq!(first.len(), 3, "{fleet:?}");
        // Any size, including fewer devices than classes.
        assert_eq!(mix.assign(1).len(), 1);
        assert_eq!(mix.assign(7).len(), 7);
        for bad in ["", "toaster=1", "phone=x", "phone:0=1", "phone=0", "laptop:y=1"] {
            assert!(bad.parse::<ProfileMix>().is_err(), "{bad}");
        }
    }
}
