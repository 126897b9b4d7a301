//! Tuning on the validation split: each setting's candidates, and the search past the grid's
//! edges.
//!
//! A setting first tries its grid: learning rate × local steps, or a private arm's clipping bounds
//! at its method's choice. A best candidate on an edge of a tuned axis means the grid may have cut
//! the search short. So when the best has the largest (smallest) learning rate tried, the setting
//! also tries twice (half) that rate at the best's local steps, and likewise doubles (halves) the
//! local steps at the best's learning rate. It stops once the best lies inside what was tried, or
//! after [`EdgeSearch`]'s limit of values past the grid on that side. A choice still on an edge
//! then is reported as such.

use super::results::{Choice, Chosen, Edge, Tuned};
use super::{Arm, Cell, Phase, Plan, Setting};

/// How many values past each edge of the grid tuning may try, per axis and side (0: the grid
/// only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeSearch {
    pub learning_rate: u32,
    pub local_steps: u32,
}

/// Where a setting's tuning stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Every candidate it needs so far, the grid first, then the values past its edges in the
    /// order they were added.
    pub cells: Vec<Cell>,
    /// The validation score of each candidate that has one, in the same order.
    pub scores: Vec<(Choice, f64)>,
    /// Once every candidate has a score and the search is over: the best (the first of equal
    /// scores) and the edges it still lies on.
    pub best: Option<(Choice, Vec<Edge>)>,
    /// The candidates also run at seed 2 (a close call): their score is the mean of both seeds.
    pub doubled: Vec<Choice>,
}

#[derive(Debug, Clone, Copy)]
enum Axis {
    LearningRate,
    LocalSteps,
}

impl Axis {
    fn value(self, choice: &Choice) -> f64 {
        match self {
            Axis::LearningRate => choice.learning_rate,
            Axis::LocalSteps => f64::from(choice.local_steps),
        }
    }

    /// `choice` moved one value past the edge: twice (`up`) or half the value, at the same other
    /// coordinates; `None` where halving gives nothing new (one local step).
    fn step(self, choice: Choice, up: bool) -> Option<Choice> {
        match self {
            Axis::LearningRate => {
                let learning_rate = if up { choice.learning_rate * 2.0 } else { choice.learning_rate / 2.0 };
                Some(Choice { learning_rate, ..choice })
            }
            Axis::LocalSteps => {
                let local_steps = if up { choice.local_steps.saturating_mul(2) } else { choice.local_steps / 2 };
                (local_steps >= 1 && local_steps != choice.local_steps).then_some(Choice { local_steps, ..choice })
            }
        }
    }

    fn edges(self) -> (Edge, Edge) {
        match self {
            Axis::LearningRate => (Edge::LowestLearningRate, Edge::HighestLearningRate),
            Axis::LocalSteps => (Edge::FewestSteps, Edge::MostSteps),
        }
    }
}

impl Plan {
    /// A setting's grid (before any search past its edges): one candidate per learning rate and
    /// local steps; for a private arm, one per clipping bound at the learning rate and steps its
    /// method chose without privacy (none before that).
    pub fn grid(&self, setting: Setting, chosen: &Chosen) -> Vec<Choice> {
        let (task, skew, arm) = setting;
        match arm {
            Arm::Private { method, .. } => match chosen.get(&self.setting_key(task, skew, Arm::Method(method))) {
                Some(plain) => self.clip_norms.iter().map(|&c| Choice { clip_norm: Some(c), ..plain.choice }).collect(),
                None => Vec::new(),
            },
            Arm::FullFineTune => self.rates_by_steps(&self.full_learning_rates),
            _ => self.rates_by_steps(&self.learning_rates),
        }
    }

    /// `learning_rates` × the plan's local steps, in that order.
    pub fn rates_by_steps(&self, learning_rates: &[f64]) -> Vec<Choice> {
        learning_rates
            .iter()
            .flat_map(|&learning_rate| {
                self.local_steps.iter().map(move |&local_steps| Choice { learning_rate, local_steps, clip_norm: None })
            })
            .collect()
    }

