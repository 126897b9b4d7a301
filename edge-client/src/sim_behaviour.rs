//! How the simulator's virtual devices behave, per device class, so that a simulated fleet behaves
//! like a field trial's (`flotilla-edge sim --behaviour`): slower devices, devices that come and
//! go, and devices that vanish mid-training.
//!
//! - `speed=F`: local training takes F times as long (F ≥ 1: the device trains, then waits
//!   (F − 1) times the training time before it answers).
//! - `online=S,offline=T`: the device stays connected for an exponentially distributed time of
//!   mean S seconds, then drops off (abandoning whatever it was doing) for a mean of T seconds,
//!   then reconnects. Without `online` it stays connected.
//! - `drop=P`: each round's training is abandoned with probability P, the device dropping off as
//!   above (for `offline` seconds, 1 s when unset).
//!
//! Each device's draws come from a generator seeded by `--behaviour-seed` and its id, so a rerun
//! behaves the same.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use tokio::sync::watch;

use crate::local_trainer::{
    BaseFailure, BaseSource, HeldOutResult, LocalTrainer, Scoring, TrainedUpdate, UpdateShaping,
};
use crate::session::Stop;

/// One device class's behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    pub speed: f64,
    /// Mean seconds online between drop-offs; None: always online.
    pub online_secs: Option<f64>,
    /// Mean seconds offline after a drop-off.
    pub offline_secs: f64,
    /// Probability that a round's training is abandoned.
    pub drop: f64,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour { speed: 1.0, online_secs: None, offline_secs: 1.0, drop: 0.0 }
    }
}

/// `class:key=value,...;class:...`, e.g. `phone:speed=5,drop=0.1,online=600,offline=60;laptop:speed=2`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BehaviourMix(pub BTreeMap<String, Behaviour>);

impl FromStr for BehaviourMix {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut classes = BTreeMap::new();
        for item in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (class, settings) =
                item.split_once(':').ok_or_else(|| format!("'{item}': expected class:key=value,..."))?;
            let mut behaviour = Behaviour::default();
            for setting in settings.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let (key, value) = setting.split_once('=').ok_or_else(|| format!("'{setting}': expected key=value"))?;
                let number: f64 = value.parse().map_err(|_| format!("'{setting}': the value must be a number"))?;
                let bad = |range: &str| Err(format!("'{setting}': {key} must be {range}"));
                match key {
                    "speed" if number >= 1.0 && number.is_finite() => behaviour.speed = number,
                    "speed" => return bad("a number ≥ 1 (how many times slower)"),
                    "online" if number > 0.0 && number.is_finite() => behaviour.online_secs = Some(number),
                    "online" => return bad("a positive number of seconds"),
                    "offline" if number >= 0.0 && number.is_finite() => behaviour.offline_secs = number,
                    "offline" => return bad("a number of seconds ≥ 0"),
                    "drop" if (0.0..=1.0).contains(&number) => behaviour.drop = number,
                    "drop" => return bad("a probability in [0, 1]"),
                    other => return Err(format!("'{setting}': unknown key '{other}' (speed, online, offline, drop)")),
                }
            }
            if class.is_empty() || classes.insert(class.to_string(), behaviour).is_some() {
                return Err(format!("'{item}': a class named once, before the ':'"));
            }
        }
        Ok(BehaviourMix(classes))
    }
}

impl BehaviourMix {
    /// The behaviour of a device of `class` (the default: a steady, full-speed device).
    pub fn of(&self, class: &str) -> Behaviour {
        self.0.get(class).cloned().unwrap_or_default()
    }
}

/// A device's behaviour in action: it wraps the device's trainer (slowing and abandoning rounds)
/// and owns the session's stop channel (to drop the device off).
pub struct BehavingTrainer<T> {
    inner: T,
    behaviour: Behaviour,
    rng: Mutex<ChaCha20Rng>,
    stop: std::sync::Arc<watch::Sender<Stop>>,
    /// The drop-off of the current connection, drawn when it is admitted.
    online: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Rounds trained and answered, over every connection of the device.
    pub rounds: AtomicU32,
    /// Drop-offs: rounds abandoned, and times offline.
    pub abandoned: AtomicU32,
}

impl<T: LocalTrainer> BehavingTrainer<T> {
    pub fn new(inner: T, behaviour: Behaviour, seed: u64) -> BehavingTrainer<T> {
        let (stop, _) = watch::channel(Stop::Running);
        BehavingTrainer {
            inner,
            behaviour,
            rng: Mutex::new(ChaCha20Rng::seed_from_u64(seed)),
            stop: std::sync::Arc::new(stop),
            online: Mutex::new(None),
            rounds: AtomicU32::new(0),
            abandoned: AtomicU32::new(0),
        }
    }

    /// The stop channel a session of this device watches.
    pub fn stop_receiver(&self) -> watch::Receiver<Stop> {
        self.stop.subscribe()
    }

