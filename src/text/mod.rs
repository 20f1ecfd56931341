//! Text side of the model input: the `tokenizer.json` wrapper and the Qwen / InternVL-chat template.
//!
//! | file | what it holds |
//! |---|---|
//! | [`tokenizer`] | [`Tokenizer`]: load, encode, decode, special-token ids with errors naming the file |
//! | [`chat`] | [`ChatTemplate`]: `<\|im_start\|>role\n...<\|im_end\|>` turns, the generation prompt, `<image>` expansion |

pub mod chat;
pub mod tokenizer;

pub use chat::{encode_prompt, expand_image_placeholders, ChatTemplate, Message, Role};
pub use tokenizer::{ImageTokenIds, Tokenizer};
