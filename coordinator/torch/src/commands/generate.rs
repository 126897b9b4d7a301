//! `flotilla-coordinator generate`: text from a decoder, for an exported model (`export --merged`'s
//! merged/ directory) or a run's checkpoint (the GGUF base with a round's global adapter at a rank).
//! Prompts come from `--prompt`, or one per line of `--input` / stdin (a line that is a JSON object
//! takes its `prompt` field); each is put in the model's chat template unless `--raw`. Greedy
//! decoding, stopping at the end-of-turn token. A prompt longer than the model's context is cut
//! from the left so that the newest text stays (and the cut is said on stderr).

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result};
use flotilla_torch::data::decoder_tokenizer::DecoderTokenizer;
use flotilla_torch::model::decoder_model::DecoderModel;
use flotilla_torch::model::llama::Decoder;
use tch::Tensor;

use crate::config::CoordinatorConfig;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// An exported decoder directory (config.json, model.safetensors, tokenizer.json,
    /// tokenizer_config.json).
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// A decoder run's configuration: its GGUF base with a round's global adapter.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// With --config: the round (default: the last finished one).
    #[arg(long, requires = "config")]
    pub round: Option<u32>,
    /// With --config: the rank whose model to use (default: R_max).
    #[arg(long, requires = "config")]
    pub rank: Option<u32>,
    #[arg(long)]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (default: stdin).
    #[arg(long, conflicts_with = "prompt")]
    pub input: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Use each prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// `text`: the answer per line; `json`: one JSON object per line with the token ids.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Also write each prompt's next-token logits (`prompt_<i>`, f32) to this safetensors file.
    #[arg(long)]
    pub logits_out: Option<PathBuf>,
}

/// The model to generate with: a merged decoder, or a base with an adapter.
enum Generator {
    Merged(Decoder),
    Adapted(Box<DecoderModel>),
}

impl Generator {
    fn decoder(&self) -> &Decoder {
        match self {
            Generator::Merged(decoder) => decoder,
            Generator::Adapted(model) => model.decoder(),
        }
    }

    fn generate(&self, prompt: &[i64], max_new: usize, stop: Option<i64>) -> Result<Vec<i64>> {
        Ok(match self {
            Generator::Merged(decoder) => decoder.generate_greedy(prompt, max_new, stop, None)?,
            Generator::Adapted(model) => model.generate(prompt, max_new, stop)?,
        })
    }

    fn next_logits(&self, prompt: &[i64]) -> Result<Tensor> {
        let input = Tensor::f_from_slice(prompt)?.f_view([1, prompt.len() as i64])?;
        let logits = match self {
            Generator::Merged(decoder) => tch::no_grad(|| decoder.logits(&input, None))?,
            Generator::Adapted(model) => tch::no_grad(|| model.logits(&input))?,
        };
        Ok(logits.f_get(0)?.f_get(prompt.len() as i64 - 1)?)
    }
}

fn open(request: &GenerateArgs) -> Result<(Generator, DecoderTokenizer)> {
    let device = tch::Device::cuda_if_available();
    match (&request.model, &request.config) {
        (Some(dir), None) => {
            let (decoder, tokenizer) = crate::model::hf_decoder::read_merged_decoder(dir, device)?;
            Ok((Generator::Merged(decoder), tokenizer))
        }
        (None, Some(path)) => {
            let config = CoordinatorConfig::load(path)?;
            let decoder = config.model.decoder.as_ref().context("generate --config needs a [model.decoder] run")?;
            let held = crate::commands::export::held_adapter(&config, request.round, request.rank)?;
            let base = crate::model::base::prepare(&config)?;
            let model = DecoderModel::new(
                &config.model.architecture,
                &base.weights,
                &held.adapter,
                config.aggregation.scale(),
                device,
            )?;
            let file = flotilla_torch::gguf::GgufFile::open(&decoder.gguf)
                .with_context(|| format!("cannot open {}", decoder.gguf.display()))?;
            eprintln!("generate: round {} of {}, rank {}", held.round, config.server.run_dir.display(), held.rank);
            Ok((Generator::Adapted(Box::new(model)), DecoderTokenizer::from_gguf(&file)?))
        }
        _ => anyhow::bail!("give either --model DIR (an exported merged/ directory) or --config FILE (a decoder run)"),
    }
}

/// The prompts: `--prompt`, else the lines of `--input` or stdin (JSON objects give their `prompt`).
fn prompts(request: &GenerateArgs) -> Result<Vec<String>> {
    if let Some(prompt) = &request.prompt {
        return Ok(vec![prompt.clone()]);
    }
    let reader: Box<dyn BufRead> = match &request.input {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let mut prompts = Vec::new();
    for (number, line) in reader.lines().enumerate() {
        let line = line.context("cannot read the prompts")?;
        if line.trim().is_empty() {
            continue;
        }
        if line.trim_start().starts_with('{') {
            let value: serde_json::Value =
                serde_json::from_str(&line).with_context(|| format!("line {}: not JSON", number + 1))?;
            let prompt =
                value["prompt"].as_str().with_context(|| format!("line {}: no \"prompt\" string", number + 1))?;
            prompts.push(prompt.to_string());
        } else {
            prompts.push(line);
        }
    }
    Ok(prompts)
}

pub fn run(request: &GenerateArgs) -> Result<()> {
    let (generator, tokenizer) = open(request)?;
    let context = generator.decoder().spec.context;
    let stop = tokenizer.special.eos.map(i64::from);
    let mut logits = Vec::new();
    let mut out = std::io::stdout().lock();
    for (index, prompt) in prompts(request)?.iter().enumerate() {
        let text = if request.raw { prompt.clone() } else { tokenizer.chat_prompt(prompt)? };
        let mut ids: Vec<i64> = tokenizer.encode(&text)?.into_iter().map(i64::from).collect();
        let room = context.saturating_sub(request.max_new_tokens).max(1);
        if ids.len() > room {
            eprintln!(
                "generate: prompt {} has {} tokens; its first {} are cut to fit the context",
                index + 1,
                ids.len(),
                ids.len() - room
            );
            ids.drain(..ids.len() - room);
        }
        anyhow::ensure!(!ids.is_empty(), "prompt {} is empty", index + 1);
        if request.logits_out.is_some() {
            logits.push((format!("prompt_{index}"), generator.next_logits(&ids)?));
        }
        let generated = generator.generate(&ids, request.max_new_tokens, stop)?;
        let kept: Vec<u32> = generated.iter().filter(|&&id| Some(id) != stop).map(|&id| id as u32).collect();
        let answer = tokenizer.decode(&kept)?;
        if request.format == "json" {
            let line =
                serde_json::json!({ "prompt": prompt, "text": answer, "prompt_ids": ids, "generated_ids": generated });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out, "{}", answer.trim())?;
        }
    }
    if let Some(path) = &request.logits_out {
        let named: Vec<(&str, &Tensor)> = logits.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&named, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
