//! The device the golden tests run on, from `EASEL_TEST_DEVICE`, so that one test binary checks
//! the CPU and, built with `--features cuda` (or `metal`), a GPU against the same golden values.

use std::sync::OnceLock;

use candle_core::Device;

/// The variable naming the device: `cpu` (the default when unset or empty), `cuda`, `cuda:N`,
/// `metal`, `metal:N`.
pub const TEST_DEVICE_VAR: &str = "EASEL_TEST_DEVICE";

/// The device `EASEL_TEST_DEVICE` names, the same one on every call in a test binary (tensors
/// of two CUDA devices opened apart do not mix). Panics with one line saying what is wrong when
/// the value is not a device, the build lacks its backend, or the device does not answer: a
/// test asked to run on a GPU must fail rather than quietly pass on the CPU.
#[track_caller]
pub fn test_device() -> Device {
    static DEVICE: OnceLock<Result<Device, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| device_named(&std::env::var(TEST_DEVICE_VAR).unwrap_or_default())) {
        Ok(device) => device.clone(),
        Err(why) => panic!("{why}"),
    }
}

/// The device `value` names (as [`test_device`] reads it), or why there is none.
pub fn device_named(value: &str) -> Result<Device, String> {
    let which = |text: &str| match text.split_once(':') {
        None => Some(0),
        Some((_, n)) => n.parse().ok(),
    };
    let wrong = || {
        format!("{TEST_DEVICE_VAR}={value:?}: not a device (expected cpu, cuda, cuda:N, metal or metal:N)")
    };
    match value.split_once(':').map_or(value, |(kind, _)| kind) {
        "" | "cpu" if !value.contains(':') => Ok(Device::Cpu),
        "cuda" => {
            let n = which(value).ok_or_else(wrong)?;
            if !candle_core::utils::cuda_is_available() {
                return Err(format!(
                    "{TEST_DEVICE_VAR}={value}: these tests were built without CUDA; build them with \
                     `--features cuda` (deploy/cuda-build.sh --tests)"
                ));
            }
            Device::new_cuda(n).map_err(|e| {
                format!("{TEST_DEVICE_VAR}={value}: no CUDA device {n} answered: {}", without_backtrace(e))
            })
        }
        "metal" => {
            let n = which(value).ok_or_else(wrong)?;
            if !candle_core::utils::metal_is_available() {
                return Err(format!(
                    "{TEST_DEVICE_VAR}={value}: these tests were built without Metal; build them with \
                     `--features metal` on macOS"
                ));
            }
            Device::new_metal(n).map_err(|e| {
                format!("{TEST_DEVICE_VAR}={value}: no Metal device {n} answered: {}", without_backtrace(e))
            })
        }
        _ => Err(wrong()),
    }
}

/// The error itself, so that the message stays one line with RUST_BACKTRACE set.
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_empty_and_cpu_are_the_cpu() {
        assert!(device_named("").unwrap().is_cpu());
        assert!(device_named("cpu").unwrap().is_cpu());
    }

    #[test]
    fn anything_else_is_an_error_listing_the_devices() {
        for value in ["gpu", "cpu:0", "cuda:x", "metal:", "CUDA"] {
            let err = device_named(value).unwrap_err();
            assert_eq!(
                err,
                format!("EASEL_TEST_DEVICE={value:?}: not a device (expected cpu, cuda, cuda:N, metal or metal:N)")
            );
        }
    }

    /// A build without CUDA (the usual one) refuses `cuda` with the way to get it.
    #[test]
    fn a_backend_the_build_lacks_is_an_error_saying_how_to_build_it() {
        for (value, available) in [
            ("cuda", candle_core::utils::cuda_is_available()),
            ("cuda:1", candle_core::utils::cuda_is_available()),
            ("metal", candle_core::utils::metal_is_available()),
        ] {
            if available {
                // With the backend built in, only the device itself may be missing.
                if let Err(err) = device_named(value) {
                    assert!(err.contains("answered"), "{err}");
                }
                continue;
            }
            let err = device_named(value).unwrap_err();
            assert!(
                err.starts_with(&format!("EASEL_TEST_DEVICE={value}: these tests were built without ")),
                "{err}"
            );
            assert!(err.contains("--features "), "{err}");
        }
    }
}