    /// A setting's tuning cell for one candidate at `seed`.
    pub fn tuning_cell(&self, setting: Setting, choice: Choice, seed: u64) -> Cell {
        let (task, skew, arm) = setting;
        let Choice { learning_rate, local_steps, clip_norm } = choice;
        Cell { task, phase: Phase::Tune, skew, arm, learning_rate, local_steps, clip_norm, seed }
    }

    /// A setting's tuning so far, given the validation score of each run that has finished.
    ///
    /// Waves: the grid at seed 1; once every candidate has a score, the candidates within the
    /// plan's close call of the best also run at seed 2 and are compared on their mean; then the
    /// values past an edge the best lies on; until nothing is left to try.
    pub fn tune(&self, setting: Setting, chosen: &Chosen, score: &mut dyn FnMut(&Cell) -> Option<f64>) -> Tuning {
        let grid = self.grid(setting, chosen);
        let mut tried = grid.clone();
        let mut doubled: Vec<Choice> = Vec::new();
        // Each run is scored once, however many waves the search takes.
        let mut known: Vec<(Cell, Option<f64>)> = Vec::new();
        loop {
            let wanted = tried.iter().map(|&c| (c, 1)).chain(doubled.iter().map(|&c| (c, 2)));
            let cells: Vec<Cell> = wanted.map(|(choice, seed)| self.tuning_cell(setting, choice, seed)).collect();
            for cell in &cells {
                if !known.iter().any(|(c, _)| c == cell) {
                    known.push((cell.clone(), score(cell)));
                }
            }
            let score_of = |choice: Choice, seed: u64| {
                let cell = self.tuning_cell(setting, choice, seed);
                known.iter().find(|(c, _)| *c == cell).and_then(|(_, s)| *s)
            };
            // A candidate's score: its seed-1 score, or the mean with seed 2 once a close call ran it.
            let scores: Vec<(Choice, f64)> = tried
                .iter()
                .filter_map(|&c| {
                    let first = score_of(c, 1)?;
                    Some((c, score_of(c, 2).map_or(first, |second| (first + second) / 2.0)))
                })
                .collect();
            let complete =
                !cells.is_empty() && cells.iter().all(|cell| known.iter().any(|(c, s)| c == cell && s.is_some()));
            // The first of equal scores: the order tried breaks ties.
            let best = scores.iter().copied().reduce(|b, s| if s.1 > b.1 { s } else { b }).filter(|_| complete);
            let Some((best, best_score)) = best else { return Tuning { cells, scores, best: None, doubled } };
            if let Some(close) = self.close_call.filter(|_| !matches!(setting.2, Arm::Private { .. })) {
                let near: Vec<Choice> =
                    scores.iter().filter(|s| s.1 >= best_score - close - 1e-12).map(|s| s.0).collect();
                let new: Vec<Choice> = near.iter().copied().filter(|c| !doubled.contains(c)).collect();
                if near.len() > 1 && !new.is_empty() {
                    doubled.extend(new);
                    continue;
                }
            }
            let (more, edges) = self.past_edges(setting.2, &grid, &tried, best);
            let more: Vec<Choice> = more.into_iter().filter(|c| !tried.contains(c)).collect();
            if more.is_empty() {
                return Tuning { cells, scores, best: Some((best, edges)), doubled };
            }
            tried.extend(more);
        }
    }

