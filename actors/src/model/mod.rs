//! The R1V model family, trainable: `y = f_llm(f_adapter(f_vit(image)), text)`.
