//! Federated evaluation: the global model scored on the devices' own held-out data.
//!
//! After every `every_rounds`-th round (and after the last) the coordinator asks a sample of the
//! connected devices, trained this round or not, to score the global model as they hold it (their
//! rank's slice). Each answers with sums only (`flotilla_wire::evaluation`); a [`Tally`] checks
//! each report, adds it to the totals, per rank and per device class, and forgets which device sent
//! what. Its [`FederatedEvaluation`] record holds totals only; a rank or class with fewer than
//! `min_group_devices` reporting devices is left out of the record (it would reveal a device).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use crate::records::federated_evaluation::{FederatedEvaluation, HeldOutScores, MaskedEvaluationRecord};
use flotilla_wire::evaluation::{EvaluationReport, EvaluationSums};

/// The devices asked to evaluate model `model_round`: `fraction` of `connected` (at least one),
/// chosen with a seed of the run and round, so a rerun asks the same devices.
pub fn sample_evaluators(connected: &[String], fraction: f64, seed: u64, model_round: u32) -> Vec<String> {
    if connected.is_empty() {
        return Vec::new();
    }
    let wanted = ((connected.len() as f64 * fraction).ceil() as usize).clamp(1, connected.len());
    let mut ranked: Vec<(u64, &String)> = connected
        .iter()
        .map(|device| {
            let key = format!("{seed}/{model_round}/{device}");
            (flotilla_wire::fingerprint::fnv1a(key.as_bytes()), device)
        })
        .collect();
    ranked.sort();
    let mut chosen: Vec<String> = ranked.into_iter().take(wanted).map(|(_, d)| d.clone()).collect();
    chosen.sort();
    chosen
}

/// What a device asked to evaluate holds: its rank and class (for the per-rank and per-class
/// totals), and the other ranks whose models it is asked to score (the cross-rank view).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluator {
    pub rank: u32,
    pub class: String,
    pub cross: Vec<u32>,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ReportRefused {
    #[error("the coordinator did not ask this device to evaluate model {0} (or no longer waits for it)")]
    NotAsked(u32),
    #[error("this device already reported on model {0}")]
    Duplicate(u32),
    #[error("the report is for rank {got}, but the device was sent rank {sent}")]
    WrongRank { got: u32, sent: u32 },
    #[error("the device declared {now} held-out examples, but {before} before")]
    HeldOutChanged { before: u64, now: u64 },
    #[error("the report scores the models of ranks {got:?}, but the device was asked for {asked:?}")]
    WrongCrossRanks { got: Vec<u32>, asked: Vec<u32> },
    #[error("rank {rank}'s model was scored on {cross} examples, the device's own on {own}: one held-out set")]
    CrossExamples { rank: u32, cross: u64, own: u64 },
    #[error(transparent)]
    Sums(#[from] flotilla_wire::evaluation::SumsError),
}

/// One model's evaluation in progress: who was asked, and the totals of what came back.
pub struct Tally {
    pub model_round: u32,
    asked: BTreeMap<String, Evaluator>,
    answered: BTreeSet<String>,
    declined: usize,
    refused: usize,
    left: usize,
    total: Group,
    by_rank: BTreeMap<u32, Group>,
    by_class: BTreeMap<String, Group>,
    /// The cross-rank view: (model rank, device class).
    cross: BTreeMap<(u32, String), Group>,
    started: Instant,
    /// Bytes of the adapter slices sent with evaluation tasks (a piggy-backed request sends none),
    /// and of the reports received.
    pub bytes_down: u64,
    pub bytes_up: u64,
    masked: Option<MaskedEvaluationRecord>,
}

/// A group whose totals a record may hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum GroupKey {
    Total,
    Rank(u32),
    Class(String),
    /// The cross-rank view: (model rank, device class).
    Cross(u32, String),
}

#[derive(Default)]
struct Group {
    devices: usize,
    sums: EvaluationSums,
}