    /// The candidates one value past the edges that `best` lies on, within the plan's limits, and
    /// the edges it lies on where no further value may be tried.
    fn past_edges(&self, arm: Arm, grid: &[Choice], tried: &[Choice], best: Choice) -> (Vec<Choice>, Vec<Edge>) {
        let (mut more, mut edges) = (Vec::new(), Vec::new());
        // A private arm's learning rate and steps are its method's; its clipping grid is fixed.
        if matches!(arm, Arm::Private { .. }) {
            return (more, edges);
        }
        let limits =
            [(Axis::LearningRate, self.edge_search.learning_rate), (Axis::LocalSteps, self.edge_search.local_steps)];
        for (axis, limit) in limits {
            let range = |choices: &[Choice]| {
                choices
                    .iter()
                    .map(|c| axis.value(c))
                    .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
            };
            let (grid_lo, grid_hi) = range(grid);
            // An axis with one value is not tuned.
            if grid_lo >= grid_hi {
                continue;
            }
            let (tried_lo, tried_hi) = range(tried);
            let past = |below: bool| {
                let mut values: Vec<f64> = tried
                    .iter()
                    .map(|c| axis.value(c))
                    .filter(|&v| if below { v < grid_lo } else { v > grid_hi })
                    .collect();
                values.sort_by(f64::total_cmp);
                values.dedup();
                values.len() as u32
            };
            let value = axis.value(&best);
            let (low_edge, high_edge) = axis.edges();
            for (on_edge, up, edge) in [(value <= tried_lo, false, low_edge), (value >= tried_hi, true, high_edge)] {
                if !on_edge {
                    continue;
                }
                match axis.step(best, up).filter(|_| past(!up) < limit) {
                    Some(next) => more.push(next),
                    None => edges.push(edge),
                }
            }
        }
        (more, edges)
    }

