//! Virtual-time tests of the buffered engine: every event is fed by hand, every action checked.

use std::collections::HashMap;
use std::time::Duration;

use super::*;

fn config() -> BufferedConfig {
    BufferedConfig {
        concurrency: 3,
        buffer_size: 2,
        max_staleness: 2,
        staleness: Staleness::Polynomial { a: 0.5 },
        flush_after: Duration::from_secs(60),
        min_flush: 1,
        task_deadline: Duration::from_secs(600),
        last_version: 10,
        first_version: 0,
    }
}

fn id(i: usize) -> DeviceId {
    format!("d{i}")
}

fn tasks(actions: &[BufferedAction]) -> Vec<(DeviceId, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            BufferedAction::SendTask { device, version, .. } => Some((device.clone(), *version)),
            _ => None,
        })
        .collect()
}

fn refusal(actions: &[BufferedAction]) -> BufferedRejection {
    match actions.first() {
        Some(BufferedAction::RejectUpdate { kind, .. }) => *kind,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The engine and a fleet that remembers the task each device was last sent, as devices do.
struct Harness {
    engine: BufferedEngine,
    sent: HashMap<DeviceId, u64>,
}

impl Harness {
    fn new(config: BufferedConfig) -> Harness {
        Harness { engine: BufferedEngine::new(config), sent: HashMap::new() }
    }

    fn handle(&mut self, event: BufferedEvent) -> Vec<BufferedAction> {
        let actions = self.engine.handle(event);
        for action in &actions {
            if let BufferedAction::SendTask { device, task, .. } = action {
                self.sent.insert(device.clone(), *task);
            }
        }
        actions
    }

    fn join(&mut self, devices: usize) -> Vec<BufferedAction> {
        (0..devices).flat_map(|i| self.handle(BufferedEvent::DeviceJoined { device: id(i), rank: 4 })).collect()
    }

    /// The device's update for its last task arrives, trained from `version`.
    fn arrive(&mut self, device: usize, version: u32) -> Vec<BufferedAction> {
        let task = self.sent.get(&id(device)).copied().unwrap_or(u64::MAX);
        self.handle(BufferedEvent::UpdateArrived { device: id(device), version, rank: 4, task })
    }

    /// [`Harness::arrive`], and the aggregator folds it if asked.
    fn upload(&mut self, device: usize, version: u32) -> Vec<BufferedAction> {
        let mut actions = self.arrive(device, version);
        if actions.iter().any(|a| matches!(a, BufferedAction::FoldUpdate { .. })) {
            actions.extend(self.handle(BufferedEvent::UpdateFolded { device: id(device) }));
        }
        actions
    }
}

#[test]
fn concurrency_is_kept_and_a_free_device_gets_the_next_task() {
    let mut run = Harness::new(BufferedConfig { buffer_size: 4, ..config() });
    let actions = run.join(5);
    assert_eq!(tasks(&actions), vec![(id(0), 0), (id(1), 0), (id(2), 0)], "three at once, first come first");
    assert_eq!(run.engine.training(), 3);
    let actions = run.upload(1, 0);
    assert!(actions.contains(&BufferedAction::FoldUpdate { device: id(1), staleness: 0, weight: 1.0 }));
    // d1 is free again, behind d3 and d4 that waited longer.
    assert_eq!(tasks(&actions), vec![(id(3), 0)]);
    assert_eq!(run.engine.training(), 3);
}

#[test]
fn a_full_buffer_is_merged_and_the_next_tasks_carry_the_new_version() {
    let mut run = Harness::new(config());
    run.join(4);
    run.upload(0, 0);
    let actions = run.upload(1, 0);
    assert!(actions.contains(&BufferedAction::Flush { version: 1, updates: 2 }), "{actions:?}");
    assert!(tasks(&actions).is_empty(), "no task goes out with a global about to change: {actions:?}");
    // An update arriving during the merge waits for the next buffer.
    let during = run.arrive(2, 0);
    assert!(!during.iter().any(|a| matches!(a, BufferedAction::FoldUpdate { .. })), "{during:?}");
    let after = run.handle(BufferedEvent::FlushDone { version: 1 });
    assert_eq!(run.engine.version(), 1);
    // d2's update, from version 0, is now one version stale: 1/√2.
    let folded = after.iter().find_map(|a| match a {
        BufferedAction::FoldUpdate { device, staleness: 1, weight } if device == &id(2) => Some(*weight),
        _ => None,
    });
    assert!(folded.is_some_and(|w| (w - 1.0 / 2f64.sqrt()).abs() < 1e-12), "{after:?}");
    assert!(tasks(&after).iter().all(|(_, version)| *version == 1), "{after:?}");
    assert_eq!(tasks(&after).len(), 2, "d0 and d1 fill the free slots beside d3 and d2's fold: {after:?}");
}

#[test]
fn an_update_beyond_max_staleness_is_refused_with_the_reason() {
    let mut run = Harness::new(BufferedConfig { buffer_size: 1, max_staleness: 1, ..config() });
    run.join(3);
    // d0 and d1, both sent version 0, move the global to version 2 while d2 trains on version 0.
    for device in [0, 1] {
        run.upload(device, 0);
        run.handle(BufferedEvent::FlushDone { version: run.engine.version() + 1 });
    }
    assert_eq!(run.engine.version(), 2);
    let actions = run.upload(2, 0);
    match &actions[0] {
        BufferedAction::RejectUpdate { kind: BufferedRejection::TooStale, reason, .. } => {
            assert!(reason.contains("staleness 2 is above 1"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!actions.iter().any(|a| matches!(a, BufferedAction::FoldUpdate { .. })));
    assert!(tasks(&actions).contains(&(id(2), 2)), "the device is free again and gets the current global");
}

#[test]
fn updates_for_no_task_another_task_a_future_version_or_a_larger_rank_are_refused() {
    let mut run = Harness::new(BufferedConfig { buffer_size: 4, ..config() });
    run.join(3);
    assert_eq!(refusal(&run.arrive(0, 5)), BufferedRejection::FutureVersion);
    let stranger = BufferedEvent::UpdateArrived { device: "eve".into(), version: 0, rank: 4, task: 0 };
    assert_eq!(refusal(&run.handle(stranger)), BufferedRejection::NoTask);
    let task = run.sent[&id(1)];
    let too_big = BufferedEvent::UpdateArrived { device: id(1), version: 0, rank: 8, task };
    assert_eq!(refusal(&run.handle(too_big)), BufferedRejection::RankAboveAssigned);
    // d2's update is folded; sent again, it answers a task d2 no longer holds.
    let old_task = run.sent[&id(2)];
    run.upload(2, 0);
    let again = BufferedEvent::UpdateArrived { device: id(2), version: 0, rank: 4, task: old_task };
    assert_eq!(refusal(&run.handle(again)), BufferedRejection::WrongTask);
    assert_eq!(run.engine.buffer_fill(), 1, "only d2's first update is in the buffer");
}

#[test]
fn a_device_leaving_mid_training_frees_its_slot() {
    let mut run = Harness::new(BufferedConfig { concurrency: 2, ..config() });
    run.join(3);
    let actions = run.handle(BufferedEvent::DeviceLeft { device: id(0) });
    assert_eq!(tasks(&actions), vec![(id(2), 0)]);
    assert_eq!(refusal(&run.arrive(0, 0)), BufferedRejection::NoTask);
}

#[test]
fn a_buffer_that_does_not_fill_is_merged_after_its_wait_or_waits_on() {
    for (min_flush, merged) in [(1, true), (0, false)] {
        let mut run = Harness::new(BufferedConfig { min_flush, ..config() });
        run.join(1);
        let actions = run.upload(0, 0);
        let timer = actions
            .iter()
            .find_map(|a| match a {
                BufferedAction::ScheduleTimer { timer: timer @ BufferedTimer::Flush { .. }, .. } => Some(*timer),
                _ => None,
            })
            .expect("the first update in a buffer starts its wait");
        let fired = run.handle(BufferedEvent::TimerFired { timer });
        let flushed = fired.contains(&BufferedAction::Flush { version: 1, updates: 1 });
        assert_eq!(flushed, merged, "min_flush {min_flush}: {fired:?}");
        if !merged {
            assert!(fired.iter().any(|a| matches!(a, BufferedAction::ScheduleTimer { .. })), "it keeps waiting");
        }
    }
}

#[test]
fn a_task_past_its_deadline_frees_the_slot_and_its_late_update_is_refused() {
    let mut run = Harness::new(BufferedConfig { concurrency: 1, buffer_size: 4, ..config() });
    let actions = run.join(2);
    let timer = actions
        .iter()
        .find_map(|a| match a {
            BufferedAction::ScheduleTimer { timer: timer @ BufferedTimer::Task { .. }, after } => {
                assert_eq!(*after, Duration::from_secs(600));
                Some(*timer)
            }
            _ => None,
        })
        .unwrap();
    let fired = run.handle(BufferedEvent::TimerFired { timer });
    assert_eq!(tasks(&fired), vec![(id(1), 0)], "d0's slot goes to d1");
    assert_eq!(refusal(&run.arrive(0, 0)), BufferedRejection::NoTask);
    // d0 answered, so it is free again: it gets the next slot.
    let next = run.upload(1, 0);
    assert_eq!(tasks(&next), vec![(id(0), 0)], "{next:?}");
}

#[test]
fn an_invalid_update_leaves_the_buffer_as_it_was() {
    let mut run = Harness::new(config());
    run.join(3);
    run.arrive(0, 0);
    run.handle(BufferedEvent::UpdateInvalid { device: id(0) });
    assert_eq!(run.engine.buffer_fill(), 0);
    run.upload(1, 0);
    let actions = run.upload(2, 0);
    assert!(actions.contains(&BufferedAction::Flush { version: 1, updates: 2 }));
}

#[test]
fn the_run_finishes_at_its_last_version_and_refuses_what_comes_after() {
    let mut run = Harness::new(BufferedConfig { buffer_size: 1, last_version: 2, first_version: 1, ..config() });
    run.join(2);
    run.upload(0, 1);
    let done = run.handle(BufferedEvent::FlushDone { version: 2 });
    assert_eq!(done, vec![BufferedAction::Finish { version: 2 }]);
    let late = run.arrive(1, 1);
    assert_eq!(refusal(&late), BufferedRejection::Finished);
    assert!(tasks(&late).is_empty());
}

#[test]
fn staleness_functions_weigh_as_documented() {
    assert_eq!(Staleness::Constant.weight(7), 1.0);
    assert!((Staleness::Polynomial { a: 1.0 }.weight(3) - 0.25).abs() < 1e-12);
    let hinge = Staleness::Hinge { a: 0.5, b: 2 };
    assert_eq!(hinge.weight(2), 1.0);
    assert!((hinge.weight(4) - 0.5).abs() < 1e-12);
}