impl Group {
    fn add(&mut self, sums: &EvaluationSums) -> Result<(), ReportRefused> {
        self.sums.add(sums)?;
        self.devices += 1;
        Ok(())
    }
}

impl Tally {
    pub fn new(model_round: u32, asked: BTreeMap<String, Evaluator>) -> Tally {
        Tally {
            model_round,
            asked,
            answered: BTreeSet::new(),
            declined: 0,
            refused: 0,
            left: 0,
            total: Group::default(),
            by_rank: BTreeMap::new(),
            by_class: BTreeMap::new(),
            cross: BTreeMap::new(),
            started: Instant::now(),
            bytes_down: 0,
            bytes_up: 0,
            masked: None,
        }
    }

    /// Counts `report` from `device` (checked against what the device declared before,
    /// `held_out`, which it updates, and the model's `classes`: 0 for a decoder), or says why not.
    /// A refused report counts as the device's answer: it is not asked again for this model.
    pub fn accept(
        &mut self,
        device: &str,
        report: &EvaluationReport,
        classes: usize,
        held_out: &mut HashMap<String, u64>,
    ) -> Result<(), ReportRefused> {
        let Some(evaluator) = self.asked.get(device).cloned() else {
            return Err(ReportRefused::NotAsked(report.model_round));
        };
        if report.model_round != self.model_round {
            return Err(ReportRefused::NotAsked(report.model_round));
        }
        if !self.answered.insert(device.to_string()) {
            return Err(ReportRefused::Duplicate(self.model_round));
        }
        let outcome = self.count(device, &evaluator, report, classes, held_out);
        if outcome.is_err() {
            self.refused += 1;
        }
        outcome
    }

    fn count(
        &mut self,
        device: &str,
        evaluator: &Evaluator,
        report: &EvaluationReport,
        classes: usize,
        held_out: &mut HashMap<String, u64>,
    ) -> Result<(), ReportRefused> {
        if report.rank != evaluator.rank {
            return Err(ReportRefused::WrongRank { got: report.rank, sent: evaluator.rank });
        }
        let declared = *held_out.entry(device.to_string()).or_insert(report.held_out_examples);
        if declared != report.held_out_examples {
            return Err(ReportRefused::HeldOutChanged { before: declared, now: report.held_out_examples });
        }
        let Some(sums) = &report.sums else {
            self.declined += 1;
            return Ok(());
        };
        sums.check(declared, classes)?;
        let got: Vec<u32> = report.cross.iter().map(|c| c.rank).collect();
        if got != evaluator.cross {
            return Err(ReportRefused::WrongCrossRanks { got, asked: evaluator.cross.clone() });
        }
        for cell in &report.cross {
            cell.sums.check(declared, classes)?;
            if cell.sums.examples != sums.examples {
                return Err(ReportRefused::CrossExamples {
                    rank: cell.rank,
                    cross: cell.sums.examples,
                    own: sums.examples,
                });
            }
        }
        // Added to a copy first: a sum that overflows leaves the totals as they were. A group is
        // part of the total, so it cannot overflow where the total did not.
        let mut total = self.total.sums.clone();
        total.add(sums)?;
        self.total.sums = total;
        self.total.devices += 1;
        self.by_rank.entry(evaluator.rank).or_default().add(sums)?;
        self.by_class.entry(evaluator.class.clone()).or_default().add(sums)?;
        if !evaluator.cross.is_empty() {
            self.cross.entry((evaluator.rank, evaluator.class.clone())).or_default().add(sums)?;
            for cell in &report.cross {
                self.cross.entry((cell.rank, evaluator.class.clone())).or_default().add(&cell.sums)?;
            }
        }
        Ok(())
    }

