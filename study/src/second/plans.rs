//! The suites' plans: what each grid holds, and the quick versions that check the pipeline.

use super::{EdgeSearch, Plan, Skew, BBC_HEADLINES, BBC_NEWS, METHODS, ROTATED_FASHION, ROTTEN_TOMATOES};

impl Plan {
    /// The transformer grid, cut to fit a few hours of 2 cores (docs/study.md says what was cut):
    /// BBC News only (Rotten Tomatoes is the `text-reviews` suite, [`Plan::text_reviews`]), homogeneous bounds at the
    /// lowest rank and R_max only, no centralized rank sweep below R_max.
    pub fn text() -> Plan {
        Plan {
            name: "text",
            suite: "text",
            tasks: vec![BBC_NEWS],
            fleet: vec![("phone", 2, 3), ("phone", 4, 3), ("laptop", 8, 3), ("desktop", 16, 3)],
            scale: 2.0,
            skews: vec![Skew::labels(1.0), Skew::labels(0.1)],
            methods: METHODS.to_vec(),
            homogeneous_ranks: vec![2, 16],
            sweep_ranks: vec![16],
            learning_rates: vec![2e-3, 5e-3],
            full_learning_rates: vec![3e-5, 1e-4],
            seeds: vec![1, 2, 3],
            rounds: 6,
            local_steps: vec![10],
            batch_size: 8,
            eval_samples: 200,
            // The privacy axis of issue 17: Fold-and-Fill, the private-capable method that led the
            // image suite (FLoRA, level with it, cannot run under privacy). 0.2 and 1.0 came
            // first; 0.2 won at every ε, so 0.05 tries below it.
            private_methods: vec!["fold-and-fill"],
            epsilons: vec![1, 4, 8],
            clip_norms: vec![0.2, 1.0, 0.05],
            edge_search: EdgeSearch { learning_rate: 2, local_steps: 1 },
            // One seed decided 9 of BBC's 20 choices by at most half a point: those get a second.
            close_call: Some(0.01),
        }
    }

    /// The harder second task, Rotten Tomatoes (fresh, rotten, plot), cut to fit (docs/study.md
    /// says why): one skew (α = 1), and a learning rate × local steps grid where BBC tunes the
    /// learning rate alone. A first pass at BBC's 10 local steps over learning rates 1e-3 to 1e-2 left
    /// every federated arm at the majority class after 6 rounds; 40 steps leave it. The higher
    /// rates collapsed centralized runs too. The privacy axis stays on BBC News (issue 17 asks for
    /// it on one transformer task).
    pub fn text_reviews() -> Plan {
        Plan {
            name: "text-reviews",
            suite: "text-reviews",
            tasks: vec![ROTTEN_TOMATOES],
            skews: vec![Skew::labels(1.0)],
            learning_rates: vec![1e-3, 2e-3],
            local_steps: vec![10, 40],
            private_methods: Vec::new(),
            // Every setting chose 40 steps, the grid's edge: one doubling past it (80 steps, over
            // 9 minutes a federated run) says whether more would have helped.
            edge_search: EdgeSearch { learning_rate: 2, local_steps: 1 },
            ..Plan::text()
        }
    }

    /// The decoder cell (issue 32), cut to fit about 8 hours of 2 cores (a decoder step costs
    /// seconds): 4 devices (ranks 2, 4, 8, 16), sequences of at most 96 tokens, 3 rounds of 6 steps
    /// of 4; Fold-and-Fill, RBLA, FLoRA and zero-padding (HetLoRA and FlexLoRA cut), homogeneous
    /// FedAvg at rank 16, centralized LoRA at R_max as the bound; α = 1 and 0.1; 3 seeds; no
    /// privacy axis and no full fine-tuning (the coordinator's bound above LoRA is for encoders).
    pub fn headlines() -> Plan {
        Plan {
            name: "headlines",
            suite: "headlines",
            tasks: vec![BBC_HEADLINES],
            fleet: vec![("phone", 2, 1), ("laptop", 4, 1), ("desktop", 8, 1), ("gpu", 16, 1)],
            scale: 2.0,
            skews: vec![Skew::labels(1.0), Skew::labels(0.1)],
            methods: vec!["fold-and-fill", "rbla", "flora", "zero-pad"],
            homogeneous_ranks: vec![16],
            sweep_ranks: vec![16],
            learning_rates: vec![1e-3, 3e-3],
            full_learning_rates: Vec::new(),
            seeds: vec![1, 2, 3],
            rounds: 3,
            local_steps: vec![6],
            batch_size: 4,
            eval_samples: 48,
            private_methods: Vec::new(),
            epsilons: Vec::new(),
            clip_norms: Vec::new(),
            edge_search: EdgeSearch { learning_rate: 1, local_steps: 0 },
            close_call: None,
        }
    }

