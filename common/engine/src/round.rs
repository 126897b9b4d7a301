//! The round engine: a pure state machine. Events in, actions out; no I/O and no clock of its own
//! (deadlines are requested as timer actions and come back as events), so every path can be driven
//! in tests with virtual time.
//!
//! Phases: waiting for devices → training (deadline) → aggregating → next round or finished.
//!
//! A round samples its participants from the connected devices with the run's [`RoundPolicy`]
//! (a fraction, at least `min_participants`), reproducibly from the seed and the round. It closes when every participant has answered, or once `min_updates`
//! updates are in and the grace period after that quorum has passed. At the deadline, a round
//! short of its quorum is extended once. If the extension also ends short, the round is skipped:
//! its partial aggregate is discarded and the global adapter stays as it was.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::policy::RoundPolicy;

use crate::DeviceId;

#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    pub rounds: u32,
    /// Devices that must be connected before a round starts.
    pub min_devices: usize,
    /// Updates that make a round's quorum.
    pub min_updates: usize,
    pub round_deadline: Duration,
    /// How long to wait for stragglers once the quorum is in.
    pub grace: Duration,
    /// The first round to run: 1, or the round after the checkpoint a restarted run resumes from.
    pub first_round: u32,
    /// Sampling, seeds and training settings of each round.
    pub policy: RoundPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Deadline,
    Grace,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    DeviceJoined {
        device: DeviceId,
        rank: u32,
    },
    DeviceLeft {
        device: DeviceId,
    },
    /// An update frame arrived; the engine decides whether it may be folded in.
    UpdateArrived {
        device: DeviceId,
        round: u32,
        /// The rank the update declares; it may not exceed the rank the device was assigned.
        rank: u32,
    },
    /// The aggregator validated and folded the update.
    UpdateFolded {
        device: DeviceId,
        round: u32,
    },
    /// The aggregator rejected the update as invalid.
    UpdateInvalid {
        device: DeviceId,
        round: u32,
    },
    TimerFired {
        round: u32,
        timer: Timer,
    },
    AggregationDone {
        round: u32,
    },
}

/// Why the engine refused an update (a bounded label for metrics; the reason text says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    Stale,
    FutureRound,
    RankAboveAssigned,
    Duplicate,
    Dropped,
    NotParticipant,
    NoRound,
}

impl RejectKind {
    pub fn label(self) -> &'static str {
        match self {
            RejectKind::Stale => "stale",
            RejectKind::FutureRound => "future_round",
            RejectKind::RankAboveAssigned => "rank_above_assigned",
            RejectKind::Duplicate => "duplicate",
            RejectKind::Dropped => "dropped",
            RejectKind::NotParticipant => "not_participant",
            RejectKind::NoRound => "no_round",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SendTask {
        device: DeviceId,
        round: u32,
        rank: u32,
    },
    FoldUpdate {
        device: DeviceId,
        round: u32,
    },
    RejectUpdate {
        device: DeviceId,
        round: u32,
        kind: RejectKind,
        reason: String,
    },
    ScheduleTimer {
        round: u32,
        timer: Timer,
        after: Duration,
    },
    Aggregate {
        round: u32,
        updates: usize,
    },
    /// The round ended short of its quorum, or its draw was refused: discard what was folded,
    /// keep the global adapter.
    SkipRound {
        round: u32,
        updates: usize,
        why: SkipWhy,
    },
    Finish {
        rounds_completed: u32,
    },
}

/// Why a round was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipWhy {
    /// Fewer updates than the quorum came in by the (extended) deadline.
    ShortOfQuorum,
    /// The draw was outside the sizes a round can run with ([`crate::RoundSize`]): no task was sent.
    DrawRefused(String),
}

impl SkipWhy {
    /// A bounded label, for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SkipWhy::ShortOfQuorum => "short_of_quorum",
            SkipWhy::DrawRefused(_) => "draw_refused",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Participation {
    Training = 0,
    Folding = 1,
    Folded = 2,
    Failed = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    WaitingForDevices,
    Training { round: u32 },
    Aggregating { round: u32 },
    Finished,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::WaitingForDevices => "waiting_for_devices",
            Phase::Training { .. } => "training",
            Phase::Aggregating { .. } => "aggregating",
            Phase::Finished => "finished",
        }
    }
}

