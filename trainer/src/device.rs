//! Device selection.

use tch::Device;

geossl_models::message_error!(
    /// A device that is not known, or not on this machine.
    DeviceError
);

/// `auto` (CUDA when available, else CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => Err(format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)").into()),
        },
    }
}

fn cuda(i: usize) -> Result<Device, DeviceError> {
    let n = tch::Cuda::device_count() as usize;
    if i < n {
        Ok(Device::Cuda(i))
    } else if tch::utils::has_cudart() {
        Err(format!("cuda:{i} requested but {n} CUDA devices are visible").into())
    } else {
        Err("CUDA requested but this build has no libtorch_cuda loaded".into())
    }
}

/// One line describing the runtime: libtorch CUDA support and devices.
pub fn describe() -> String {
    format!(
        "libtorch cuda runtime loaded: {}, cuda devices: {}, cudnn: {}",
        tch::utils::has_cudart(),
        tch::Cuda::device_count(),
        tch::Cuda::cudnn_is_available()
    )
}
