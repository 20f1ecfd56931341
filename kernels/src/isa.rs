//! The instruction set the CPU kernels ([`crate::packed`], [`crate::cached_attention`], [`crate::vexp`]) run
//! with, detected at run time. Each kernel is compiled once per instruction set and gives the same bits on all
//! of them; the tests compare the copies through [`Isa::available`].

/// An instruction set a kernel has a copy for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F (which implies AVX2 and FMA).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 with FMA.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Plain Rust for any CPU.
    Portable,
}

impl Isa {
    /// The best this CPU has (a cached CPUID read).
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, the portable one first.
    pub fn available() -> Vec<Self> {
        let mut isas = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }
}
