//! What both paths of the offline `aggregate` command read and decide before any tensor is folded:
//! each input's adapter config and sample count, the output's rank and LoRA scale and the notes
//! about them, the output's metadata, and the seed of slots no input covers. The fast path
//! ([`crate::fast_path`]) and the libtorch path (`flotilla_coordinator_torch::offline`) both call these, so
//! the two cannot drift apart.
//!
//! LoRA scales: a PEFT adapter computes `lora_alpha / r · B·A`. When the inputs' scales differ, each
//! client's B is rescaled into one common scale before aggregating (the scale of the largest-rank
//! input), and the output's `lora_alpha` is set so that `lora_alpha / r_out` is that scale. The
//! output metadata and the command's output say when this happened.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use crate::method::Method;
use crate::peft::{PeftConfig, ADAPTER_CONFIG_FILE, MAX_RANK, NUM_SAMPLES_KEY};

/// An input the command cannot use, with what is wrong and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError(pub String);

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

fn invalid<T>(message: String) -> Result<T, InputError> {
    Err(InputError(message))
}

/// The input's `adapter_config.json`, with `r` in `1..=MAX_RANK` and a positive `lora_alpha`.
pub fn read_config(dir: &Path) -> Result<PeftConfig, InputError> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| InputError(format!("{}: cannot read: {e}", path.display())))?;
    let config: PeftConfig = serde_json::from_str(&text)
        .map_err(|e| InputError(format!("{}: not a valid adapter config: {e}", path.display())))?;
    if config.r == 0 || config.r > MAX_RANK {
        return invalid(format!("{}: r = {} is outside 1..={MAX_RANK}", path.display(), config.r));
    }
    if !(config.lora_alpha.is_finite() && config.lora_alpha > 0.0) {
        return invalid(format!("{}: lora_alpha must be a positive number, got {}", path.display(), config.lora_alpha));
    }
    Ok(config)
}

/// The client's sample count from its safetensors metadata (`weights` names the file in errors).
pub fn num_samples(metadata: Option<&HashMap<String, String>>, weights: &Path) -> Result<u64, InputError> {
    let Some(samples) = metadata.and_then(|m| m.get(NUM_SAMPLES_KEY)) else {
        return invalid(format!(
            "{}: no '{NUM_SAMPLES_KEY}' entry in the safetensors metadata (the client's sample count)",
            weights.display()
        ));
    };
    match samples.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => invalid(format!("{}: '{NUM_SAMPLES_KEY}' must be a positive integer, got '{samples}'", weights.display())),
    }
}

/// A config's LoRA scale, `lora_alpha / r`.
pub fn scale(config: &PeftConfig) -> f64 {
    config.lora_alpha / config.r as f64
}

/// The output's shape, decided from the inputs' configs alone.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Index of the input whose tensors shape the output: the last of the largest rank.
    pub largest: usize,
    /// Rank slots of the output: `--max-rank`, or the largest input rank.
    pub out_rank: usize,
    /// The LoRA scale every input is brought to: the largest input's.
    pub target_scale: f64,
    /// What the command tells the user about how the output was made.
    pub notes: Vec<String>,
}

/// Decides the output's rank and scale for inputs `(dir, config)` and an optional `--max-rank`.
pub fn plan(inputs: &[(&Path, &PeftConfig)], max_rank: Option<usize>) -> Result<Plan, InputError> {
    let Some((largest, (largest_dir, largest_config))) = inputs.iter().enumerate().max_by_key(|(_, (_, c))| c.r) else {
        return invalid("no client adapter directories given".into());
    };
    let max_input_rank = largest_config.r;
    let out_rank = match max_rank {
        Some(r) if r > MAX_RANK => {
            return invalid(format!("--max-rank {r} is above the largest supported rank, {MAX_RANK}"))
        }
        Some(r) if r < max_input_rank => {
            return invalid(format!(
                "--max-rank {r} is below the rank of {} ({max_input_rank}); it must be at least the largest input rank",
                largest_dir.display()
            ))
        }
        Some(r) => r,
        None => max_input_rank,
    };
    let target_scale = scale(largest_config);
    let mut notes = Vec::new();
    if inputs.iter().any(|(_, c)| (scale(c) - target_scale).abs() > 1e-12 * target_scale) {
        notes.push(format!(
            "inputs use different LoRA scales (lora_alpha / r); B factors were rescaled to the scale {target_scale} of {}",
            largest_dir.display()
        ));
    }
    Ok(Plan { largest, out_rank, target_scale, notes })
}

