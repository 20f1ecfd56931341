//! The chat template of Qwen2 and of the InternVL-chat / Skywork-R1V models, and `<image>` expansion.
//!
//! InternVL's `conversation.py` template `internvl2_5` (MPT separator style) renders
//! `<|im_start|>system\n{system}<|im_end|>\n` + per turn `<|im_start|>{role}\n{content}<|im_end|>\n` and, as
//! the generation prompt, `<|im_start|>assistant\n` - the same text as Qwen2's jinja template when a system
//! message is given. InternVL's default system message is its own identity line; here the system message is
//! configurable and optional. `<image>` becomes `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) +
//! `</img>`, each occurrence taking the next image, as in InternVL's `chat`
//! (`query.replace('<image>', image_tokens, 1)`).

use super::tokenizer::{IMG_CONTEXT, IMG_END, IMG_START, IM_END, IM_START};
use crate::{Error, Result};

/// The image placeholder that users write in a question.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

/// Who speaks a chat turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The question.
    User,
    /// The model's answer.
    Assistant,
}

impl Role {
    /// The role's name as written after `<|im_start|>`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said (may contain `<image>` placeholders before expansion).
    pub content: String,
}

impl Message {
    /// A turn of `role` saying `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// The Qwen / InternVL-chat template with an optional system message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChatTemplate {
    /// Rendered as a leading system turn when set (and when the messages have no system turn of their own).
    pub system_message: Option<String>,
    /// Text appended after the generation prompt `<|im_start|>assistant\n` (e.g. `"<think>\n"` for
    /// QwQ-style forced thinking); empty by default, as in InternVL.
    pub generation_prefix: String,
}

impl ChatTemplate {
    /// A template with the given system message.
    pub fn with_system(system_message: impl Into<String>) -> Self {
        Self {
            system_message: Some(system_message.into()),
            generation_prefix: String::new(),
        }
    }

    /// Renders `messages` turn by turn; with `add_generation_prompt` ends with the assistant's opening.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut text = String::new();
        let has_system_turn = messages.first().is_some_and(|m| m.role == Role::System);
        if let (Some(system), false) = (&self.system_message, has_system_turn) {
            push_turn(&mut text, Role::System, system);
        }
        for message in messages {
            push_turn(&mut text, message.role, &message.content);
        }
        if add_generation_prompt {
            text.push_str(IM_START);
            text.push_str("assistant\n");
            text.push_str(&self.generation_prefix);
        }
        text
    }

    /// The prompt for one user question: optional system turn, the user turn, the generation prompt.
    pub fn prompt(&self, question: &str) -> String {
        self.render(&[Message::new(Role::User, question)], true)
    }
}

fn push_turn(text: &mut String, role: Role, content: &str) {
    text.push_str(IM_START);
    text.push_str(role.as_str());
    text.push('\n');
    text.push_str(content);
    text.push_str(IM_END);
    text.push('\n');
}

/// Replaces the `<image>` placeholders of `text`, in order, with `<img>` + `<IMG_CONTEXT>` x
/// (`tokens_per_tile` x tiles of that image) + `</img>`. When there are images and no placeholder, one
/// `<image>\n` is put in front first (InternVL's `chat` does this for a single image). The number of
/// placeholders must equal the number of images.
pub fn expand_image_placeholders(
    text: &str,
    tiles_per_image: &[usize],
    tokens_per_tile: usize,
) -> Result<String> {
    let prefixed;
    let text = if !tiles_per_image.is_empty() && !text.contains(IMAGE_PLACEHOLDER) {
        prefixed = format!("{IMAGE_PLACEHOLDER}\n{text}");
        prefixed.as_str()
    } else {
        text
    };
    let pieces: Vec<&str> = text.split(IMAGE_PLACEHOLDER).collect();
    if pieces.len() - 1 != tiles_per_image.len() {
        return Err(Error::Msg(format!(
            "the text has {} `{IMAGE_PLACEHOLDER}` placeholders but {} images were given",
            pieces.len() - 1,
            tiles_per_image.len()
        )));
    }
    let mut expanded = String::with_capacity(
        text.len() + tiles_per_image.iter().sum::<usize>() * tokens_per_tile * 13,
    );
    for (index, piece) in pieces.iter().enumerate() {
        expanded.push_str(piece);
        if let Some(&tiles) = tiles_per_image.get(index) {
            expanded.push_str(IMG_START);
            expanded.push_str(&IMG_CONTEXT.repeat(tiles * tokens_per_tile));
            expanded.push_str(IMG_END);
        }
    }
    Ok(expanded)
}

/// Token ids of the prompt for one question: `template`'s rendering of the question with its `<image>`
/// placeholders expanded (see [`expand_image_placeholders`]), ready for generation.
pub fn encode_prompt(
    tokenizer: &super::Tokenizer,
    template: &ChatTemplate,
    question: &str,
    tiles_per_image: &[usize],
    tokens_per_tile: usize,
) -> Result<Vec<u32>> {
    let question = expand_image_placeholders(question, tiles_per_image, tokens_per_tile)?;
    tokenizer.encode(&template.prompt(&question))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_count_must_match() {
        let err = expand_image_placeholders("<image> and <image>", &[1], 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 `<image>` placeholders but 1 images"),
            "{err}"
        );
    }

    #[test]
    fn missing_placeholder_is_prefixed() {
        let text = expand_image_placeholders("What?", &[2], 1).expect("one image, no placeholder");
        assert_eq!(text, "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat?");
    }

    #[test]
    fn system_turn_in_messages_wins() {
        let template = ChatTemplate::with_system("default");
        let text = template.render(
            &[
                Message::new(Role::System, "mine"),
                Message::new(Role::User, "q"),
            ],
            true,
        );
        assert_eq!(text, "<|im_start|>system\nmine<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n");
    }
}
