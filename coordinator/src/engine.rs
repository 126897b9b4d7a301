//! The round engine: a pure state machine. Events in, actions out; no I/O and no clock of its own
//! (deadlines are requested as timer actions and come back as events), so every path can be driven
//! in tests with virtual time.
//!
//! Phases: waiting for devices → training (with a deadline) → aggregating → next round or finished.

use std::collections::BTreeMap;
use std::time::Duration;

pub type DeviceId = String;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    pub rounds: u32,
    /// Devices that must be connected before a round starts.
    pub min_devices: usize,
    pub round_deadline: Duration,
    /// The first round to run: 1, or the round after the checkpoint a restarted run resumes from.
    pub first_round: u32,
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
    DeadlineReached {
        round: u32,
    },
    AggregationDone {
        round: u32,
    },
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
    ScheduleDeadline {
        round: u32,
        after: Duration,
    },
    Aggregate {
        round: u32,
        updates: usize,
    },
    /// No usable update arrived before the deadline: the global adapter stays as it was.
    SkipRound {
        round: u32,
    },
    Finish {
        rounds_completed: u32,
    },
}

/// Why the engine refused an update (a bounded label for metrics; the reason text says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectKind {
    Stale,
    Duplicate,
    Dropped,
    NotParticipant,
    NoRound,
}