    /// Under secure aggregation: the unmasked totals of each group (`crate::serve::secure_evaluation`),
    /// from the devices whose masked sums were in (`survivors`), `declined` of which declined.
    pub fn masked_totals(
        &mut self,
        survivors: &[String],
        declined: usize,
        groups: Vec<(GroupKey, usize, EvaluationSums)>,
    ) {
        self.answered.extend(survivors.iter().cloned());
        self.declined = declined;
        for (key, devices, sums) in groups {
            let group = Group { devices, sums };
            match key {
                GroupKey::Total => self.total = group,
                GroupKey::Rank(rank) => _ = self.by_rank.insert(rank, group),
                GroupKey::Class(class) => _ = self.by_class.insert(class, group),
                GroupKey::Cross(rank, class) => _ = self.cross.insert((rank, class), group),
            }
        }
    }

    /// Under secure aggregation: how the secure sum went (its record's `masked`).
    pub fn set_masked(&mut self, masked: MaskedEvaluationRecord) {
        self.masked = Some(masked);
    }

    /// A device asked to evaluate left before answering.
    pub fn left(&mut self, device: &str) {
        if self.asked.contains_key(device) && self.answered.insert(device.to_string()) {
            self.left += 1;
        }
    }

    /// Every device asked has answered (or left).
    pub fn complete(&self) -> bool {
        self.answered.len() == self.asked.len()
    }

    /// The record: totals only, each group's only when enough devices reported to it.
    pub fn record(&self, min_group_devices: usize) -> FederatedEvaluation {
        let mut suppressed = 0;
        let mut published = |group: &Group| {
            if group.devices >= min_group_devices {
                Some(HeldOutScores::of(group))
            } else {
                suppressed += 1;
                None
            }
        };
        let overall = published(&self.total);
        let by_rank = self.by_rank.iter().filter_map(|(rank, g)| published(g).map(|s| (*rank, s))).collect();
        let by_class = self.by_class.iter().filter_map(|(class, g)| published(g).map(|s| (class.clone(), s))).collect();
        let mut cross_rank: BTreeMap<u32, BTreeMap<String, HeldOutScores>> = BTreeMap::new();
        for ((rank, class), group) in &self.cross {
            if let Some(scores) = published(group) {
                cross_rank.entry(*rank).or_default().insert(class.clone(), scores);
            }
        }
        FederatedEvaluation {
            model_round: self.model_round,
            asked: self.asked.len(),
            reported: self.total.devices,
            declined: self.declined,
            refused: self.refused,
            missing: self.asked.len() - self.answered.len() + self.left,
            overall,
            by_rank,
            by_class,
            cross_rank,
            suppressed_groups: suppressed,
            seconds: self.started.elapsed().as_secs_f64(),
            bytes_down: self.bytes_down,
            bytes_up: self.bytes_up,
            masked: self.masked.clone(),
        }
    }
}

