//! Buffered (asynchronous) rounds as a pure state machine: events in, actions out, no clock of its
//! own, like the synchronous [`crate::round`] engine.
//!
//! Up to `concurrency` devices train at once. A free device gets the current global adapter and
//! its version v; its update, arriving when the global is at version V, has staleness τ = V − v and
//! is folded into the buffer with the weight the staleness function gives it, or refused beyond
//! `max_staleness`. Every `buffer_size` folded updates the buffer is merged into the global, which
//! becomes version V + 1. While a merge runs, no task goes out (the next tasks carry the new
//! global) and arriving updates wait for the next buffer. A buffer that has not filled
//! `flush_after` after its first update is merged anyway if it holds at least `min_flush` updates
//! (`min_flush = 0`: it waits). A device that has not answered `task_deadline` after its task frees
//! its slot; what it sends later is refused.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::DeviceId;

/// How much an update of staleness τ weighs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Staleness {
    /// Every update weighs 1.
    Constant,
    /// 1 / (1 + τ)^a.
    Polynomial { a: f64 },
    /// 1 up to τ = b, then 1 / (1 + a·(τ − b)).
    Hinge { a: f64, b: u32 },
}

impl Staleness {
    pub fn weight(self, staleness: u32) -> f64 {
        let tau = f64::from(staleness);
        match self {
            Staleness::Constant => 1.0,
            Staleness::Polynomial { a } => (1.0 + tau).powf(-a),
            Staleness::Hinge { a, b } if staleness > b => 1.0 / (1.0 + a * (tau - f64::from(b))),
            Staleness::Hinge { .. } => 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BufferedConfig {
    /// Devices training at once.
    pub concurrency: usize,
    /// Folded updates that make a buffer.
    pub buffer_size: usize,
    /// Updates staler than this are refused.
    pub max_staleness: u32,
    pub staleness: Staleness,
    /// A buffer not full this long after its first update is merged if it holds `min_flush`.
    pub flush_after: Duration,
    /// 0: a buffer that is not full waits, however long.
    pub min_flush: usize,
    /// How long a device has for a task before its slot goes to another.
    pub task_deadline: Duration,
    /// The run ends once the global reaches this version.
    pub last_version: u32,
    /// The version of the global the run starts from (0, or a resumed checkpoint's).
    pub first_version: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferedTimer {
    /// The buffer with this sequence number has waited `flush_after`.
    Flush { buffer: u64 },
    /// A device's task (by its sequence number) has run `task_deadline`.
    Task { task: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BufferedEvent {
    DeviceJoined {
        device: DeviceId,
        rank: u32,
    },
    DeviceLeft {
        device: DeviceId,
    },
    /// An update trained from the global of `version` arrived.
    /// It answers task `task` (the number its task carried).
    UpdateArrived {
        device: DeviceId,
        version: u32,
        rank: u32,
        task: u64,
    },
    /// The aggregator folded the update into the buffer.
    UpdateFolded {
        device: DeviceId,
    },
    /// The aggregator found the update invalid.
    UpdateInvalid {
        device: DeviceId,
    },
    /// The buffer was merged: the global is now `version` (checkpointed).
    FlushDone {
        version: u32,
    },
    TimerFired {
        timer: BufferedTimer,
    },
}

/// Why an update was refused (a bounded label for metrics; the reason says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferedRejection {
    TooStale,
    FutureVersion,
    NoTask,
    WrongTask,
    WrongVersion,
    RankAboveAssigned,
    Finished,
}

impl BufferedRejection {
    pub fn label(self) -> &'static str {
        match self {
            BufferedRejection::TooStale => "too_stale",
            BufferedRejection::FutureVersion => "future_version",
            BufferedRejection::NoTask => "no_task",
            BufferedRejection::WrongTask => "wrong_task",
            BufferedRejection::WrongVersion => "wrong_version",
            BufferedRejection::RankAboveAssigned => "rank_above_assigned",
            BufferedRejection::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BufferedAction {
    /// Send the device the global of `version` at its rank.
    /// Its update names `task`, so that a repeated or old update cannot pass for the answer to a
    /// newer task.
    SendTask {
        device: DeviceId,
        version: u32,
        rank: u32,
        task: u64,
    },
    /// Fold the device's update into the buffer with this weight (its staleness's).
    FoldUpdate {
        device: DeviceId,
        staleness: u32,
        weight: f64,
    },
    RejectUpdate {
        device: DeviceId,
        version: u32,
        kind: BufferedRejection,
        reason: String,
    },
    ScheduleTimer {
        timer: BufferedTimer,
        after: Duration,
    },
    /// Merge the buffer's `updates` into the global, which becomes `version`.
    Flush {
        version: u32,
        updates: usize,
    },
    Finish {
        version: u32,
    },
}

/// A device's task in flight.
#[derive(Debug, Clone, PartialEq)]
struct Task {
    sequence: u64,
    version: u32,
    rank: u32,
}

/// An accepted update waiting for a buffer (one arrived while the buffer was full or merging).
#[derive(Debug, Clone, PartialEq)]
struct Waiting {
    device: DeviceId,
    version: u32,
}

pub struct BufferedEngine {
    config: BufferedConfig,
    version: u32,
    connected: BTreeMap<DeviceId, u32>,
    /// Connected devices without a task, longest idle first.
    idle: VecDeque<DeviceId>,
    training: BTreeMap<DeviceId, Task>,
    waiting: VecDeque<Waiting>,
    /// Folds asked of the aggregator and not answered yet, and those done, in the current buffer.
    folding: BTreeSet<DeviceId>,
    folded: usize,
    /// The buffer's sequence number (its flush timer names it) and whether its timer is set.
    buffer: u64,
    buffer_timer: bool,
    merging: bool,
    finished: bool,
    next_task: u64,
}

impl BufferedEngine {
    pub fn new(config: BufferedConfig) -> BufferedEngine {
        let version = config.first_version;
        BufferedEngine {
            config,
            version,
            connected: BTreeMap::new(),
            idle: VecDeque::new(),
            training: BTreeMap::new(),
            waiting: VecDeque::new(),
            folding: BTreeSet::new(),
            folded: 0,
            buffer: 0,
            buffer_timer: false,
            merging: false,
            finished: false,
            next_task: 0,
        }
    }

    /// The global's version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Devices training now.
    pub fn training(&self) -> usize {
        self.training.len()
    }

    /// Updates in the current buffer (folded, or being folded).
    pub fn buffer_fill(&self) -> usize {
        self.folded + self.folding.len()
    }

    pub fn handle(&mut self, event: BufferedEvent) -> Vec<BufferedAction> {
        let mut actions = Vec::new();
        match event {
            BufferedEvent::DeviceJoined { device, rank } => {
                self.leave(&device);
                self.connected.insert(device.clone(), rank);
                self.idle.push_back(device);
            }
            BufferedEvent::DeviceLeft { device } => self.leave(&device),
            BufferedEvent::UpdateArrived { device, version, rank, task } => {
                self.arrived(device, (version, rank, task), &mut actions)
            }
            BufferedEvent::UpdateFolded { device } => {
                if self.folding.remove(&device) {
                    self.folded += 1;
                }
            }
            BufferedEvent::UpdateInvalid { device } => {
                self.folding.remove(&device);
            }
            BufferedEvent::FlushDone { version } => {
                if self.merging && version == self.version + 1 {
                    self.merging = false;
                    self.version = version;
                    if version >= self.config.last_version {
                        self.finished = true;
                        actions.push(BufferedAction::Finish { version });
                        return actions;
                    }
                    self.take_waiting(&mut actions);
                }
            }
            BufferedEvent::TimerFired { timer } => self.timer(timer, &mut actions),
        }
        self.flush_if_full(&mut actions);
        self.dispatch(&mut actions);
        actions
    }

    fn leave(&mut self, device: &DeviceId) {
        self.connected.remove(device);
        self.idle.retain(|d| d != device);
        self.training.remove(device);
        self.waiting.retain(|w| &w.device != device);
    }

    /// An update (from `version`, at `rank`, answering `answers`) arrived.
    fn arrived(
        &mut self,
        device: DeviceId,
        (version, rank, answers): (u32, u32, u64),
        actions: &mut Vec<BufferedAction>,
    ) {
        let refuse =
            |kind, reason: String| BufferedAction::RejectUpdate { device: device.clone(), version, kind, reason };
        if self.finished {
            actions.push(refuse(BufferedRejection::Finished, "the run is finished".into()));
            return;
        }
        let Some(task) = self.training.get(&device).cloned() else {
            let why = "this device has no task in flight (none was sent, or its deadline passed)";
            actions.push(refuse(BufferedRejection::NoTask, why.into()));
            // A device whose deadline passed is free again once it answers.
            let busy = self.idle.contains(&device) || self.waiting.iter().any(|w| w.device == device);
            if self.connected.contains_key(&device) && !busy {
                self.idle.push_back(device);
            }
            return;
        };
        let refusal = if answers != task.sequence {
            Some((
                BufferedRejection::WrongTask,
                format!("it answers task {answers}; the device's task is {}", task.sequence),
            ))
        } else if version > self.version {
            Some((
                BufferedRejection::FutureVersion,
                format!("version {version} is ahead of the global's {}", self.version),
            ))
        } else if version != task.version {
            Some((
                BufferedRejection::WrongVersion,
                format!("the device's task is for version {}, not {version}", task.version),
            ))
        } else if rank > task.rank {
            Some((BufferedRejection::RankAboveAssigned, format!("rank {rank} is above the task's {}", task.rank)))
        } else {
            None
        };
        // Whatever became of it, the device is free again.
        self.training.remove(&device);
        self.idle.push_back(device.clone());
        if let Some((kind, reason)) = refusal {
            actions.push(refuse(kind, reason));
            return;
        }
        self.waiting.push_back(Waiting { device, version });
        if !self.merging {
            self.take_waiting(actions);
        }
    }

    /// Folds waiting updates into the buffer until it is full, refusing those too stale for the
    /// current global.
    fn take_waiting(&mut self, actions: &mut Vec<BufferedAction>) {
        while self.buffer_fill() < self.config.buffer_size {
            let Some(Waiting { device, version }) = self.waiting.pop_front() else { break };
            let staleness = self.version - version;
            if staleness > self.config.max_staleness {
                actions.push(BufferedAction::RejectUpdate {
                    device,
                    version,
                    kind: BufferedRejection::TooStale,
                    reason: format!(
                        "trained from version {version}, the global is at {}: staleness {staleness} is above {}",
                        self.version, self.config.max_staleness
                    ),
                });
                continue;
            }
            if self.buffer_fill() == 0 && !self.buffer_timer {
                self.buffer_timer = true;
                let timer = BufferedTimer::Flush { buffer: self.buffer };
                actions.push(BufferedAction::ScheduleTimer { timer, after: self.config.flush_after });
            }
            self.folding.insert(device.clone());
            actions.push(BufferedAction::FoldUpdate {
                device,
                staleness,
                weight: self.config.staleness.weight(staleness),
            });
        }
    }

    fn timer(&mut self, timer: BufferedTimer, actions: &mut Vec<BufferedAction>) {
        match timer {
            BufferedTimer::Task { task } => {
                let expired: Vec<DeviceId> =
                    self.training.iter().filter(|(_, t)| t.sequence == task).map(|(d, _)| d.clone()).collect();
                // Its slot goes to another device; the device itself gets no new task until it
                // answers (a late update is refused) or reconnects.
                for device in expired {
                    self.training.remove(&device);
                }
            }
            BufferedTimer::Flush { buffer } => {
                if buffer != self.buffer || self.merging {
                    return;
                }
                self.buffer_timer = false;
                let min = self.config.min_flush;
                if min > 0 && self.folded >= min && self.folding.is_empty() {
                    self.flush(actions);
                } else if self.buffer_fill() > 0 {
                    // Not enough yet (or folds in flight): look again after another wait.
                    self.buffer_timer = true;
                    actions.push(BufferedAction::ScheduleTimer { timer, after: self.config.flush_after });
                }
            }
        }
    }

    fn flush_if_full(&mut self, actions: &mut Vec<BufferedAction>) {
        if !self.merging && !self.finished && self.folded >= self.config.buffer_size && self.folding.is_empty() {
            self.flush(actions);
        }
    }

    fn flush(&mut self, actions: &mut Vec<BufferedAction>) {
        actions.push(BufferedAction::Flush { version: self.version + 1, updates: self.folded });
        self.merging = true;
        self.folded = 0;
        self.buffer += 1;
        self.buffer_timer = false;
    }

    /// Gives free devices the current global while fewer than `concurrency` train.
    fn dispatch(&mut self, actions: &mut Vec<BufferedAction>) {
        // A full buffer is about to be merged: the next tasks wait for the new global.
        if self.merging || self.finished || self.buffer_fill() >= self.config.buffer_size {
            return;
        }
        while self.training.len() < self.config.concurrency {
            let Some(device) = self.idle.pop_front() else { break };
            let Some(&rank) = self.connected.get(&device) else { continue };
            let sequence = self.next_task;
            self.next_task += 1;
            self.training.insert(device.clone(), Task { sequence, version: self.version, rank });
            actions.push(BufferedAction::SendTask { device, version: self.version, rank, task: sequence });
            let timer = BufferedTimer::Task { task: sequence };
            actions.push(BufferedAction::ScheduleTimer { timer, after: self.config.task_deadline });
        }
    }
}

#[cfg(test)]
mod tests;