impl RejectKind {
    pub fn label(self) -> &'static str {
        match self {
            RejectKind::Stale => "stale",
            RejectKind::Duplicate => "duplicate",
            RejectKind::Dropped => "dropped",
            RejectKind::NotParticipant => "not_participant",
            RejectKind::NoRound => "no_round",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Participation {
    Training,
    Folding,
    Folded,
    Failed,
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

pub struct Engine {
    config: EngineConfig,
    connected: BTreeMap<DeviceId, u32>,
    phase: Phase,
    next_round: u32,
    participants: BTreeMap<DeviceId, Participation>,
    rounds_completed: u32,
}

impl Engine {
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config: config.clone(),
            connected: BTreeMap::new(),
            phase: Phase::WaitingForDevices,
            next_round: config.first_round.max(1),
            participants: BTreeMap::new(),
            rounds_completed: config.first_round.max(1) - 1,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn handle(&mut self, event: Event) -> Vec<Action> {
        let mut actions = Vec::new();
        match event {
            Event::DeviceJoined { device, rank } => {
                // A device that (re)joins mid-round waits for the next round.
                self.connected.insert(device, rank);
                if self.phase == Phase::WaitingForDevices {
                    self.try_start_round(&mut actions);
                }
            }
            Event::DeviceLeft { device } => {
                self.connected.remove(&device);
                if let Some(state) = self.participants.get_mut(&device) {
                    if *state == Participation::Training {
                        *state = Participation::Failed;
                    }
                }
                self.maybe_close_round(&mut actions);
            }
            Event::UpdateArrived { device, round } => {
                let refusal = match (&self.phase, self.participants.get(&device)) {
                    (Phase::Training { round: current }, _) if *current != round => {
                        Some((RejectKind::Stale, format!("stale update for round {round}; round {current} is running")))
                    }
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
                    _ => Some((
                        RejectKind::NoRound,
                        format!("no round is accepting updates (update was for round {round})"),
                    )),
                };
                match refusal {
                    None => {
                        self.participants.insert(device.clone(), Participation::Folding);
                        actions.push(Action::FoldUpdate { device, round });
                    }
                    Some((kind, reason)) => actions.push(Action::RejectUpdate { device, round, kind, reason }),
                }
            }
            Event::UpdateFolded { device, round } | Event::UpdateInvalid { device, round }
                if self.phase != (Phase::Training { round }) =>
            {
                // Fold results are only awaited while the round trains; anything else is a bug in
                // the driver, but it must not wedge the engine.
                tracing::warn!(%device, round, "fold result outside its round ignored");
            }
            Event::UpdateFolded { device, .. } => {
                self.participants.insert(device, Participation::Folded);
                self.maybe_close_round(&mut actions);
            }
            Event::UpdateInvalid { device, .. } => {
                self.participants.insert(device, Participation::Failed);
                self.maybe_close_round(&mut actions);
            }
            Event::DeadlineReached { round } => {
                if self.phase == (Phase::Training { round }) {
                    for state in self.participants.values_mut() {
                        if *state == Participation::Training {
                            *state = Participation::Failed;
                        }
                    }
                    self.maybe_close_round(&mut actions);
                }
            }
            Event::AggregationDone { round } => {
                if self.phase == (Phase::Aggregating { round }) {
                    self.rounds_completed += 1;
                    self.next_round_or_finish(&mut actions);
                }
            }
        }
        actions
    }

    /// Devices taking part in the current round, counted by rank.
    pub fn participants_by_rank(&self) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for device in self.participants.keys() {
            if let Some(&rank) = self.connected.get(device) {
                *counts.entry(rank).or_insert(0) += 1;
            }
        }
        counts
    }

    pub fn connected(&self) -> usize {
        self.connected.len()
    }

    fn try_start_round(&mut self, actions: &mut Vec<Action>) {
        if self.connected.len() < self.config.min_devices.max(1) {
            self.phase = Phase::WaitingForDevices;
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        self.phase = Phase::Training { round };
        self.participants = self.connected.keys().map(|d| (d.clone(), Participation::Training)).collect();
        for (device, &rank) in &self.connected {
            actions.push(Action::SendTask { device: device.clone(), round, rank });
        }
        actions.push(Action::ScheduleDeadline { round, after: self.config.round_deadline });
    }

    /// Closes the round once no participant can still contribute.
    fn maybe_close_round(&mut self, actions: &mut Vec<Action>) {
        let Phase::Training { round } = self.phase else { return };
        let pending = self.participants.values().any(|s| matches!(s, Participation::Training | Participation::Folding));
        if pending {
            return;
        }
        let updates = self.participants.values().filter(|&&s| s == Participation::Folded).count();
        if updates > 0 {
            self.phase = Phase::Aggregating { round };
            actions.push(Action::Aggregate { round, updates });
        } else {
            actions.push(Action::SkipRound { round });
            self.next_round_or_finish(actions);
        }
    }

    fn next_round_or_finish(&mut self, actions: &mut Vec<Action>) {
        self.participants.clear();
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

    fn engine(rounds: u32, min_devices: usize) -> Engine {
        Engine::new(EngineConfig { rounds, min_devices, round_deadline: Duration::from_secs(30), first_round: 1 })
    }

    fn join(e: &mut Engine, device: &str, rank: u32) -> Vec<Action> {
        e.handle(Event::DeviceJoined { device: device.into(), rank })
    }

    fn upload(e: &mut Engine, device: &str, round: u32) -> Vec<Action> {
        let mut actions = e.handle(Event::UpdateArrived { device: device.into(), round });
        if actions == vec![Action::FoldUpdate { device: device.into(), round }] {
            actions = e.handle(Event::UpdateFolded { device: device.into(), round });
        }
        actions
    }

    #[test]
    fn waits_for_quorum_then_runs_all_rounds() {
        let mut e = engine(2, 3);
        assert!(join(&mut e, "a", 2).is_empty());
        assert!(join(&mut e, "b", 4).is_empty());
        let start = join(&mut e, "c", 8);
        assert_eq!(start.len(), 4);
        assert!(start.contains(&Action::SendTask { device: "c".into(), round: 1, rank: 8 }));
        assert!(start.contains(&Action::ScheduleDeadline { round: 1, after: Duration::from_secs(30) }));
        assert!(upload(&mut e, "a", 1).is_empty());
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
    fn a_resumed_run_starts_after_its_checkpoint() {
        let mut e = Engine::new(EngineConfig {
            rounds: 3,
            min_devices: 1,
            round_deadline: Duration::from_secs(30),
            first_round: 3,
        });
        assert!(join(&mut e, "a", 2).contains(&Action::SendTask { device: "a".into(), round: 3, rank: 2 }));
        assert_eq!(upload(&mut e, "a", 3), vec![Action::Aggregate { round: 3, updates: 1 }]);
        assert_eq!(e.handle(Event::AggregationDone { round: 3 }), vec![Action::Finish { rounds_completed: 3 }]);
    }

    #[test]
    fn stragglers_are_dropped_at_the_deadline_and_their_late_updates_rejected() {
        let mut e = engine(1, 2);
        join(&mut e, "fast", 2);
        join(&mut e, "slow", 2);
        assert!(upload(&mut e, "fast", 1).is_empty());
        assert_eq!(e.handle(Event::DeadlineReached { round: 1 }), vec![Action::Aggregate { round: 1, updates: 1 }]);
        let late = e.handle(Event::UpdateArrived { device: "slow".into(), round: 1 });
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
        let actions = e.handle(Event::DeadlineReached { round: 1 });
        assert_eq!(actions[0], Action::SkipRound { round: 1 });
        assert!(actions.contains(&Action::SendTask { device: "a".into(), round: 2, rank: 2 }));
    }

    #[test]
    fn duplicates_stale_rounds_and_strangers_are_rejected() {
        let mut e = engine(1, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        let dup = e.handle(Event::UpdateArrived { device: "a".into(), round: 1 });
        assert!(matches!(&dup[..], [Action::RejectUpdate { reason, .. }] if reason.contains("duplicate")));
        let stale = e.handle(Event::UpdateArrived { device: "b".into(), round: 0 });
        assert!(matches!(&stale[..], [Action::RejectUpdate { reason, .. }] if reason.contains("stale")));
        join(&mut e, "late-joiner", 4);
        let stranger = e.handle(Event::UpdateArrived { device: "late-joiner".into(), round: 1 });
        assert!(matches!(&stranger[..], [Action::RejectUpdate { .. }]));
        // Stale timers are ignored.
        assert!(e.handle(Event::DeadlineReached { round: 7 }).is_empty());
    }

    #[test]
    fn an_invalid_update_counts_as_a_failure() {
        let mut e = engine(1, 2);
        join(&mut e, "a", 2);
        join(&mut e, "b", 2);
        upload(&mut e, "a", 1);
        e.handle(Event::UpdateArrived { device: "b".into(), round: 1 });
        assert_eq!(
            e.handle(Event::UpdateInvalid { device: "b".into(), round: 1 }),
            vec![Action::Aggregate { round: 1, updates: 1 }]
        );
    }
}
