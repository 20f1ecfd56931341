//! The R1V model family, trainable: `y = f_llm(f_adapter(f_vit(image)), text)`.

pub mod kv_cache;
pub mod qwen2;
pub mod qwen2_config;
pub mod value_head;
pub mod weights;
