//! `r1v2 generate --model DIR --prompt TEXT [--image PATH]... [-n N] [sampling options]`: sample responses
//! to one question with the generation engine.
//!
//! Chat-model directories (`internvl_chat` / `skywork_chat`) run on `ChatGenerator` (images allowed),
//! Qwen2.5-VL directories (with an LM head) on `Qwen25VlGenerator` (images allowed), plain Qwen2 directories on
//! `Qwen2Generator`. The prompt is the question in the chat template with each
//! image's `<IMG_CONTEXT>` run, or Qwen2.5-VL's `<|image_pad|>` run ([`PromptEncoder`]); generation stops at the model's stop tokens
//! (generation_config.json's EOS, `<|im_end|>`, `<|endoftext|>`). With `-n 1` the text streams to stdout as
//! tokens arrive and the finish reason goes to stderr; with `-n N` every response is printed with its finish
//! reason; `--json` prints one JSON object per response instead (sample index, text, token ids, behaviour
//! log-probs, finish reason).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use clap::Args;

use r1v2_actors::generate::chat::ChatGenerator;
use r1v2_actors::generate::qwen2::Qwen2Generator;
use r1v2_actors::generate::qwen2_5_vl::Qwen25VlGenerator;
use r1v2_actors::generate::{
    generate_groups_streaming, validate_group_size, FinishReason, PromptInput, Rollout,
    SamplingParams, StepModel,
};
use r1v2_actors::model::chat::{ChatModel, Trainable};
use r1v2_actors::model::weights::WeightStore;
use r1v2_actors::model::{qwen2, qwen2_5_vl};

use crate::model_dir::{parse_device, read_json, ModelKind};
use crate::prompting::{EncodedText, PromptEncoder};
use crate::{Error, Result};

/// Arguments of `r1v2 generate`. Sampling options left out take `SamplingParams`' defaults.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model directory (config.json, tokenizer.json, *.safetensors): a chat model, Qwen2.5-VL or a Qwen2 LLM.
    #[arg(long)]
    pub model: PathBuf,
    /// The question (rendered in the chat template; `<image>` marks where each image goes).
    #[arg(long)]
    pub prompt: String,
    /// An image file (repeat for several; chat and Qwen2.5-VL models only).
    #[arg(long = "image")]
    pub images: Vec<PathBuf>,
    /// Number of responses.
    #[arg(short = 'n', long = "num-responses", default_value_t = 1)]
    pub n: usize,
    /// Seed of the responses' random streams.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Softmax temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold, in (0, 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Keep the K most probable tokens (0 = off).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Drop tokens below min_p x the top probability (0 = off).
    #[arg(long)]
    pub min_p: Option<f64>,
    /// Repetition penalty (1 = off).
    #[arg(long)]
    pub repetition_penalty: Option<f64>,
    /// Most tokens per response (also bounded by the model's context).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// A string that ends a response (repeat for several).
    #[arg(long = "stop")]
    pub stop_strings: Vec<String>,
    /// Device: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON object per response instead of text.
    #[arg(long)]
    pub json: bool,
}

impl GenerateArgs {
    /// The sampling parameters: the options given over `SamplingParams::default()`, the model's stop tokens.
    pub fn sampling_params(&self, stop_token_ids: Vec<u32>) -> SamplingParams {
        let defaults = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            max_new_tokens: self.max_new_tokens.unwrap_or(defaults.max_new_tokens),
            stop_token_ids,
            stop_strings: self.stop_strings.clone(),
            seed: self.seed.unwrap_or(defaults.seed),
        }
    }
}

/// How a finish reason is printed.
pub fn describe_finish(reason: FinishReason) -> String {
    match reason {
        FinishReason::StopToken(id) => format!("stop token {id}"),
        FinishReason::StopString(index) => format!("stop string {index}"),
        FinishReason::Length => "length".into(),
    }
}

/// Writes the new suffix of the decoded text as tokens arrive (to stdout in the CLI). Text is held back
/// while it ends inside a multi-byte character (U+FFFD) or while an earlier written part decodes
/// differently.
struct Streamer<'a, W: Write> {
    encoder: &'a PromptEncoder,
    out: W,
    tokens: Vec<u32>,
    printed: String,
    error: Option<Error>,
}

impl<'a, W: Write> Streamer<'a, W> {
    fn new(encoder: &'a PromptEncoder, out: W) -> Self {
        Self {
            encoder,
            out,
            tokens: Vec::new(),
            printed: String::new(),
            error: None,
        }
    }

