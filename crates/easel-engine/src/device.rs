//! Choosing the device a job's tensors live on, from `model.device`.
//!
//! Here rather than in easel-config: validation is pure, and whether a GPU answers is only known
//! by asking it.

use candle_core::{Device, DeviceLocation};
use easel_config::DeviceChoice;

use crate::EngineError;

/// The candle device for a configured choice. `auto` always finds one (the CPU at worst) and
/// logs which and why; an explicit GPU that is not there is an error naming the key and what is
/// missing.
pub fn device(choice: DeviceChoice) -> Result<Device, EngineError> {
    let missing = |why: String| EngineError::Device(format!("model.device = \"{choice}\": {why}"));
    match choice {
        DeviceChoice::Auto => Ok(auto()),
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(n) => cuda(n).map_err(|why| missing(format!("{why}{CUDA_HINT}"))),
        DeviceChoice::Metal(n) => metal(n).map_err(|why| missing(format!("{why}{METAL_HINT}"))),
    }
}

/// How to get a backend this build lacks, for an explicit choice of it.
const CUDA_HINT: &str =
    if cfg!(feature = "cuda") { "" } else { " (build with `--features cuda`, see deploy/cuda.md)" };
const METAL_HINT: &str =
    if cfg!(feature = "metal") { "" } else { " (build with `--features metal` on macOS)" };

/// How status reports and `easel bench` name a device: `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".to_string(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn auto() -> Device {
    let cuda_missing = match cuda(0) {
        Ok(device) => {
            tracing::info!(device = "cuda:0", "model.device = \"auto\": using CUDA device 0");
            return device;
        }
        Err(why) => why,
    };
    let metal_missing = match metal(0) {
        Ok(device) => {
            tracing::info!(
                device = "metal:0",
                "model.device = \"auto\": using Metal device 0 (no CUDA: {cuda_missing})"
            );
            return device;
        }
        Err(why) => why,
    };
    tracing::info!(
        device = "cpu",
        "model.device = \"auto\": using the CPU (no CUDA: {cuda_missing}; no Metal: {metal_missing})"
    );
    Device::Cpu
}

/// The error itself: a device that does not answer is the user's situation, not easel's bug, so
/// its message stays one line even with RUST_BACKTRACE set.
#[cfg(any(feature = "cuda", feature = "metal"))]
fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// CUDA device `n`, or what is missing for it.
#[cfg(feature = "cuda")]
fn cuda(n: usize) -> Result<Device, String> {
    Device::new_cuda(n).map_err(|e| format!("no CUDA device {n} answered: {}", without_backtrace(e)))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_: usize) -> Result<Device, String> {
    Err("this easel was built without the cuda feature".into())
}

/// Metal device `n`, or what is missing for it.
#[cfg(feature = "metal")]
fn metal(n: usize) -> Result<Device, String> {
    Device::new_metal(n).map_err(|e| format!("no Metal device {n} answered: {}", without_backtrace(e)))
}

#[cfg(not(feature = "metal"))]
fn metal(_: usize) -> Result<Device, String> {
    Err("this easel was built without the metal feature".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_cpu_and_is_named_so() {
        let cpu = device(DeviceChoice::Cpu).unwrap();
        assert!(cpu.is_cpu());
        assert_eq!(device_name(&cpu), "cpu");
    }

    // Without the GPU features there is nothing but the CPU to pick.
    #[cfg(not(any(feature = "cuda", feature = "metal")))]
    #[test]
    fn auto_without_gpu_features_is_the_cpu() {
        assert!(device(DeviceChoice::Auto).unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_the_key_and_the_feature() {
        let err = device(DeviceChoice::Cuda(1)).unwrap_err().to_string();
        assert_eq!(
            err,
            "model.device = \"cuda:1\": this easel was built without the cuda feature (build with \
             `--features cuda`, see deploy/cuda.md)"
        );
    }

    #[cfg(not(feature = "metal"))]
    #[test]
    fn metal_without_the_feature_names_the_key_and_the_feature() {
        let err = device(DeviceChoice::Metal(0)).unwrap_err().to_string();
        assert!(
            err.starts_with("model.device = \"metal\": this easel was built without the metal feature"),
            "{err}"
        );
    }
}