    /// Every setting of `task` in order (a private arm needs its method's choice): what each
    /// finished tuning chose, and every tuning cell needed so far, given the scores of finished runs.
    pub fn tune_task(&self, task: &'static str, score: &mut dyn FnMut(&Cell) -> Option<f64>) -> (Chosen, Vec<Cell>) {
        let mut chosen = Chosen::new();
        let mut cells = Vec::new();
        for setting in self.settings(task) {
            let tuning = self.tune(setting, &chosen, score);
            if let Some((choice, edges)) = tuning.best {
                let tuned = Tuned { choice, scores: tuning.scores, edges, doubled: tuning.doubled };
                chosen.insert(self.setting_key(setting.0, setting.1, setting.2), tuned);
            }
            cells.extend(tuning.cells);
        }
        (chosen, cells)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::second::Skew;

    /// The candidates tried, at seed 1 (close calls add seed-2 cells after them).
    fn tried(tuning: &Tuning) -> Vec<(f64, u32)> {
        tuning.cells.iter().filter(|c| c.seed == 1).map(|c| (c.learning_rate, c.local_steps)).collect()
    }

    #[test]
    fn a_best_learning_rate_on_the_grid_edge_is_searched_past_until_it_lies_inside() {
        let plan = Plan::text();
        let setting = ("bbc", Some(Skew::labels(1.0)), Arm::Method("flora"));
        // Accuracy peaks at 0.01: one doubling past the grid's 0.005 finds it, a second shows it.
        let mut score = |c: &Cell| Some(1.0 - (c.learning_rate.log2() - 0.01f64.log2()).abs() / 10.0);
        let tuning = plan.tune(setting, &Chosen::new(), &mut score);
        assert_eq!(tried(&tuning), vec![(0.002, 10), (0.005, 10), (0.01, 10), (0.02, 10)]);
        let (best, edges) = tuning.best.clone().unwrap();
        assert_eq!((best.learning_rate, edges), (0.01, Vec::new()));
        assert_eq!(plan.cell_key(&tuning.cells[2]), "bbc-tune-alpha1-flora-lr0.01-seed1");
        // A run still missing leaves the tuning open, its cell listed to run.
        let mut partial = |c: &Cell| (c.learning_rate < 0.015).then(|| score(c)).flatten();
        let open = plan.tune(setting, &Chosen::new(), &mut partial);
        assert_eq!((open.cells.len(), open.scores.len(), open.best), (4, 3, None));

        // Rising without end: two values past the grid, then the choice is flagged.
        let mut rising = |c: &Cell| Some(c.learning_rate);
        let tuning = plan.tune(setting, &Chosen::new(), &mut rising);
        assert_eq!(tried(&tuning), vec![(0.002, 10), (0.005, 10), (0.01, 10), (0.02, 10)]);
        assert_eq!(tuning.best.unwrap(), (tuning.scores[3].0, vec![Edge::HighestLearningRate]));
        // Falling: halving below the grid's lowest rate.
        let mut falling = |c: &Cell| Some(-c.learning_rate);
        let tuning = plan.tune(setting, &Chosen::new(), &mut falling);
        assert_eq!(tried(&tuning), vec![(0.002, 10), (0.005, 10), (0.001, 10), (0.0005, 10)]);
        assert_eq!(tuning.best.unwrap().1, vec![Edge::LowestLearningRate]);
        // A flat score keeps the first tried, which stops the search once it is inside.
        let tuning = plan.tune(setting, &Chosen::new(), &mut |_| Some(0.5));
        assert_eq!(tried(&tuning), vec![(0.002, 10), (0.005, 10), (0.001, 10)]);
        assert_eq!(tuning.best.unwrap(), (tuning.scores[0].0, Vec::new()));
    }

    #[test]
    fn local_steps_are_searched_at_the_best_learning_rate_within_the_plans_limit() {
        let image = Plan::image_shift();
        let setting = ("fashion-rot90", Some(Skew::labels(1.0)), Arm::Method("rbla"));
        // Best at 0.005 (inside the grid) and 30 steps (its most): 60 steps are tried at 0.005 only.
        let mut score = |c: &Cell| Some(f64::from(c.local_steps) - 1000.0 * (c.learning_rate - 0.005).abs());
        let tuning = image.tune(setting, &Chosen::new(), &mut score);
        assert_eq!(tuning.cells.len(), 4 * 2 + 1);
        assert_eq!(tried(&tuning)[8], (0.005, 60));
        assert_eq!(image.cell_key(&tuning.cells[8]), "fashion-rot90-tune-alpha1-rbla-lr0.005-steps60-seed1");
        assert_eq!(tuning.best.unwrap().1, vec![Edge::MostSteps]);

        // Rotten Tomatoes searches one doubling past its 40 steps (every setting chose 40).
        let reviews = Plan::text_reviews();
        let setting = ("rt", Some(Skew::labels(1.0)), Arm::Method("rbla"));
        let mut score = |c: &Cell| Some(f64::from(c.local_steps) - 1000.0 * (c.learning_rate - 0.001).abs());
        let tuning = reviews.tune(setting, &Chosen::new(), &mut score);
        assert_eq!(tried(&tuning), vec![(0.001, 10), (0.001, 40), (0.002, 10), (0.002, 40), (0.0005, 40), (0.001, 80)]);
        let (best, edges) = tuning.best.unwrap();
        assert_eq!((best.learning_rate, best.local_steps, edges), (0.001, 80, vec![Edge::MostSteps]));
    }

    #[test]
    fn close_calls_are_decided_on_the_mean_of_two_seeds_and_clear_ones_on_one() {
        let plan = Plan::text();
        let setting = ("bbc", Some(Skew::labels(1.0)), Arm::Method("rbla"));
        // Seed 1: 0.005 leads 0.002 by half a point; seed 2 reverses it by more.
        let mut score = |c: &Cell| {
            Some(match (c.learning_rate, c.seed) {
                (0.002, 1) => 0.900,
                (0.005, 1) => 0.905,
                (0.002, _) => 0.910,
                (0.005, _) => 0.890,
                _ => 0.5,
            })
        };
        let tuning = plan.tune(setting, &Chosen::new(), &mut score);
        let seeds: Vec<(f64, u64)> = tuning.cells.iter().map(|c| (c.learning_rate, c.seed)).collect();
        assert_eq!(seeds, vec![(0.002, 1), (0.005, 1), (0.001, 1), (0.002, 2), (0.005, 2)]);
        assert_eq!(plan.cell_key(&tuning.cells[3]), "bbc-tune-alpha1-rbla-lr0.002-seed2");
        let (best, edges) = tuning.best.clone().unwrap();
        assert_eq!((best.learning_rate, edges), (0.002, Vec::new()), "the mean decides: 0.905 against 0.8975");
        assert_eq!(tuning.doubled.len(), 2);
        assert!(tuning.scores.iter().any(|(c, s)| c.learning_rate == 0.002 && (s - 0.905).abs() < 1e-12));
        // A seed-2 run still missing leaves the tuning open.
        let mut partial = |c: &Cell| (c.seed == 1).then(|| score(c)).flatten();
        assert_eq!(plan.tune(setting, &Chosen::new(), &mut partial).best, None);
        // More than a point apart: one seed.
        let mut clear = |c: &Cell| Some(if c.learning_rate == 0.002 { 0.95 } else { 0.90 });
        let tuning = plan.tune(setting, &Chosen::new(), &mut clear);
        assert!(tuning.cells.iter().all(|c| c.seed == 1) && tuning.doubled.is_empty());
        // The quick plans keep one seed.
        let quick = Plan::text_quick().tune(setting, &Chosen::new(), &mut |_| Some(0.5));
        assert!(quick.cells.iter().all(|c| c.seed == 1));
    }

    #[test]
    fn single_value_axes_and_private_arms_are_not_searched() {
        let quick = Plan::text_quick();
        let setting = ("bbc", Some(Skew::labels(1.0)), Arm::Method("rbla"));
        let tuning = quick.tune(setting, &Chosen::new(), &mut |c| Some(c.learning_rate));
        assert_eq!(tried(&tuning), vec![(2e-3, 4)]);
        assert_eq!(tuning.best.unwrap().1, Vec::new());

        let plan = Plan::text();
        let mut chosen = Chosen::new();
        let plain = Choice { learning_rate: 0.005, local_steps: 10, clip_norm: None };
        let key = plan.setting_key("bbc", Some(Skew::labels(1.0)), Arm::Method("fold-and-fill"));
        chosen.insert(key, Tuned { choice: plain, scores: Vec::new(), edges: Vec::new(), doubled: Vec::new() });
        let private = ("bbc", Some(Skew::labels(1.0)), Arm::Private { method: "fold-and-fill", epsilon: 4 });
        let tuning = plan.tune(private, &chosen, &mut |c| c.clip_norm);
        assert_eq!(
            tuning.cells.iter().map(|c| c.clip_norm).collect::<Vec<_>>(),
            vec![Some(0.2), Some(1.0), Some(0.05)]
        );
        assert_eq!(tuning.best.unwrap().0.clip_norm, Some(1.0));
    }

    #[test]
    fn a_task_is_tuned_setting_by_setting_and_private_arms_wait_for_their_method() {
        let plan = Plan::text();
        let (chosen, cells) = plan.tune_task("bbc", &mut |_| None);
        assert!(chosen.is_empty());
        assert!(cells.iter().all(|c| c.clip_norm.is_none()));
        // Every run scored: every setting tuned, the private arms included (their clipping grid).
        let (chosen, cells) = plan.tune_task("bbc", &mut |c| Some(c.clip_norm.unwrap_or(0.0) - c.learning_rate));
        assert_eq!(chosen.len(), plan.settings("bbc").len());
        assert_eq!(cells.iter().filter(|c| c.clip_norm.is_some()).count(), 3 * 3);
        let full = &chosen[&plan.setting_key("bbc", None, Arm::FullFineTune)];
        assert_eq!(full.choice.learning_rate, 3e-5 / 4.0);
        assert_eq!(full.edges, vec![Edge::LowestLearningRate]);
    }
}
