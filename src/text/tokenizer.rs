//! A `tokenizer.json` (Hugging Face tokenizers format) loaded through the `tokenizers` crate, with the
//! special tokens of the Qwen2 / InternVL-chat family looked up by name.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// `<|im_start|>`: opens a chat turn (Qwen2 / ChatML).
pub const IM_START: &str = "<|im_start|>";
/// `<|im_end|>`: closes a chat turn; the end-of-generation token of chat models.
pub const IM_END: &str = "<|im_end|>";
/// `<|endoftext|>`: Qwen2's end-of-document / padding token.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// `<img>`: opens an image's run of context tokens (InternVL `IMG_START_TOKEN`).
pub const IMG_START: &str = "<img>";
/// `</img>`: closes an image's run of context tokens (InternVL `IMG_END_TOKEN`).
pub const IMG_END: &str = "</img>";
/// `<IMG_CONTEXT>`: one position that the chat model fills with an image embedding (`IMG_CONTEXT_TOKEN`).
pub const IMG_CONTEXT: &str = "<IMG_CONTEXT>";

/// The ids of the three image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokenIds {
    /// Id of `<img>`.
    pub start: u32,
    /// Id of `</img>`.
    pub end: u32,
    /// Id of `<IMG_CONTEXT>`.
    pub context: u32,
}

/// A loaded `tokenizer.json` and the path it came from (for error messages).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file; a missing or unreadable file is an error naming the path.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|err| Error::File {
            path: path.to_path_buf(),
            msg: format!("not a valid tokenizer.json: {err}"),
        })?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// Loads `DIR/tokenizer.json` of a model directory.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    /// The file this tokenizer was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Vocabulary size including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token that must exist (e.g. a special token); the error names the token and the file.
    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.inner.token_to_id(token).ok_or_else(|| Error::File {
            path: self.path.clone(),
            msg: format!("token `{token}` is not in the vocabulary"),
        })
    }

    /// The ids of `<img>`, `</img>` and `<IMG_CONTEXT>`.
    pub fn image_token_ids(&self) -> Result<ImageTokenIds> {
        Ok(ImageTokenIds {
            start: self.token_id(IMG_START)?,
            end: self.token_id(IMG_END)?,
            context: self.token_id(IMG_CONTEXT)?,
        })
    }

    /// Token ids of `text` as-is (no BOS/EOS added: Qwen2 adds none, and chat text carries its own markers).
    /// Special tokens written in the text (`<|im_start|>`, `<IMG_CONTEXT>`, ...) become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(|err| Error::File {
            path: self.path.clone(),
            msg: format!("encoding failed: {err}"),
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| Error::File {
                path: self.path.clone(),
                msg: format!("decoding failed: {err}"),
            })
    }

    /// The underlying `tokenizers` object, for anything this wrapper does not cover.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
