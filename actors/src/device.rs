//! Device names (`cpu`, `cuda:N`) and the local GPUs.
//!
//! Without the `cuda` feature a `cuda:N` is an error saying so; with it, an index past the GPUs present
//! (or a machine whose driver finds none) is an error naming the device and how many there are, never a
//! panic. [`local_gpus`] is what "every local GPU, else the CPU" placements start from.

use candle_core::Device;

use crate::{Error, Result};

/// Parses `cpu` or `cuda:N` (`cuda` alone is `cuda:0`) and opens the device.
pub fn parse_device(name: &str) -> Result<Device> {
    let name = name.trim();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name {
        "cuda" => Some(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok()),
    };
    match ordinal {
        Some(ordinal) => open_cuda(name, ordinal),
        None => Err(Error::msg(format!(
            "unknown device `{name}` (expected `cpu` or `cuda:N`)"
        ))),
    }
}

/// How many CUDA devices the driver sees: 0 without the `cuda` feature, without a driver that
/// initialises, or with none visible (`CUDA_VISIBLE_DEVICES=""`); the reason comes with a 0.
pub fn cuda_device_count() -> (usize, Option<String>) {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda::cudarc::driver::result;
        match result::init().and_then(|()| result::device::get_count()) {
            Ok(0) => (0, Some("the CUDA driver sees no device".to_string())),
            Ok(n) => (n.max(0) as usize, None),
            Err(err) => (0, Some(format!("the CUDA driver did not start: {err}"))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        (
            0,
            Some("this build has no CUDA support (build with `--features cuda`)".to_string()),
        )
    }
}

/// Every local GPU, or the CPU alone (with a warning saying why) when there is none.
pub fn local_gpus() -> Result<Vec<Device>> {
    match cuda_device_count() {
        (0, reason) => {
            tracing::warn!(
                reason = reason.as_deref().unwrap_or("none found"),
                "no GPU found: running on the CPU"
            );
            Ok(vec![Device::Cpu])
        }
        (n, _) => (0..n).map(|i| open_cuda(&format!("cuda:{i}"), i)).collect(),
    }
}

fn open_cuda(name: &str, ordinal: usize) -> Result<Device> {
    let (count, reason) = cuda_device_count();
    if ordinal >= count {
        let why = match reason {
            Some(reason) => format!("no CUDA device: {reason}"),
            None => format!("only {count} CUDA device(s), cuda:0 to cuda:{}", count - 1),
        };
        return Err(Error::msg(format!("device `{name}`: {why}")));
    }
    Device::new_cuda(ordinal)
        .map_err(|err| Error::msg(format!("device `{name}`: cannot open it: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_parses_and_bad_names_are_errors_naming_them() {
        assert!(matches!(parse_device("cpu"), Ok(Device::Cpu)));
        for bad in ["gpu", "cuda:x", "cuda:-1", "cpu:0:1", ""] {
            let err = parse_device(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn a_cuda_device_past_the_ones_present_is_an_error_not_a_panic() {
        let (count, reason) = cuda_device_count();
        let name = format!("cuda:{count}");
        let err = parse_device(&name)
            .expect_err("past the last device")
            .to_string();
        assert!(err.contains(&name), "{err}");
        if count == 0 {
            let reason = reason.expect("a reason comes with 0 devices");
            assert!(err.contains(&reason), "{err}");
            // No GPU: the local devices fall back to the CPU.
            assert!(matches!(local_gpus().as_deref(), Ok([Device::Cpu])));
        }
    }
}