    /// Passes a stop request of the whole simulation on to this device's session.
    pub fn forward(&self, stop: Stop) {
        let _ = self.stop.send(stop.max(*self.stop.borrow()));
    }

    /// Drops the device off now: its session abandons what it is doing.
    pub fn drop_off(&self) {
        let _ = self.stop.send(Stop::Now);
    }

    /// Before reconnecting: the device is running again (unless the whole simulation stops).
    pub fn reconnecting(&self, simulation: Stop) {
        let _ = self.stop.send(simulation);
    }

    fn draw(&self, f: impl FnOnce(&mut ChaCha20Rng) -> f64) -> f64 {
        match self.rng.lock() {
            Ok(mut rng) => f(&mut rng),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// A connection was admitted: its drop-off is drawn (never, without `online`). Only a
    /// connected device drops off, so one that cannot reach the coordinator any more gives up.
    fn start_online(&self) {
        let Some(mean) = self.behaviour.online_secs else { return };
        let after = Duration::from_secs_f64(self.draw(|rng| exponential(rng, mean)));
        let stop = self.stop.clone();
        let timer = tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = stop.send(Stop::Now);
        });
        if let Some(previous) = self.lock_online().replace(timer) {
            previous.abort();
        }
    }

    /// The session ended: its drop-off will not come.
    pub fn end_online(&self) {
        if let Some(timer) = self.lock_online().take() {
            timer.abort();
        }
    }

    fn lock_online(&self) -> std::sync::MutexGuard<'_, Option<tokio::task::JoinHandle<()>>> {
        self.online.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long to stay offline after a drop-off.
    pub fn next_offline(&self) -> Duration {
        let mean = self.behaviour.offline_secs;
        Duration::from_secs_f64(if mean > 0.0 { self.draw(|rng| exponential(rng, mean)) } else { 0.0 })
    }
}

/// An exponentially distributed draw of mean `mean`.
fn exponential(rng: &mut ChaCha20Rng, mean: f64) -> f64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    -mean * u.ln()
}

impl<T: LocalTrainer> LocalTrainer for BehavingTrainer<T> {
    async fn set_base(
        &self,
        architecture: flotilla_wire::model::Architecture,
        scale: f64,
        base: BaseSource,
        evaluation: Option<flotilla_wire::evaluation::EvaluationPlan>,
    ) -> Result<(), BaseFailure> {
        self.inner.set_base(architecture, scale, base, evaluation).await?;
        self.start_online();
        Ok(())
    }

    async fn evaluate(
        &self,
        slice: flotilla_wire::tensor::WireTensors,
        scoring: Scoring,
    ) -> anyhow::Result<HeldOutResult> {
        self.inner.evaluate(slice, scoring).await
    }

    async fn train(
        &self,
        slice: flotilla_wire::tensor::WireTensors,
        rank: u32,
        settings: flotilla_wire::protocol::TrainingSettings,
        shaping: UpdateShaping,
    ) -> anyhow::Result<TrainedUpdate> {
        let abandon = self.draw(|rng| rng.random::<f64>()) < self.behaviour.drop;
        let started = Instant::now();
        let trained = self.inner.train(slice, rank, settings, shaping).await?;
        let slower = started.elapsed().mul_f64(self.behaviour.speed - 1.0);
        if abandon {
            // Halfway through its (slower) training the device vanishes: the session sees the
            // stop and abandons the round; this future never answers.
            tokio::time::sleep(slower / 2).await;
            self.abandoned.fetch_add(1, Ordering::Relaxed);
            self.drop_off();
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(slower).await;
        self.rounds.fetch_add(1, Ordering::Relaxed);
        Ok(trained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaviours_parse_per_class_and_nonsense_is_refused() {
        let mix: BehaviourMix = "phone:speed=5,drop=0.1,online=600,offline=60; laptop:speed=2".parse().unwrap();
        assert_eq!(mix.of("phone"), Behaviour { speed: 5.0, online_secs: Some(600.0), offline_secs: 60.0, drop: 0.1 });
        assert_eq!(mix.of("laptop"), Behaviour { speed: 2.0, ..Behaviour::default() });
        assert_eq!(mix.of("gpu"), Behaviour::default());
        assert_eq!("".parse::<BehaviourMix>().unwrap(), BehaviourMix::default());
        for bad in [
            "phone",
            "phone:speed",
            "phone:speed=0.5",
            "phone:drop=2",
            "phone:online=0",
            "phone:offline=-1",
            "phone:colour=3",
            "phone:speed=x",
            ":speed=2",
            "phone:speed=2;phone:drop=0.1",
        ] {
            assert!(bad.parse::<BehaviourMix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn exponential_draws_have_the_mean_asked_for() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let n = 20_000;
        let mean = (0..n).map(|_| exponential(&mut rng, 30.0)).sum::<f64>() / n as f64;
        // The standard error of the mean is 30 / √20000 ≈ 0.21.
        assert!((mean - 30.0).abs() < 1.0, "{mean}");
    }
}
