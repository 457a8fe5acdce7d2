//! `distillery generate`: one prompt, one completion, text streamed to stdout as it decodes.
//! Logs and progress go to stderr so the output can be piped.

use anyhow::{Context, Result};
use clap::Args;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use distillery::model::{self, source, DTypeChoice, DeviceChoice, ForwardBatch, KvCache};
use distillery::tokenizer::{ChatMessage, Tokenizer};

#[derive(Args)]
pub struct GenerateArgs {
    /// A local model folder or a Hugging Face hub id (org/name).
    #[arg(long)]
    model: String,
    #[arg(long)]
    prompt: String,
    /// Render the prompt as one user message through the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 means greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, value_enum, default_value_t = DTypeChoice::Auto)]
    dtype: DTypeChoice,
    /// cpu, cuda or cuda:N (needs a build with --features cuda).
    #[arg(long, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
}

const BLOCK_SIZE: usize = 16;

pub fn run(args: GenerateArgs) -> Result<()> {
    let dir: PathBuf = source::resolve(&args.model, &source::HubOptions::from_env())?;
    let decoder = model::load_decoder(&dir, args.dtype, &args.device.open()?)?;
    let tokenizer = Arc::new(Tokenizer::from_dir(&dir)?);
    let prompt_ids = if args.chat {
        let messages = [ChatMessage::new("user", args.prompt.clone())];
        let text = tokenizer.apply_chat_template(&messages, true)?;
        // Templates emit BOS themselves, as transformers' apply_chat_template assumes.
        tokenizer.encode(&text, false)?
    } else {
        tokenizer.encode(&args.prompt, true)?
    };
    anyhow::ensure!(!prompt_ids.is_empty(), "the prompt encodes to no tokens");
    let config = decoder.config();
    let total = (prompt_ids.len() + args.max_tokens).min(config.max_position_embeddings);
    anyhow::ensure!(
        prompt_ids.len() < total,
        "the prompt ({} tokens) leaves no room in the model's {}-token context",
        prompt_ids.len(),
        config.max_position_embeddings
    );
    let num_blocks = total.div_ceil(BLOCK_SIZE);
    let cache = KvCache::new(
        config,
        num_blocks,
        BLOCK_SIZE,
        decoder.dtype(),
        decoder.device(),
    )?;
    let table: Vec<u32> = (0..num_blocks as u32).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.unwrap_or_else(rand::random));
    let mut detok = tokenizer.detokenizer(false);
    let mut stdout = std::io::stdout().lock();
    let mut batch = ForwardBatch::default();
    let mut tokens = prompt_ids.clone();
    let mut computed = 0;
    while tokens.len() < total {
        batch.clear();
        batch.push_sequence(&tokens[computed..], computed, &table, BLOCK_SIZE);
        computed = tokens.len();
        let logits = decoder.forward(&batch, &cache)?.get(0)?.to_vec1::<f32>()?;
        let next = pick(&logits, args.temperature, &mut rng);
        if !args.ignore_eos && config.eos_token_ids.contains(&next) {
            break;
        }
        tokens.push(next);
        if let Some(text) = detok.push(next)? {
            stdout.write_all(text.as_bytes())?;
            stdout.flush()?;
        }
    }
    if let Some(text) = detok.finish()? {
        stdout.write_all(text.as_bytes())?;
    }
    writeln!(stdout).context("writing to stdout")?;
    Ok(())
}

fn pick(logits: &[f32], temperature: f32, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 {
                    (i, l)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits
        .iter()
        .map(|l| ((l - max) / temperature).exp())
        .collect();
    let total: f32 = weights.iter().sum();
    let mut r = rng.gen::<f32>() * total;
    for (i, w) in weights.iter().enumerate() {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    argmax()
}
