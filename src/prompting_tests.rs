//! Tests of [`PromptEncoder`] on the tokenizer and images of tests/fixtures/preprocess and the chat config of
//! tests/fixtures/internvl/vit300m (56 px tiles, 4 tokens per tile, 12 tiles at most, thumbnail).

use std::path::{Path, PathBuf};

use super::*;
use crate::text::tokenizer::{IMG_END, IMG_START};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(path: &str) -> PathBuf {
    Path::new(FIXTURES).join(path)
}

/// A model directory (no weights: the encoder reads none) with `config` and the fixture tokenizer.
fn model_dir(config: &str, generation_config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::copy(fixture(config), dir.path().join("config.json")).expect("copy config");
    std::fs::copy(
        fixture("preprocess/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .expect("copy tokenizer");
    if let Some(text) = generation_config {
        std::fs::write(dir.path().join("generation_config.json"), text).expect("write");
    }
    dir
}

fn chat_encoder(generation_config: Option<&str>) -> (tempfile::TempDir, PromptEncoder) {
    let dir = model_dir("internvl/vit300m/config.json", generation_config);
    let encoder = PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32)
        .expect("a chat model dir");
    (dir, encoder)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("same-shaped f32 tensors")
}

#[test]
fn images_become_context_runs_and_tiles() -> Result<()> {
    let (_dir, encoder) = chat_encoder(None);
    assert_eq!(encoder.tokens_per_tile(), Some(4));
    let images = [
        fixture("preprocess/img_wide.png"),
        fixture("preprocess/img_tall.png"),
    ];
    let question = "Compare <image> with <image>.";
    let encoded = encoder.encode(question, &images)?;

    // The same as the pieces by hand: tiles from `load_image`, ids from `encode_prompt`.
    let tiling = TilingConfig::from_model_config(
        &read_json(&fixture("internvl/vit300m/config.json"))?,
        Path::new("config.json"),
    )?;
    let loaded: Vec<_> = images
        .iter()
        .map(|path| load_image(path, &tiling, &Device::Cpu))
        .collect::<Result<_>>()?;
    let tiles: Vec<usize> = loaded.iter().map(|image| image.num_tiles()).collect();
    assert!(tiles[0] > 1, "the wide image is tiled: {tiles:?}");
    let expected_ids = encode_prompt(
        encoder.tokenizer(),
        &ChatTemplate::default(),
        question,
        &tiles,
        4,
    )?;
    assert_eq!(encoded.token_ids, expected_ids);
    let ids = encoder.tokenizer().image_token_ids()?;
    let count = |id: u32| encoded.token_ids.iter().filter(|&&t| t == id).count();
    assert_eq!(count(ids.context), (tiles[0] + tiles[1]) * 4);
    assert_eq!((count(ids.start), count(ids.end)), (2, 2));

    let pixels = encoded.pixel_values.expect("images give tiles");
    let expected = Tensor::cat(
        &loaded
            .iter()
            .map(|image| image.pixel_values.clone())
            .collect::<Vec<_>>(),
        0,
    )?;
    assert_eq!(pixels.dims(), &[tiles[0] + tiles[1], 3, 56, 56]);
    assert_eq!(max_abs_diff(&pixels, &expected), 0.0);
    Ok(())
}

#[test]
fn one_image_without_placeholder_goes_first_and_text_renders_the_template() -> Result<()> {
    let (_dir, encoder) = chat_encoder(None);
    let encoded = encoder.encode("Describe.", &[fixture("preprocess/img_square.png")])?;
    let tiles = encoded.pixel_values.as_ref().expect("tiles").dims()[0];
    let text = encoder.tokenizer().decode(&encoded.token_ids, false)?;
    let expected = format!(
        "<|im_start|>user\n{IMG_START}{}{IMG_END}\nDescribe.<|im_end|>\n<|im_start|>assistant\n",
        IMG_CONTEXT.repeat(tiles * 4)
    );
    assert_eq!(text, expected);

    let text_only = encoder.encode("Hello there", &[])?;
    assert!(text_only.pixel_values.is_none());
    assert_eq!(
        text_only.token_ids,
        encoder
            .tokenizer()
            .encode("<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")?
    );
    let with_system = encoder
        .clone()
        .with_template(ChatTemplate::with_system("Be brief."));
    let ids = with_system.encode("Hello there", &[])?.token_ids;
    assert!(with_system
        .tokenizer()
        .decode(&ids, false)?
        .starts_with("<|im_start|>system\nBe brief.<|im_end|>\n"));
    Ok(())
}

#[test]
fn stop_tokens_come_from_generation_config_and_the_vocab() -> Result<()> {
    let (_dir, encoder) = chat_encoder(Some(r#"{"eos_token_id": [5, 322]}"#));
    let im_end = encoder.tokenizer().token_id(IM_END)?;
    let end_of_text = encoder.tokenizer().token_id(END_OF_TEXT)?;
    assert_eq!(im_end, 322);
    assert_eq!(encoder.stop_token_ids(), vec![5, 322, end_of_text]);
    let (_dir, single) = chat_encoder(Some(r#"{"eos_token_id": 7}"#));
    assert_eq!(single.stop_token_ids(), vec![7, im_end, end_of_text]);
    let (_dir, none) = chat_encoder(None);
    assert_eq!(none.stop_token_ids(), vec![im_end, end_of_text]);

    let dir = model_dir(
        "internvl/vit300m/config.json",
        Some(r#"{"eos_token_id": "x"}"#),
    );
    let err = PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generation_config.json") && err.contains("eos_token_id"),
        "{err}"
    );
    Ok(())
}

#[test]
fn decode_skips_special_tokens() -> Result<()> {
    let (_dir, encoder) = chat_encoder(None);
    let ids = encoder.tokenizer().encode("a cat<|im_end|>")?;
    assert_eq!(encoder.decode(&ids)?, "a cat");
    Ok(())
}

#[test]
fn bad_input_is_an_error_naming_the_file() {
    // No tokenizer.json.
    let dir = tempfile::tempdir().expect("a temp dir");
    std::fs::copy(
        fixture("qwen2/untied/config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let err = PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    // No config.json.
    let err = PromptEncoder::from_model_dir(&dir.path().join("absent"), &Device::Cpu, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent/config.json"), "{err}");

    // Images for a Qwen2 LLM.
    let dir = model_dir("qwen2/untied/config.json", None);
    let qwen2 =
        PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32).expect("a qwen2 dir");
    assert!(!qwen2.takes_images());
    let err = qwen2
        .encode("What?", &[fixture("preprocess/img_square.png")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("takes no images"),
        "{err}"
    );

    let (_dir, chat) = chat_encoder(None);
    // An unreadable image.
    let missing = fixture("preprocess/no_such_image.png");
    let err = chat.encode("What?", &[missing]).unwrap_err().to_string();
    assert!(err.contains("no_such_image.png"), "{err}");
    // A file that is not an image.
    let err = chat
        .encode("What?", &[fixture("preprocess/cases.json")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cases.json") && err.contains("decode"),
        "{err}"
    );
    // Placeholders that do not match the images.
    let err = chat
        .encode(
            "<image> and <image>",
            &[fixture("preprocess/img_square.png")],
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("2 `<image>` placeholders but 1 images"),
        "{err}"
    );
    // A question that writes an IMG_CONTEXT token itself.
    let err = chat
        .encode(
            "<IMG_CONTEXT> what?",
            &[fixture("preprocess/img_square.png")],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    // An empty question.
    let err = chat.encode("  \n", &[]).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");
}

/// A tiny Qwen2.5-VL policy directory (config, preprocessor config, tokenizer with the vision tokens).
fn vl_encoder() -> (tempfile::TempDir, PromptEncoder) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let spec = crate::config::TinySpec::default();
    crate::tiny::write_vl_policy_model(dir.path(), &spec).expect("a tiny Qwen2.5-VL");
    let encoder = PromptEncoder::from_model_dir(dir.path(), &Device::Cpu, DType::F32)
        .expect("a qwen2_5_vl dir");
    (dir, encoder)
}

#[test]
fn qwen2_5_vl_images_become_pad_runs_and_patches() -> Result<()> {
    let (dir, encoder) = vl_encoder();
    assert!(encoder.takes_images() && encoder.tokens_per_tile().is_none());
    let config = VlConfig::from_file(&dir.path().join("config.json"))?;
    let processor = ProcessorConfig::from_dir(dir.path())?;
    let images = [
        fixture("preprocess/img_wide.png"),
        fixture("preprocess/img_tall.png"),
    ];
    let encoded = encoder.encode("Compare <image> with <image>.", &images)?;
    // Pixels and grids are the processor's (exact against transformers, tested in images/qwen2_vl.rs).
    let want = load_images(&images, &processor, &Device::Cpu)?;
    assert_eq!(encoded.image_grids, want.grids);
    let pixels = encoded.pixel_values.as_ref().expect("patches");
    assert_eq!(max_abs_diff(pixels, &want.pixel_values), 0.0);
    // Each image's run sits at its placeholder: start, N pads (N = t * h * w / merge²), end.
    let ids = &encoded.token_ids;
    let starts: Vec<usize> = (0..ids.len())
        .filter(|&i| ids[i] == config.vision_start_token_id)
        .collect();
    assert_eq!(starts.len(), 2, "{ids:?}");
    for (&start, &grid) in starts.iter().zip(&want.grids) {
        let n = grid[0] * grid[1] * grid[2] / 4;
        assert_eq!(config.image_tokens(grid), n);
        assert!(ids[start + 1..=start + n]
            .iter()
            .all(|&id| id == config.image_token_id));
        assert_eq!(ids[start + n + 1], config.vision_end_token_id);
    }
    let tokenizer = encoder.tokenizer();
    let text = tokenizer.inner().decode(ids, false).expect("decodes");
    assert!(
        text.starts_with("<|im_start|>user\nCompare <|vision_start|><|image_pad|>")
            && text.contains("<|vision_end|> with <|vision_start|>")
            && text.ends_with("<|vision_end|>.<|im_end|>\n<|im_start|>assistant\n"),
        "{text}"
    );
    // Without placeholders the runs go in front, as train-rm (and the Qwen2.5-VL reward model) encode them.
    let plain = encoder.encode("What is this?", &images[..1])?;
    let pairs = crate::rm_train::data::PairEncoder::from_model_dir(dir.path(), true)?;
    let (rm_ids, _) = pairs.encode_prompt("What is this?", &images[..1], &Device::Cpu)?;
    assert_eq!(plain.token_ids, rm_ids);
    // Mismatched placeholders and a question that writes a pad token itself are errors.
    let err = encoder
        .encode("<image> <image> <image>", &images)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("3 `<image>` placeholders but 2 images"),
        "{err}"
    );
    let err = encoder
        .encode("<|image_pad|> what?", &images[..1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
    Ok(())
}
