//! The R1V model family, trainable: `y = f_llm(f_adapter(f_vit(image)), text)`.
pub mod adapter;
pub mod chat_config;
pub mod vision;
