//! GPU facts from the NVIDIA driver's management library (NVML), loaded at run time: a device
//! without the driver (a laptop, a phone, a CPU server) reports why there are none, cleanly.

use serde::Serialize;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NvmlReport {
    /// The driver version, when NVML could be loaded.
    pub driver_version: Option<String>,
    pub gpus: Vec<GpuInfo>,
    /// Why NVML gave nothing (no driver, no permission, ...), when it did not.
    pub unavailable: Option<String>,
}

pub fn query() -> NvmlReport {
    let nvml = match nvml_wrapper::Nvml::init() {
        Ok(nvml) => nvml,
        Err(error) => {
            return NvmlReport {
                driver_version: None,
                gpus: Vec::new(),
                unavailable: Some(format!("no NVIDIA driver library: {error}")),
            }
        }
    };
    let driver_version = nvml.sys_driver_version().ok();
    let count = match nvml.device_count() {
        Ok(count) => count,
        Err(error) => {
            return NvmlReport { driver_version, gpus: Vec::new(), unavailable: Some(format!("NVML: {error}")) }
        }
    };
    let mut gpus = Vec::new();
    let mut problems = Vec::new();
    for index in 0..count {
        let described = nvml.device_by_index(index).and_then(|device| {
            let memory = device.memory_info()?;
            Ok(GpuInfo {
                index,
                name: device.name()?,
                memory_total_bytes: memory.total,
                memory_free_bytes: memory.free,
            })
        });
        match described {
            Ok(gpu) => gpus.push(gpu),
            Err(error) => problems.push(format!("GPU {index}: {error}")),
        }
    }
    let unavailable = (!problems.is_empty()).then(|| problems.join("; "));
    NvmlReport { driver_version, gpus, unavailable }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On any machine: either GPUs with names and memory, or a reason — never a panic.
    #[test]
    fn nvml_reports_gpus_or_says_why_not() {
        let report = query();
        if report.gpus.is_empty() {
            assert!(report.unavailable.is_some() || report.driver_version.is_some(), "{report:?}");
        }
        for gpu in &report.gpus {
            assert!(!gpu.name.is_empty() && gpu.memory_total_bytes >= gpu.memory_free_bytes, "{gpu:?}");
        }
    }
}