    /// Takes the next token; the first error (decode, write) is kept for [`Self::finish`].
    fn push(&mut self, token: u32) {
        self.tokens.push(token);
        if self.error.is_some() {
            return;
        }
        let result = self
            .encoder
            .decode(&self.tokens)
            .and_then(|text| self.write_suffix(&text, false));
        if let Err(err) = result {
            self.error = Some(err);
        }
    }

    /// Writes whatever of the final text is not written yet, then a newline.
    fn finish(&mut self, text: &str) -> Result<()> {
        if let Some(err) = self.error.take() {
            return Err(err);
        }
        self.write_suffix(text, true)?;
        self.out.write_all(b"\n").map_err(stdout_error)
    }

    /// Writes what `text` adds to what is written; `last` writes whatever is left (the final text).
    fn write_suffix(&mut self, text: &str, last: bool) -> Result<()> {
        if !last && text.ends_with('\u{FFFD}') {
            return Ok(());
        }
        let suffix = match text.strip_prefix(self.printed.as_str()) {
            Some(suffix) => suffix.to_string(),
            // The decoded text changed before the written end: a fresh line with the final text.
            None if last => format!("\n{text}"),
            None => return Ok(()),
        };
        self.out
            .write_all(suffix.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(stdout_error)?;
        self.printed = text.to_string();
        Ok(())
    }
}

/// Generates and prints the responses to `encoded` on `model`.
fn generate_and_print<M: StepModel>(
    model: &M,
    encoder: &PromptEncoder,
    encoded: EncodedText,
    args: &GenerateArgs,
    params: &SamplingParams,
) -> Result<()> {
    let prompt = PromptInput {
        token_ids: encoded.token_ids,
        prompt_index: 0,
        pixel_values: encoded.pixel_values,
        image_grids: encoded.image_grids,
    };
    let decode = |ids: &[u32]| {
        encoder
            .decode(ids)
            .map_err(|err| r1v2_actors::Error::msg(err.to_string()))
    };
    let streaming = args.n == 1 && !args.json;
    let mut streamer = Streamer::new(encoder, std::io::stdout());
    let groups = generate_groups_streaming(
        model,
        std::slice::from_ref(&prompt),
        args.n,
        params,
        Some(&decode),
        &mut |_, _, token| {
            if streaming {
                streamer.push(token);
            }
        },
    )?;
    // One prompt in, one group out.
    let rollouts: &[Rollout] = groups.first().map_or(&[], |g| g.as_slice());
    let text_of = |rollout: &Rollout| rollout.text.clone().unwrap_or_default();
    if args.json {
        let mut stdout = std::io::stdout().lock();
        for rollout in rollouts {
            let line = serde_json::json!({
                "sample_index": rollout.sample_index,
                "text": text_of(rollout),
                "token_ids": rollout.token_ids,
                "logprobs": rollout.behaviour_logprobs(),
                "finish_reason": describe_finish(rollout.finish_reason),
            });
            writeln!(stdout, "{line}").map_err(stdout_error)?;
        }
    } else if streaming {
        let Some(rollout) = rollouts.first() else {
            return Err(Error::Msg(
                "generate: the engine returned no response".into(),
            ));
        };
        streamer.finish(&text_of(rollout))?;
        eprintln!(
            "[finish: {}, {} tokens]",
            describe_finish(rollout.finish_reason),
            rollout.token_ids.len()
        );
    } else {
        let mut stdout = std::io::stdout().lock();
        for rollout in rollouts {
            writeln!(
                stdout,
                "--- response {}/{} (finish: {}, {} tokens) ---\n{}",
                rollout.sample_index + 1,
                args.n,
                describe_finish(rollout.finish_reason),
                rollout.token_ids.len(),
                text_of(rollout)
            )
            .map_err(stdout_error)?;
        }
    }
    Ok(())
}

fn stdout_error(source: std::io::Error) -> Error {
    Error::Io {
        path: "<stdout>".into(),
        source,
    }
}

/// Loads the model of `dir` (by `kind`) and generates on it.
fn run_model(
    dir: &Path,
    kind: ModelKind,
    device: &Device,
    encoder: &PromptEncoder,
    encoded: EncodedText,
    args: &GenerateArgs,
    params: &SamplingParams,
) -> Result<()> {
    match kind {
        ModelKind::Chat => {
            let mut loaded = ChatModel::load(dir, DType::F32, device, Trainable::frozen())?;
            loaded.model.llm.pack_weights()?; // inference only: the packed CPU kernel
            let generator = ChatGenerator::new(&loaded.model, device);
            generate_and_print(&generator, encoder, encoded, args, params)
        }
        ModelKind::Qwen2CausalLm => {
            let config = qwen2::Config::from_file(&dir.join("config.json"))?;
            let weights = WeightStore::load(dir, DType::F32, device)?;
            let mut model = qwen2::ForCausalLM::new(&config, weights.frozen_var_builder())?;
            model.pack_weights()?; // inference only: the packed CPU kernel
            let generator = Qwen2Generator::new(&model, device);
            generate_and_print(&generator, encoder, encoded, args, params)
        }
        ModelKind::Qwen25Vl => {
            let model = qwen2_5_vl::load_dir(dir, DType::F32, device, |_| false)?.model;
            if !model.has_lm_head() {
                return Err(Error::File {
                    path: dir.join("config.json"),
                    msg: "this Qwen2.5-VL checkpoint has no lm_head.weight (a reward model?): it \
                          cannot generate"
                        .into(),
                });
            }
            let mut decoder = model.causal_lm()?;
            decoder.pack_weights()?; // inference only: the packed CPU kernel
            let generator = Qwen25VlGenerator::new(&model, &decoder, device);
            generate_and_print(&generator, encoder, encoded, args, params)
        }
        ModelKind::Qwen2ValueHead => Err(Error::File {
            path: dir.join("config.json"),
            msg: format!(
                "{} gives scores, not text: it cannot generate",
                kind.describe()
            ),
        }),
    }
}

/// Runs `r1v2 generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    if !args.model.is_dir() {
        return Err(Error::Msg(format!(
            "model directory {} does not exist",
            args.model.display()
        ))
        .into());
    }
    let config_path = args.model.join("config.json");
    let kind = ModelKind::from_config(&read_json(&config_path)?, &config_path)?;
    let device = parse_device(&args.device)?;
    // Check everything cheap before loading weights.
    let encoder = PromptEncoder::from_model_dir(&args.model, &device, DType::F32)?;
    let params = args.sampling_params(encoder.stop_token_ids());
    params.validate()?;
    validate_group_size(args.n)?;
    let encoded = encoder.encode(&args.prompt, &args.images)?;
    run_model(
        &args.model,
        kind,
        &device,
        &encoder,
        encoded,
        &args,
        &params,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoder for the fixture tokenizer (a byte-level BPE of 328 ids) over a Qwen2 config.
    fn encoder() -> (tempfile::TempDir, PromptEncoder) {
        let fixtures = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
        let dir = tempfile::tempdir().expect("a temp dir");
        for (from, to) in [
            ("qwen2/untied/config.json", "config.json"),
            ("preprocess/tokenizer.json", "tokenizer.json"),
        ] {
            std::fs::copy(fixtures.join(from), dir.path().join(to)).expect("copy a fixture");
        }
        let encoder = PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32)
            .expect("a qwen2 dir");
        (dir, encoder)
    }

    #[test]
    fn streaming_writes_each_token_as_it_comes_and_never_half_a_character() -> Result<()> {
        let (_dir, encoder) = encoder();
        let text = "Plain words, then wörds with ümlauts ✓ and an end.";
        let ids = encoder.tokenizer().encode(text)?;
        let mut streamer = Streamer::new(&encoder, Vec::new());
        let mut held_back = 0;
        for (count, &id) in ids.iter().enumerate() {
            streamer.push(id);
            let written = String::from_utf8(streamer.out.clone()).expect("whole characters");
            let decoded = encoder.decode(&ids[..=count])?;
            assert!(!written.contains('\u{FFFD}'), "{written:?}");
            if decoded.ends_with('\u{FFFD}') {
                held_back += 1;
            } else {
                assert_eq!(written, decoded, "after {} tokens", count + 1);
            }
        }
        assert!(
            held_back > 0,
            "no token ended inside a character: the test misses that case"
        );
        streamer.finish(text)?;
        assert_eq!(
            String::from_utf8(streamer.out).expect("utf-8"),
            format!("{text}\n")
        );
        Ok(())
    }

    #[test]
    fn a_final_text_that_differs_goes_on_a_fresh_line() -> Result<()> {
        let (_dir, encoder) = encoder();
        let mut streamer = Streamer::new(&encoder, Vec::new());
        for id in encoder.tokenizer().encode("abc")? {
            streamer.push(id);
        }
        streamer.finish("xyz")?;
        assert_eq!(
            String::from_utf8(streamer.out).expect("utf-8"),
            "abc\nxyz\n"
        );
        Ok(())
    }
}