/// The output file's safetensors metadata.
pub fn output_metadata(
    method: Method,
    clients: usize,
    total_samples: u64,
    target_scale: f64,
    notes: &[String],
) -> BTreeMap<String, String> {
    let mut metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("flotilla_method".to_string(), method.name().to_string()),
        ("flotilla_clients".to_string(), clients.to_string()),
        (NUM_SAMPLES_KEY.to_string(), total_samples.to_string()),
        ("flotilla_lora_scale".to_string(), target_scale.to_string()),
    ]);
    if !notes.is_empty() {
        metadata.insert("flotilla_notes".to_string(), notes.join("; "));
    }
    metadata
}

/// Seeds module `index`'s (in name order) fresh A rows for slots no input covers (only when
/// `--max-rank` exceeds every input's rank): A uniform ±1/√d_in, B zero, so they do not change the
/// model and can still learn.
pub fn uncovered_slot_seed(module_index: usize) -> u64 {
    0xada9 + module_index as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(r: usize, lora_alpha: f64) -> PeftConfig {
        PeftConfig::for_tensors(std::iter::empty(), r, lora_alpha)
    }

    #[test]
    fn the_plan_takes_the_last_of_the_largest_and_checks_max_rank() {
        let (a, b, c) = (config(4, 8.0), config(8, 16.0), config(8, 16.0));
        let dirs = [Path::new("a"), Path::new("b"), Path::new("c")];
        let inputs = [(dirs[0], &a), (dirs[1], &b), (dirs[2], &c)];
        let plan = plan(&inputs, None).unwrap();
        assert_eq!((plan.largest, plan.out_rank, plan.target_scale), (2, 8, 2.0));
        assert!(plan.notes.is_empty(), "equal scales need no note");
        assert_eq!(super::plan(&inputs, Some(16)).unwrap().out_rank, 16);
        assert!(super::plan(&inputs, Some(4)).unwrap_err().0.contains("below the rank of c"));
        assert!(super::plan(&inputs, Some(MAX_RANK + 1)).unwrap_err().0.contains("above the largest supported"));
        assert!(super::plan(&[], None).is_err());
        let other_scale = config(2, 8.0);
        let mixed = [(dirs[0], &other_scale), (dirs[1], &b)];
        assert!(super::plan(&mixed, None).unwrap().notes[0].contains("rescaled to the scale 2 of b"));
    }

    #[test]
    fn sample_counts_must_be_positive_integers() {
        let weights = Path::new("w.safetensors");
        let with = |v: &str| HashMap::from([(NUM_SAMPLES_KEY.to_string(), v.to_string())]);
        assert_eq!(num_samples(Some(&with(" 12 ")), weights).unwrap(), 12);
        assert!(num_samples(Some(&with("0")), weights).is_err());
        assert!(num_samples(Some(&with("-3")), weights).is_err());
        assert!(num_samples(None, weights).unwrap_err().0.contains("no 'num_samples' entry"));
    }

    #[test]
    fn metadata_names_the_method_and_carries_the_notes() {
        let plain = output_metadata(Method::ZeroPad, 3, 90, 2.0, &[]);
        assert_eq!(plain["flotilla_method"], "zero-pad");
        assert_eq!(plain[NUM_SAMPLES_KEY], "90");
        assert!(!plain.contains_key("flotilla_notes"));
        let noted = output_metadata(Method::Rbla, 2, 5, 1.0, &["a".into(), "b".into()]);
        assert_eq!(noted["flotilla_notes"], "a; b");
    }
}