/// Participants counted by state, and the connected ones by rank.
#[derive(Debug, Default)]
struct Tally {
    by_state: [usize; 4],
    by_rank: BTreeMap<u32, usize>,
}

impl Tally {
    fn add_rank(&mut self, rank: u32) {
        *self.by_rank.entry(rank).or_insert(0) += 1;
    }

    fn remove_rank(&mut self, rank: u32) {
        if let Some(count) = self.by_rank.get_mut(&rank) {
            *count -= 1;
            if *count == 0 {
                self.by_rank.remove(&rank);
            }
        }
    }
}

pub struct Engine {
    config: EngineConfig,
    connected: BTreeMap<DeviceId, u32>,
    /// The connected devices by rank when the current round drew its participants.
    population_by_rank: BTreeMap<u32, usize>,
    phase: Phase,
    next_round: u32,
    participants: BTreeMap<DeviceId, Participation>,
    /// The participants counted by state and (while connected) by rank, kept as they change, so
    /// that every event costs O(log n): with 10,000 devices, recounting them on each of the round's
    /// 20,000 events made the round quadratic.
    tally: Tally,
    deadline_extended: bool,
    /// The round's (last) deadline has fired: a round short of its quorum may now be skipped.
    deadline_passed: bool,
    grace_started: bool,
    rounds_completed: u32,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        let first = config.first_round.max(1);
        Engine {
            config,
            connected: BTreeMap::new(),
            population_by_rank: BTreeMap::new(),
            phase: Phase::WaitingForDevices,
            next_round: first,
            participants: BTreeMap::new(),
            tally: Tally::default(),
            deadline_extended: false,
            deadline_passed: false,
            grace_started: false,
            rounds_completed: first - 1,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn connected(&self) -> usize {
        self.connected.len()
    }

    /// The run's per-round policy (sampling, seeds, training settings).
    pub fn policy(&self) -> &RoundPolicy {
        &self.config.policy
    }

    /// The devices connected when the current (or last) round drew its participants, counted by
    /// rank: the population its sampling rate applies to.
    pub fn population_by_rank(&self) -> &BTreeMap<u32, usize> {
        &self.population_by_rank
    }

    /// Devices taking part in the current round (and connected), counted by rank.
    pub fn participants_by_rank(&self) -> &BTreeMap<u32, usize> {
        &self.tally.by_rank
    }

    /// Sets a device's participation, keeping the tally.
    fn set_participation(&mut self, device: DeviceId, state: Participation) {
        match self.participants.get(&device).copied() {
            Some(old) => self.tally.by_state[old as usize] -= 1,
            None => {
                if let Some(&rank) = self.connected.get(&device) {
                    self.tally.add_rank(rank);
                }
            }
        }
        self.tally.by_state[state as usize] += 1;
        self.participants.insert(device, state);
    }

    /// Replaces the participants (a new round, or none), recounting them once.
    fn reset_participants(&mut self, participants: BTreeMap<DeviceId, Participation>) {
        self.participants = participants;
        self.tally = Tally::default();
        for (device, &state) in &self.participants {
            self.tally.by_state[state as usize] += 1;
            if let Some(&rank) = self.connected.get(device) {
                self.tally.add_rank(rank);
            }
        }
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::DeviceJoined { device, rank } => {
                // A device that (re)joins mid-round waits for the next round.
                let previous = self.connected.insert(device.clone(), rank);
                if self.participants.contains_key(&device) {
                    if let Some(old) = previous {
                        self.tally.remove_rank(old);
                    }
                    self.tally.add_rank(rank);
                }
                if self.phase == Phase::WaitingForDevices {
                    self.try_start_round(&mut actions);
                }
            }
            Event::DeviceLeft { device } => {
                let state = self.participants.get(&device).copied();
                if let (Some(rank), Some(_)) = (self.connected.remove(&device), state) {
                    self.tally.remove_rank(rank);
                }
                if state == Some(Participation::Training) {
                    self.set_participation(device, Participation::Failed);
                }
                self.maybe_close_round(&mut actions);
            }
            Event::UpdateArrived { device, round, rank } => match self.refusal(&device, round, rank) {
                None => {
                    self.set_participation(device.clone(), Participation::Folding);
                    actions.push(Action::FoldUpdate { device, round });
                }
                Some((kind, reason)) => actions.push(Action::RejectUpdate { device, round, kind, reason }),
            },
            Event::UpdateFolded { device, round } | Event::UpdateInvalid { device, round }
                if self.phase != (Phase::Training { round }) =>
            {
                // Fold results are only awaited while the round trains; anything else is a bug in
                // the driver, but it must not wedge the engine.
                tracing::warn!(%device, round, "fold result outside its round ignored");
            }
            Event::UpdateFolded { device, .. } => {
                self.set_participation(device, Participation::Folded);
                self.maybe_close_round(&mut actions);
            }
            Event::UpdateInvalid { device, .. } => {
                self.set_participation(device, Participation::Failed);
                self.maybe_close_round(&mut actions);
            }
            Event::TimerFired { round, timer } if self.phase == (Phase::Training { round }) => match timer {
                // Extended only for devices still training: nobody else can still reach the quorum.
                Timer::Deadline if self.folded() < self.quorum() && !self.deadline_extended && self.pending() => {
                    self.deadline_extended = true;
                    actions.push(Action::ScheduleTimer {
                        round,
                        timer: Timer::Deadline,
                        after: self.config.round_deadline,
                    });
                }
                Timer::Deadline | Timer::Grace => {
                    self.deadline_passed |= timer == Timer::Deadline;
                    self.drop_stragglers();
                    self.maybe_close_round(&mut actions);
                }
            },
            Event::TimerFired { .. } => {} // a timer of a round that is over
            Event::AggregationDone { round } => {
                if self.phase == (Phase::Aggregating { round }) {
                    self.rounds_completed += 1;
                    self.next_round_or_finish(&mut actions);
                }
            }
        }
        actions
    }