    /// The decoder cell's pipeline in minutes: one skew, two methods, one rate and seed, 2 rounds.
    pub fn headlines_quick() -> Plan {
        Plan {
            name: "headlines-quick",
            skews: vec![Skew::labels(1.0)],
            methods: vec!["fold-and-fill", "rbla"],
            learning_rates: vec![1e-3],
            seeds: vec![1],
            rounds: 2,
            local_steps: vec![2],
            eval_samples: 8,
            ..Plan::headlines()
        }
    }

    /// One task, one skew, two methods, one learning rate and seed, 3 short rounds: checks the
    /// pipeline in about ten minutes.
    pub fn text_quick() -> Plan {
        Plan {
            name: "text-quick",
            tasks: vec![BBC_NEWS],
            skews: vec![Skew::labels(1.0)],
            methods: vec!["rbla", "fold-and-fill"],
            homogeneous_ranks: vec![2, 16],
            learning_rates: vec![2e-3],
            full_learning_rates: vec![1e-4],
            seeds: vec![1],
            rounds: 3,
            local_steps: vec![4],
            eval_samples: 100,
            epsilons: vec![8],
            clip_norms: vec![0.2],
            close_call: None,
            ..Plan::text()
        }
    }

    pub fn image_shift() -> Plan {
        Plan {
            name: "image-shift",
            suite: "image-shift",
            tasks: vec![ROTATED_FASHION],
            fleet: vec![
                ("phone", 2, 3),
                ("phone", 4, 3),
                ("laptop", 8, 3),
                ("desktop", 16, 3),
                ("gpu", 32, 3),
                ("gpu", 64, 3),
            ],
            scale: 2.0,
            skews: vec![Skew::labels(1.0), Skew::labels(0.1), Skew { alpha: 1.0, share_power: 0.5 }],
            methods: METHODS.to_vec(),
            homogeneous_ranks: vec![2, 4, 8, 16, 32, 64],
            sweep_ranks: vec![2, 4, 8, 16, 32, 64],
            learning_rates: vec![0.001, 0.002, 0.005, 0.01],
            // The base was pretrained at 0.002.
            full_learning_rates: vec![5e-4, 2e-3],
            // A run takes 5–60 s, so this suite affords the 5 seeds.
            seeds: vec![1, 2, 3, 4, 5],
            rounds: 20,
            // 30 came first (its runs keep their keys); 10 is the usual cure for client drift under
            // strong skew, and the cheaper one.
            local_steps: vec![30, 10],
            batch_size: 32,
            eval_samples: 2500,
            private_methods: vec!["rbla", "fold-and-fill"],
            epsilons: vec![1, 4, 8],
            // 0.05 and 0.5 came first; 0.5 won at every ε, so 2.0 tries above it.
            clip_norms: vec![0.05, 0.5, 2.0],
            edge_search: EdgeSearch { learning_rate: 2, local_steps: 1 },
            close_call: Some(0.01),
        }
    }

    /// One skew, two methods, one learning rate and seed, 4 rounds: minutes.
    pub fn image_shift_quick() -> Plan {
        Plan {
            name: "image-shift-quick",
            skews: vec![Skew::labels(1.0)],
            methods: vec!["rbla", "fold-and-fill"],
            homogeneous_ranks: vec![2, 64],
            sweep_ranks: vec![2, 64],
            learning_rates: vec![0.005],
            full_learning_rates: vec![2e-3],
            seeds: vec![1],
            rounds: 4,
            local_steps: vec![15],
            private_methods: vec!["rbla"],
            epsilons: vec![8],
            clip_norms: vec![0.5],
            close_call: None,
            ..Plan::image_shift()
        }
    }
}