impl HeldOutScores {
    fn of(group: &Group) -> HeldOutScores {
        let sums = &group.sums;
        let labelled = !sums.labels.is_empty();
        HeldOutScores {
            devices: group.devices,
            examples: sums.examples,
            scored: sums.scored,
            accuracy: sums.accuracy(),
            loss: sums.mean_loss(),
            macro_f1: labelled.then(|| sums.macro_f1()),
            per_label_accuracy: sums
                .labels
                .iter()
                .map(|l| (l.support > 0).then(|| l.correct as f64 / l.support as f64))
                .collect(),
            rouge_l: sums.rouge_l(),
            headlines: sums.generated,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_wire::evaluation::EvaluationSums;

    fn asked(devices: &[(&str, u32, &str)]) -> BTreeMap<String, Evaluator> {
        devices
            .iter()
            .map(|(d, r, c)| (d.to_string(), Evaluator { rank: *r, class: c.to_string(), cross: Vec::new() }))
            .collect()
    }

    fn report(rank: u32, confusion: &[Vec<u64>]) -> EvaluationReport {
        let sums = EvaluationSums::from_confusion(confusion, 2.0);
        EvaluationReport {
            model_round: 3,
            rank,
            held_out_examples: sums.examples,
            sums: Some(sums),
            declined: String::new(),
            cross: Vec::new(),
        }
    }

    #[test]
    fn totals_add_up_by_rank_and_class_and_small_groups_are_left_out() {
        let mut tally = Tally::new(3, asked(&[("a", 2, "phone"), ("b", 2, "phone"), ("c", 8, "laptop")]));
        let mut held_out = HashMap::new();
        tally.accept("a", &report(2, &[vec![3, 1], vec![0, 4]]), 2, &mut held_out).unwrap();
        tally.accept("b", &report(2, &[vec![1, 1], vec![1, 1]]), 2, &mut held_out).unwrap();
        assert!(!tally.complete());
        tally.accept("c", &report(8, &[vec![5, 0], vec![0, 5]]), 2, &mut held_out).unwrap();
        assert!(tally.complete());
        let record = tally.record(2);
        let overall = record.overall.clone().unwrap();
        assert_eq!((overall.devices, overall.examples), (3, 22));
        assert!((overall.accuracy - 19.0 / 22.0).abs() < 1e-12);
        assert!((overall.loss - 6.0 / 22.0).abs() < 1e-12);
        assert_eq!(record.by_rank.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert!((record.by_rank[&2].accuracy - 9.0 / 12.0).abs() < 1e-12);
        assert_eq!(record.by_class.keys().cloned().collect::<Vec<_>>(), vec!["phone".to_string()]);
        // Rank 8 and the laptop class hold one device each.
        assert_eq!(record.suppressed_groups, 2);
        assert_eq!((record.asked, record.reported, record.missing), (3, 3, 0));
        assert_eq!(tally.record(1).by_rank.len(), 2);
    }

    #[test]
    fn lies_duplicates_and_strangers_are_refused_and_never_counted() {
        let mut tally = Tally::new(3, asked(&[("a", 2, "phone"), ("b", 2, "phone"), ("c", 2, "phone")]));
        let mut held_out = HashMap::new();
        let mut lie = report(2, &[vec![3, 1], vec![0, 4]]);
        lie.held_out_examples = 5; // scored 8
        assert!(matches!(tally.accept("a", &lie, 2, &mut held_out), Err(ReportRefused::Sums(_))));
        assert!(matches!(
            tally.accept("a", &report(2, &[vec![1]]), 2, &mut held_out),
            Err(ReportRefused::Duplicate(3))
        ));
        assert!(matches!(tally.accept("z", &report(2, &[vec![1]]), 2, &mut held_out), Err(ReportRefused::NotAsked(3))));
        assert!(matches!(
            tally.accept("b", &report(4, &[vec![1]]), 2, &mut held_out),
            Err(ReportRefused::WrongRank { got: 4, sent: 2 })
        ));
        let mut wrong_model = report(2, &[vec![1]]);
        wrong_model.model_round = 2;
        assert!(matches!(tally.accept("c", &wrong_model, 2, &mut held_out), Err(ReportRefused::NotAsked(2))));
        let mut out_of_range = report(2, &[vec![1, 0, 0], vec![0, 0, 0], vec![0, 0, 1]]);
        out_of_range.model_round = 3;
        assert!(tally.accept("c", &out_of_range, 2, &mut held_out).is_err());
        let record = tally.record(1);
        assert_eq!((record.reported, record.refused), (0, 3));
        assert!(record.overall.is_none());
    }

    #[test]
    fn a_device_cannot_change_its_declared_held_out_size() {
        let mut held_out = HashMap::new();
        let mut first = Tally::new(3, asked(&[("a", 2, "phone")]));
        first.accept("a", &report(2, &[vec![3, 1], vec![0, 4]]), 2, &mut held_out).unwrap();
        let mut second = Tally::new(3, asked(&[("a", 2, "phone")]));
        let bigger = report(2, &[vec![6, 1], vec![0, 4]]);
        assert!(matches!(
            second.accept("a", &bigger, 2, &mut held_out),
            Err(ReportRefused::HeldOutChanged { before: 8, now: 11 })
        ));
    }

    #[test]
    fn declines_and_departures_are_counted_apart() {
        let mut tally = Tally::new(3, asked(&[("a", 2, "phone"), ("b", 2, "phone")]));
        let declined = EvaluationReport {
            model_round: 3,
            rank: 2,
            held_out_examples: 0,
            sums: None,
            declined: "policy".into(),
            cross: vec![],
        };
        tally.accept("a", &declined, 2, &mut HashMap::new()).unwrap();
        tally.left("b");
        tally.left("stranger");
        assert!(tally.complete());
        let record = tally.record(1);
        assert_eq!((record.declined, record.missing, record.reported), (1, 1, 0));
    }

    #[test]
    fn evaluators_are_a_seeded_share_of_the_connected_devices() {
        let connected: Vec<String> = (0..10).map(|i| format!("d{i}")).collect();
        let half = sample_evaluators(&connected, 0.5, 7, 3);
        assert_eq!(half.len(), 5);
        assert_eq!(half, sample_evaluators(&connected, 0.5, 7, 3));
        assert_ne!(half, sample_evaluators(&connected, 0.5, 7, 4));
        assert_eq!(sample_evaluators(&connected, 0.01, 7, 3).len(), 1);
        assert_eq!(sample_evaluators(&connected, 1.0, 7, 3), connected);
        assert!(sample_evaluators(&[], 1.0, 7, 3).is_empty());
    }

    #[test]
    fn the_cross_rank_view_puts_each_rank_s_model_against_each_class_s_data() {
        let mut evaluators = asked(&[("a", 2, "phone"), ("b", 8, "laptop")]);
        evaluators.get_mut("a").unwrap().cross = vec![8];
        evaluators.get_mut("b").unwrap().cross = vec![2];
        let mut tally = Tally::new(3, evaluators);
        let mut held_out = HashMap::new();
        let with_cross = |rank: u32, own: &[Vec<u64>], other: u32, theirs: &[Vec<u64>]| {
            let mut r = report(rank, own);
            r.cross = vec![flotilla_wire::evaluation::RankSums {
                rank: other,
                sums: EvaluationSums::from_confusion(theirs, 1.0),
            }];
            r
        };
        tally
            .accept("a", &with_cross(2, &[vec![2, 2], vec![0, 4]], 8, &[vec![4, 0], vec![0, 4]]), 2, &mut held_out)
            .unwrap();
        // Asked for rank 2's model, b scores rank 4's: refused.
        let wrong = with_cross(8, &[vec![5, 0], vec![0, 5]], 4, &[vec![5, 0], vec![0, 5]]);
        assert!(matches!(tally.accept("b", &wrong, 2, &mut held_out), Err(ReportRefused::WrongCrossRanks { .. })));
        // Another model scored on another set of examples: refused.
        let mut elsewhere = Tally::new(3, asked(&[("a", 2, "phone")]));
        elsewhere.asked.get_mut("a").unwrap().cross = vec![8];
        let other_data = with_cross(2, &[vec![2, 2], vec![0, 4]], 8, &[vec![1, 0], vec![0, 1]]);
        assert!(matches!(
            elsewhere.accept("a", &other_data, 2, &mut HashMap::new()),
            Err(ReportRefused::CrossExamples { rank: 8, cross: 2, own: 8 })
        ));
        let record = tally.record(1);
        assert!((record.cross_rank[&2]["phone"].accuracy - 0.75).abs() < 1e-12, "a's own model");
        assert!((record.cross_rank[&8]["phone"].accuracy - 1.0).abs() < 1e-12, "rank 8's model on a's data");
        assert!(!record.cross_rank[&8].contains_key("laptop"), "b's report was refused");
    }
}
