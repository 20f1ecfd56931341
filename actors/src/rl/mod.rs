//! The RL algorithms of R1V2 as pure functions (no actix): GRPO, MPO, hybrid reward, Selective Sample Buffer.
