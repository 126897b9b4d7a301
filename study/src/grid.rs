//! What the study runs: the cells of the grid (label skew × participation × arm × seed) and the
//! settings every cell shares.

use std::fmt;

/// How much of the fleet trains in each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Participation {
    Full,
    /// 25% of the connected devices, sampled per round by the coordinator.
    Quarter,
}

impl Participation {
    pub fn fraction(self) -> f64 {
        match self {
            Participation::Full => 1.0,
            Participation::Quarter => 0.25,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Participation::Full => "full",
            Participation::Quarter => "25%",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Participation::Full => "full",
            Participation::Quarter => "quarter",
        }
    }
}

/// One column of the comparison: an aggregation method on the heterogeneous fleet, the FedAvg
/// upper bound (every device at R_max), or the shrinking-global ablation of RBLA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Arm {
    Method(&'static str),
    FedAvgAtMaxRank,
    RblaShrinkingGlobal,
}

/// The rank-heterogeneous methods, in the order the tables show them.
pub const METHODS: [&str; 5] = ["rbla", "zero-pad", "hetlora", "flexlora", "flora"];

impl Arm {
    pub fn method(self) -> &'static str {
        match self {
            Arm::Method(m) => m,
            Arm::FedAvgAtMaxRank => "fedavg",
            Arm::RblaShrinkingGlobal => "rbla",
        }
    }

    pub fn label(self) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::FedAvgAtMaxRank => "fedavg, all at R_max (upper bound)".into(),
            Arm::RblaShrinkingGlobal => "rbla, global shrinks to the round's largest rank".into(),
        }
    }

    fn key(self) -> String {
        match self {
            Arm::Method(m) => m.to_string(),
            Arm::FedAvgAtMaxRank => "fedavg-rmax".into(),
            Arm::RblaShrinkingGlobal => "rbla-shrinking".into(),
        }
    }
}

impl fmt::Display for Arm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

/// A device class of the fleet: how many devices, and the rank each asks for.
#[derive(Debug, Clone, Copy)]
pub struct FleetClass {
    pub class: &'static str,
    pub rank: u32,
    pub devices: u32,
}

/// 20 devices, phones to GPU boxes.
pub const FLEET: [FleetClass; 6] = [
    FleetClass { class: "phone", rank: 2, devices: 4 },
    FleetClass { class: "phone", rank: 4, devices: 4 },
    FleetClass { class: "laptop", rank: 8, devices: 5 },
    FleetClass { class: "desktop", rank: 16, devices: 4 },
    FleetClass { class: "gpu", rank: 32, devices: 2 },
    FleetClass { class: "gpu", rank: 64, devices: 1 },
];

pub const MAX_RANK: u32 = 64;

pub fn fleet_size() -> u32 {
    FLEET.iter().map(|c| c.devices).sum()
}

/// The simulator's `--profile-mix` for an arm: the heterogeneous fleet, or every device at R_max.
pub fn profile_mix(arm: Arm) -> String {
    let rank = |c: &FleetClass| if arm == Arm::FedAvgAtMaxRank { MAX_RANK } else { c.rank };
    FLEET.iter().map(|c| format!("{}:{}={}", c.class, rank(c), c.devices)).collect::<Vec<_>>().join(",")
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub alpha: f64,
    pub participation: Participation,
    pub arm: Arm,
    pub seed: u64,
}

impl Cell {
    /// A file-name-safe key; results are cached under it.
    pub fn key(&self) -> String {
        format!("alpha{}-{}-{}-seed{}", self.alpha, self.participation.key(), self.arm.key(), self.seed)
    }
}

/// Everything a study run is made of.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    pub alphas: Vec<f64>,
    pub participations: Vec<Participation>,
    pub seeds: Vec<u64>,
    pub rounds_full: u32,
    pub rounds_quarter: u32,
    pub local_steps: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub lora_alpha: f64,
    pub pretrain_samples: usize,
    pub pretrain_steps: u32,
}

impl Plan {
    pub fn full() -> Plan {
        Plan {
            name: "full",
            alphas: vec![0.1, 0.5, 1.0],
            participations: vec![Participation::Full, Participation::Quarter],
            seeds: vec![1, 2, 3],
            rounds_full: 20,
            rounds_quarter: 30,
            local_steps: 30,
            batch_size: 32,
            learning_rate: 0.005,
            lora_alpha: 128.0,
            pretrain_samples: 5000,
            pretrain_steps: 100,
        }
    }

    /// One label skew, one seed, a few rounds: minutes, to check the pipeline end to end.
    pub fn quick() -> Plan {
        Plan {
            name: "quick",
            alphas: vec![0.5],
            seeds: vec![1],
            rounds_full: 4,
            rounds_quarter: 6,
            local_steps: 15,
            ..Plan::full()
        }
    }

    pub fn rounds(&self, participation: Participation) -> u32 {
        match participation {
            Participation::Full => self.rounds_full,
            Participation::Quarter => self.rounds_quarter,
        }
    }

    /// The arms compared under one setting: every method, the upper bound, and (where partial
    /// participation makes it matter) the shrinking-global ablation.
    pub fn arms(&self, participation: Participation) -> Vec<Arm> {
        let mut arms: Vec<Arm> = METHODS.iter().map(|&m| Arm::Method(m)).collect();
        arms.push(Arm::FedAvgAtMaxRank);
        if participation == Participation::Quarter {
            arms.push(Arm::RblaShrinkingGlobal);
        }
        arms
    }

    pub fn cells(&self) -> Vec<Cell> {
        // Seed by seed, so that a study cut short still covers every setting.
        let mut cells = Vec::new();
        for &seed in &self.seeds {
            for &alpha in &self.alphas {
                for &participation in &self.participations {
                    for arm in self.arms(participation) {
                        cells.push(Cell { alpha, participation, arm, seed });
                    }
                }
            }
        }
        cells
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_plan_covers_every_required_cell_once() {
        let plan = Plan::full();
        let cells = plan.cells();
        // 3 alphas × (6 arms at full + 7 at 25%) × 3 seeds.
        assert_eq!(cells.len(), 3 * (6 + 7) * 3);
        let mut keys: Vec<String> = cells.iter().map(Cell::key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), cells.len());
        assert!(fleet_size() >= 20);
    }

    #[test]
    fn the_upper_bound_puts_every_device_at_max_rank() {
        assert_eq!(
            profile_mix(Arm::FedAvgAtMaxRank),
            "phone:64=4,phone:64=4,laptop:64=5,desktop:64=4,gpu:64=2,gpu:64=1"
        );
        assert!(profile_mix(Arm::Method("rbla")).starts_with("phone:2=4,phone:4=4,laptop:8=5"));
    }
}
