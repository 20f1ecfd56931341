//! The R1V model family, trainable: `y = f_llm(f_adapter(f_vit(image)), text)`.

pub mod adapter;
pub mod chat;
pub mod chat_config;
pub mod kv_cache;
pub mod linear;
pub mod policy;
pub mod qwen2;
pub mod qwen2_5_vl;
pub mod qwen2_config;
pub mod reward;
pub mod value_head;
pub mod vision;
pub mod vision_config;
pub mod weights;