    fn refusal(&self, device: &str, round: u32, rank: u32) -> Option<(RejectKind, String)> {
        let assigned = self.connected.get(device).copied();
        match (&self.phase, self.participants.get(device)) {
            (Phase::Training { round: current }, _) if round < *current => {
                Some((RejectKind::Stale, format!("stale update for round {round}; round {current} is running")))
            }
            (Phase::Training { round: current }, _) if round > *current => Some((
                RejectKind::FutureRound,
                format!("update for round {round}, which has not started; round {current} is running"),
            )),
            (Phase::Training { .. }, Some(Participation::Training)) if assigned.is_some_and(|a| rank > a) => Some((
                RejectKind::RankAboveAssigned,
                format!("update of rank {rank} is above the rank {} this device was assigned", assigned.unwrap_or(0)),
            )),
            (Phase::Training { .. }, Some(Participation::Training)) => None,
            (Phase::Training { .. }, Some(Participation::Failed)) => {
                Some((RejectKind::Dropped, "this device was dropped from the round".into()))
            }
            (Phase::Training { .. }, Some(_)) => {
                Some((RejectKind::Duplicate, "duplicate update for this round".into()))
            }
            (Phase::Training { .. }, None) => {
                Some((RejectKind::NotParticipant, "this device is not part of the round".into()))
            }
            _ => Some((RejectKind::NoRound, format!("no round is accepting updates (update was for round {round})"))),
        }
    }

    fn folded(&self) -> usize {
        self.tally.by_state[Participation::Folded as usize]
    }

    /// The quorum, never more than the round's participants.
    fn quorum(&self) -> usize {
        self.config.min_updates.clamp(1, self.participants.len().max(1))
    }

    fn drop_stragglers(&mut self) {
        for state in self.participants.values_mut() {
            if *state == Participation::Training {
                *state = Participation::Failed;
            }
        }
        let stragglers = std::mem::take(&mut self.tally.by_state[Participation::Training as usize]);
        self.tally.by_state[Participation::Failed as usize] += stragglers;
    }

    fn try_start_round(&mut self, actions: &mut Vec<Action>) {
        if self.connected.len() < self.config.min_devices.max(1) {
            self.phase = Phase::WaitingForDevices;
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        self.phase = Phase::Training { round };
        self.deadline_extended = false;
        self.deadline_passed = false;
        self.grace_started = false;
        let connected: Vec<(&DeviceId, &u32)> = self.connected.iter().collect();
        let drawn = self.config.policy.sample(round, &connected);
        self.population_by_rank.clear();
        for &rank in self.connected.values() {
            *self.population_by_rank.entry(rank).or_default() += 1;
        }
        let chosen = match drawn {
            Ok(chosen) => chosen,
            Err(refused) => {
                // Nothing is sent: a round that cannot run as configured is not run another way.
                self.reset_participants(BTreeMap::new());
                actions.push(Action::SkipRound { round, updates: 0, why: SkipWhy::DrawRefused(refused.reason) });
                return self.next_round_or_finish(actions);
            }
        };
        self.reset_participants(chosen.iter().map(|(d, _)| (d.clone(), Participation::Training)).collect());
        let drew_none = chosen.is_empty();
        for (device, rank) in chosen {
            actions.push(Action::SendTask { device, round, rank });
        }
        actions.push(Action::ScheduleTimer { round, timer: Timer::Deadline, after: self.config.round_deadline });
        if drew_none {
            // Poisson sampling drew no device: nothing can arrive, so the round closes now.
            self.maybe_close_round(actions);
        }
    }

    /// Whether a participant may still contribute (training, or its update being folded).
    fn pending(&self) -> bool {
        self.tally.by_state[Participation::Training as usize] + self.tally.by_state[Participation::Folding as usize] > 0
    }

    /// Closes the round when no participant can still contribute; starts the grace period once the
    /// quorum is in. A round short of its quorum is skipped only at its deadline, even when every
    /// participant has already failed or left: devices that fail at once (broken data, a crash
    /// loop) then cost one round per deadline instead of the whole run in seconds, and the
    /// operator has the deadline to notice. A draw of no device closes at once.
    fn maybe_close_round(&mut self, actions: &mut Vec<Action>) {
        let Phase::Training { round } = self.phase else { return };
        let pending = self.pending();
        let updates = self.folded();
        if pending {
            if updates >= self.quorum() && !self.grace_started {
                self.grace_started = true;
                actions.push(Action::ScheduleTimer { round, timer: Timer::Grace, after: self.config.grace });
            }
            return;
        }
        if updates >= self.quorum() {
            self.phase = Phase::Aggregating { round };
            actions.push(Action::Aggregate { round, updates });
        } else if !self.deadline_passed && !self.participants.is_empty() {
            // Short of the quorum with nobody left to answer: wait for the deadline (see above).
        } else {
            actions.push(Action::SkipRound { round, updates, why: SkipWhy::ShortOfQuorum });
            self.next_round_or_finish(actions);
        }
    }

    fn next_round_or_finish(&mut self, actions: &mut Vec<Action>) {
        self.reset_participants(BTreeMap::new());
        if self.next_round > self.config.rounds {
            self.phase = Phase::Finished;
            actions.push(Action::Finish { rounds_completed: self.rounds_completed });
        } else {
            self.try_start_round(actions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    const DEADLINE: Duration = Duration::from_secs(30);
    const GRACE: Duration = Duration::from_secs(5);

    fn config(rounds: u32, min_devices: usize) -> EngineConfig {
        EngineConfig {
            rounds,
            min_devices,
            min_updates: 1,
            round_deadline: DEADLINE,
            grace: GRACE,
            first_round: 1,
            policy: RoundPolicy {
                seed: 7,
                fraction: 1.0,
                min_participants: min_devices,
                sampling: crate::Sampling::FixedSize,
                round_size: crate::RoundSize::default(),
                training: crate::TrainingPlan {
                    local_steps: 1,
                    local_epochs: 0,
                    batch_size: 1,
                    learning_rate: 0.1,
                    seed: 0,
                },
            },
        }
    }

    /// `config` sampling `fraction` of the connected devices (and at least `min_participants`).
    fn sampled(mut config: EngineConfig, fraction: f64, min_participants: Option<usize>, seed: u64) -> EngineConfig {
        config.policy.fraction = fraction;
        if let Some(min) = min_participants {
            config.policy.min_participants = min;
        }
        config.policy.seed = seed;
        config
    }

    fn engine(rounds: u32, min_devices: usize) -> Engine {
        Engine::new(config(rounds, min_devices))
    }

    fn join(e: &mut Engine, device: &str, rank: u32) -> Vec<Action> {
        e.handle(Event::DeviceJoined { device: device.into(), rank })
    }

    fn upload(e: &mut Engine, device: &str, round: u32) -> Vec<Action> {
        let mut actions = e.handle(Event::UpdateArrived { device: device.into(), round, rank: 1 });
        if actions == vec![Action::FoldUpdate { device: device.into(), round }] {
            actions = e.handle(Event::UpdateFolded { device: device.into(), round });
        }
        actions
    }

    fn fire(e: &mut Engine, round: u32, timer: Timer) -> Vec<Action> {
        e.handle(Event::TimerFired { round, timer })
    }

    fn tasks(actions: &[Action]) -> Vec<&str> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendTask { device, .. } => Some(device.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn waits_for_devices_then_runs_all_rounds() {
        let mut e = engine(2, 3);
        assert!(join(&mut e, "a", 2).is_empty());
        assert!(join(&mut e, "b", 4).is_empty());
        let start = join(&mut e, "c", 8);
        assert_eq!(tasks(&start), vec!["a", "b", "c"]);
        assert!(start.contains(&Action::SendTask { device: "c".into(), round: 1, rank: 8 }));
        assert!(start.contains(&Action::ScheduleTimer { round: 1, timer: Timer::Deadline, after: DEADLINE }));
        // The quorum (1) is in after the first update: the grace period starts once.
        assert_eq!(upload(&mut e, "a", 1), vec![Action::ScheduleTimer { round: 1, timer: Timer::Grace, after: GRACE }]);
        assert!(upload(&mut e, "b", 1).is_empty());
        assert_eq!(upload(&mut e, "c", 1), vec![Action::Aggregate { round: 1, updates: 3 }]);
        let next = e.handle(Event::AggregationDone { round: 1 });
        assert!(next.contains(&Action::SendTask { device: "a".into(), round: 2, rank: 2 }));
        for d in ["a", "b"] {
            upload(&mut e, d, 2);
        }
        assert_eq!(upload(&mut e, "c", 2), vec![Action::Aggregate { round: 2, updates: 3 }]);
        assert_eq!(e.handle(Event::AggregationDone { round: 2 }), vec![Action::Finish { rounds_completed: 2 }]);
        assert_eq!(e.phase(), &Phase::Finished);
    }

    #[test]
    fn a_poisson_round_that_draws_no_device_is_skipped_at_once_and_the_population_is_kept() {
        let mut config = sampled(config(3, 2), 1e-12, Some(2), 5);
        config.policy.sampling = crate::Sampling::Poisson;
        let mut e = Engine::new(config);
        join(&mut e, "a", 2);
        let actions = join(&mut e, "b", 8);
        // At q = 1e-12 no device is drawn: each round is skipped without waiting for its
        // deadline, and the run finishes.
        assert!(tasks(&actions).is_empty(), "{actions:?}");
        for round in 1..=3 {
            assert!(
                actions.contains(&Action::SkipRound { round, updates: 0, why: SkipWhy::ShortOfQuorum }),
                "{actions:?}"
            );
        }
        assert!(actions.contains(&Action::Finish { rounds_completed: 0 }));
        assert_eq!(e.population_by_rank(), &BTreeMap::from([(2, 1), (8, 1)]));
    }

    #[test]
    fn a_draw_outside_the_round_sizes_sends_no_task_and_skips_the_round() {
        // Secure aggregation cannot secure a round of fewer than 3: a Poisson draw of 1 or 2
        // devices sends nothing at all (it is not downgraded to a plain round).
        let mut config = sampled(config(40, 2), 0.5, None, 5);
        config.policy.sampling = crate::Sampling::Poisson;
        config.policy.round_size = crate::RoundSize { min: 3, max: 3 };
        let mut e = Engine::new(config);
        join(&mut e, "a", 2);
        let mut actions = join(&mut e, "b", 8);
        // Two devices: every draw of one or two is refused, a draw of none is skipped too.
        assert!(tasks(&actions).is_empty(), "{actions:?}");
        let refused =
            actions.iter().filter(|a| matches!(a, Action::SkipRound { why: SkipWhy::DrawRefused(_), .. })).count();
        assert!(refused > 20, "about 3 in 4 of 40 draws take one or two devices: {refused}");
        assert!(actions.contains(&Action::Finish { rounds_completed: 0 }));
        actions.retain(|a| matches!(a, Action::SkipRound { why: SkipWhy::DrawRefused(_), .. }));
        let Action::SkipRound { why: SkipWhy::DrawRefused(reason), updates: 0, .. } = &actions[0] else {
            unreachable!()
        };
        assert!(reason.contains("needs at least 3"), "{reason}");
    }

    #[test]
    fn the_grace_period_after_the_quorum_drops_stragglers() {
        let mut e = Engine::new(EngineConfig { min_updates: 2, ..config(1, 3) });
        for d in ["a", "b", "c"] {
            join(&mut e, d, 4);
        }
        assert!(upload(&mut e, "a", 1).is_empty(), "quorum of 2 not yet reached");
        assert_eq!(upload(&mut e, "b", 1), vec![Action::ScheduleTimer { round: 1, timer: Timer::Grace, after: GRACE }]);
        assert_eq!(fire(&mut e, 1, Timer::Grace), vec![Action::Aggregate { round: 1, updates: 2 }]);
        let late = e.handle(Event::UpdateArrived { device: "c".into(), round: 1, rank: 1 });
        assert!(matches!(&late[..], [Action::RejectUpdate { kind: RejectKind::NoRound, .. }]), "{late:?}");
    }

    #[test]
    fn short_of_quorum_the_deadline_is_extended_once_then_the_round_is_skipped() {
        let mut e = Engine::new(EngineConfig { min_updates: 2, ..config(2, 2) });
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        assert_eq!(
            fire(&mut e, 1, Timer::Deadline),
            vec![Action::ScheduleTimer { round: 1, timer: Timer::Deadline, after: DEADLINE }],
            "first deadline short of quorum: extend"
        );
        let skipped = fire(&mut e, 1, Timer::Deadline);
        assert_eq!(skipped[0], Action::SkipRound { round: 1, updates: 1, why: SkipWhy::ShortOfQuorum });
        assert_eq!(tasks(&skipped), vec!["a", "b"], "the next round starts");
        // Reaching the quorum after an extension aggregates as usual.
        upload(&mut e, "a", 2);
        fire(&mut e, 2, Timer::Deadline);
        assert_eq!(upload(&mut e, "b", 2), vec![Action::Aggregate { round: 2, updates: 2 }]);
    }

    #[test]
    fn stragglers_are_dropped_at_the_deadline_and_their_late_updates_rejected() {
        let mut e = engine(1, 2);
        join(&mut e, "fast", 2);
        join(&mut e, "slow", 2);
        upload(&mut e, "fast", 1);
        assert_eq!(fire(&mut e, 1, Timer::Deadline), vec![Action::Aggregate { round: 1, updates: 1 }]);
        let late = e.handle(Event::UpdateArrived { device: "slow".into(), round: 1, rank: 1 });
        assert!(matches!(&late[..], [Action::RejectUpdate { .. }]));
    }

    #[test]
    fn a_device_leaving_mid_round_never_blocks_it() {
        let mut e = engine(1, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        assert_eq!(
            e.handle(Event::DeviceLeft { device: "b".into() }),
            vec![Action::Aggregate { round: 1, updates: 1 }]
        );
    }

    #[test]
    fn a_round_without_updates_is_skipped() {
        let mut e = engine(2, 1);
        join(&mut e, "a", 2);
        fire(&mut e, 1, Timer::Deadline); // extended once
        let actions = fire(&mut e, 1, Timer::Deadline);
        assert_eq!(actions[0], Action::SkipRound { round: 1, updates: 0, why: SkipWhy::ShortOfQuorum });
        assert!(actions.contains(&Action::SendTask { device: "a".into(), round: 2, rank: 2 }));
    }

    #[test]
    fn duplicates_stale_rounds_and_strangers_are_rejected() {
        let mut e = Engine::new(EngineConfig { min_updates: 2, ..config(1, 2) });
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        let dup = e.handle(Event::UpdateArrived { device: "a".into(), round: 1, rank: 1 });
        assert!(matches!(&dup[..], [Action::RejectUpdate { kind: RejectKind::Duplicate, .. }]));
        let stale = e.handle(Event::UpdateArrived { device: "b".into(), round: 0, rank: 1 });
        assert!(matches!(&stale[..], [Action::RejectUpdate { kind: RejectKind::Stale, .. }]));
        join(&mut e, "late-joiner", 4);
        let stranger = e.handle(Event::UpdateArrived { device: "late-joiner".into(), round: 1, rank: 1 });
        assert!(matches!(&stranger[..], [Action::RejectUpdate { kind: RejectKind::NotParticipant, .. }]));
        let future = e.handle(Event::UpdateArrived { device: "b".into(), round: 2, rank: 1 });
        assert!(matches!(&future[..], [Action::RejectUpdate { kind: RejectKind::FutureRound, .. }]));
        // b was assigned rank 2: a rank-4 update is refused and b may still send a proper one.
        let greedy = e.handle(Event::UpdateArrived { device: "b".into(), round: 1, rank: 4 });
        assert!(matches!(&greedy[..], [Action::RejectUpdate { kind: RejectKind::RankAboveAssigned, .. }]));
        let proper = e.handle(Event::UpdateArrived { device: "b".into(), round: 1, rank: 2 });
        assert_eq!(proper, vec![Action::FoldUpdate { device: "b".into(), round: 1 }]);
        // Timers of other rounds are ignored.
        assert!(fire(&mut e, 7, Timer::Deadline).is_empty());
    }

    #[test]
    fn a_device_reconnecting_mid_round_gets_the_next_round() {
        let mut e = engine(2, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        // b drops out and comes back while round 1 is still open: it is out of round 1 ...
        let left = e.handle(Event::DeviceLeft { device: "b".into() });
        assert_eq!(left, vec![Action::Aggregate { round: 1, updates: 1 }]);
        assert!(join(&mut e, "b", 2).is_empty());
        // ... and in round 2.
        let next = e.handle(Event::AggregationDone { round: 1 });
        assert_eq!(tasks(&next), vec!["a", "b"]);
    }

    #[test]
    fn an_invalid_update_counts_as_a_failure() {
        let mut e = engine(1, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        e.handle(Event::UpdateArrived { device: "b".into(), round: 1, rank: 1 });
        assert_eq!(
            e.handle(Event::UpdateInvalid { device: "b".into(), round: 1 }),
            vec![Action::Aggregate { round: 1, updates: 1 }]
        );
    }

    #[test]
    fn a_round_whose_every_participant_failed_is_skipped_at_its_deadline_without_extension() {
        let mut e = engine(2, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        e.handle(Event::UpdateArrived { device: "a".into(), round: 1, rank: 1 });
        assert!(e.handle(Event::UpdateInvalid { device: "a".into(), round: 1 }).is_empty());
        assert!(e.handle(Event::DeviceLeft { device: "b".into() }).is_empty(), "no skip before the deadline");
        assert_eq!(e.phase(), &Phase::Training { round: 1 });
        let at_deadline = fire(&mut e, 1, Timer::Deadline);
        assert_eq!(
            at_deadline[0],
            Action::SkipRound { round: 1, updates: 0, why: SkipWhy::ShortOfQuorum },
            "nobody is training: no extension"
        );
    }

    #[test]
    fn a_fraction_of_the_connected_devices_is_sampled_reproducibly() {
        let run = |seed: u64| {
            let mut e = Engine::new(sampled(config(3, 8), 0.25, None, seed));
            let mut rounds = Vec::new();
            let mut actions = Vec::new();
            for k in 0..8 {
                actions = join(&mut e, &format!("d{k}"), 2);
            }
            for round in 1..=3 {
                let chosen: Vec<String> = tasks(&actions).iter().map(|s| s.to_string()).collect();
                assert_eq!(chosen.len(), 8, "at least min_devices (8) are sampled");
                rounds.push(chosen.clone());
                for d in &chosen {
                    upload(&mut e, d, round);
                }
                actions = e.handle(Event::AggregationDone { round });
            }
            rounds
        };
        assert_eq!(run(1), run(1));
        // A whole fleet of 8 must connect, then a quarter of it trains per round.
        let mut e = Engine::new(sampled(config(3, 8), 0.25, Some(1), 7));
        for k in 0..7 {
            assert!(join(&mut e, &format!("d{k}"), 2).is_empty(), "round 1 waits for min_devices");
        }
        assert_eq!(tasks(&join(&mut e, "d7", 2)).len(), 2, "then samples ceil(0.25 × 8), not min_devices");
        // With min_devices below the fraction: 2 of 8 per round, varying across rounds.
        let mut e = Engine::new(sampled(config(3, 1), 0.25, None, 7));
        let mut seen = std::collections::BTreeSet::new();
        let mut actions = join(&mut e, "d0", 2);
        for k in 1..8 {
            assert!(join(&mut e, &format!("d{k}"), 2).is_empty(), "later devices wait for round 2");
        }
        assert_eq!(tasks(&actions), vec!["d0"], "the first device to connect starts round 1 (min_devices 1)");
        for d in tasks(&actions).iter().map(|s| s.to_string()).collect::<Vec<_>>() {
            upload(&mut e, &d, 1);
        }
        let mut round = 1;
        for _ in 0..2 {
            actions = e.handle(Event::AggregationDone { round });
            round += 1;
            let chosen: Vec<String> = tasks(&actions).iter().map(|s| s.to_string()).collect();
            assert_eq!(chosen.len(), 2, "ceil(0.25 × 8)");
            seen.extend(chosen.iter().cloned());
            for d in &chosen {
                upload(&mut e, d, round);
            }
        }
        assert!(seen.len() >= 2);
    }

    #[test]
    fn a_resumed_run_starts_after_its_checkpoint() {
        let mut e = Engine::new(EngineConfig { first_round: 3, ..config(3, 1) });
        assert!(join(&mut e, "a", 2).contains(&Action::SendTask { device: "a".into(), round: 3, rank: 2 }));
        assert_eq!(upload(&mut e, "a", 3), vec![Action::Aggregate { round: 3, updates: 1 }]);
        assert_eq!(e.handle(Event::AggregationDone { round: 3 }), vec![Action::Finish { rounds_completed: 3 }]);
    }

    /// The tally kept event by event equals a recount of the participants, through random joins,
    /// rejoins at other ranks, departures, uploads, failures and timers over several rounds.
    #[test]
    fn the_running_tally_equals_a_recount_after_every_event() {
        use rand::Rng;
        let mut e = Engine::new(sampled(config(6, 4), 0.5, Some(1), 7));
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let devices: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        for step in 0..3000 {
            let device = devices[rng.random_range(0..devices.len())].clone();
            let round = match e.phase() {
                Phase::Training { round } | Phase::Aggregating { round } => *round,
                _ => 1,
            };
            let event = match rng.random_range(0..8) {
                0 | 1 => Event::DeviceJoined { device, rank: rng.random_range(1..4) },
                2 => Event::DeviceLeft { device },
                3 | 4 => Event::UpdateArrived { device, round, rank: 1 },
                5 => Event::UpdateFolded { device, round },
                6 => Event::UpdateInvalid { device, round },
                _ => Event::TimerFired {
                    round,
                    timer: if rng.random_bool(0.5) { Timer::Deadline } else { Timer::Grace },
                },
            };
            for action in e.handle(event) {
                if let Action::Aggregate { round, .. } = action {
                    e.handle(Event::AggregationDone { round });
                }
            }
            let mut by_rank = BTreeMap::new();
            let mut by_state = [0usize; 4];
            for (device, &state) in &e.participants {
                by_state[state as usize] += 1;
                if let Some(&rank) = e.connected.get(device) {
                    *by_rank.entry(rank).or_insert(0usize) += 1;
                }
            }
            assert_eq!(e.participants_by_rank(), &by_rank, "step {step}");
            assert_eq!(e.tally.by_state, by_state, "step {step}");
        }
        assert!(e.rounds_completed >= 2, "the sequence ran several rounds ({})", e.rounds_completed);
    }
}
