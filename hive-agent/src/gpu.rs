//! The memory of the GPU a CUDA hive's workers run on, read through NVML.
//!
//! NVML (`libnvidia-ml.so.1`) comes with the NVIDIA driver and is loaded at
//! run time, so the hive builds and runs on machines without it. Where it
//! cannot be loaded, the hive says so once and places models by RAM, as a
//! CPU hive does.
//!
//! NVML numbers GPUs in PCI bus order; CUDA by default puts the fastest
//! first and honours `CUDA_VISIBLE_DEVICES`. The hive maps `--device N`
//! through `CUDA_VISIBLE_DEVICES` (indices or `GPU-` UUIDs); on a machine
//! with GPUs of different speeds, set `CUDA_DEVICE_ORDER=PCI_BUS_ID` so that
//! both count the same way.

use nvml_wrapper::Nvml;

/// Free and total memory of one GPU, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub free: u64,
}

/// One GPU, open for memory readings.
pub struct Gpu {
    nvml: Nvml,
    /// How NVML finds it.
    which: Which,
    /// Its model, as the driver names it: `NVIDIA H200`.
    pub name: String,
    /// For people: `cuda:0 (NVIDIA H200)`.
    pub label: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("which", &self.which).field("label", &self.label).finish()
    }
}

/// A GPU as NVML knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Which {
    Index(u32),
    Uuid(String),
}

/// Which GPU CUDA device `device` is, given `CUDA_VISIBLE_DEVICES`
/// (`None`: unset). `None` when the list does not have that many entries.
fn nvml_device(device: usize, visible: Option<&str>) -> Option<Which> {
    let Some(list) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Some(Which::Index(u32::try_from(device).ok()?));
    };
    let entry = list.split(',').map(str::trim).nth(device)?;
    if entry.starts_with("GPU-") {
        Some(Which::Uuid(entry.to_owned()))
    } else {
        entry.parse().ok().map(Which::Index)
    }
}

/// NVML's handle of `which` (looked up per reading: it borrows `nvml`).
fn nvml_handle<'n>(nvml: &'n Nvml, which: &Which) -> Result<nvml_wrapper::Device<'n>, nvml_wrapper::error::NvmlError> {
    match which {
        Which::Index(i) => nvml.device_by_index(*i),
        Which::Uuid(u) => nvml.device_by_uuid(u.as_str()),
    }
}

impl Gpu {
    /// The GPU that workers of `backend` on `device` use, if its memory can
    /// be read: CUDA only (Metal shares the machine's RAM).
    pub fn open(backend: &str, device: usize) -> Option<Gpu> {
        if backend != "cuda" {
            return None;
        }
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let Some(which) = nvml_device(device, visible.as_deref()) else {
            tracing::warn!(device, visible = ?visible, "CUDA device {device} is not in CUDA_VISIBLE_DEVICES; placing models by RAM");
            return None;
        };
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read GPU memory through NVML (libnvidia-ml.so.1, part of the NVIDIA driver); placing models by RAM");
                return None;
            }
        };
        let name = match nvml_handle(&nvml, &which).and_then(|d| d.name()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, gpu = ?which, "NVML does not know this GPU; placing models by RAM");
                return None;
            }
        };
        Some(Gpu { nvml, which, label: format!("cuda:{device} ({name})"), name })
    }

    /// Its memory now; `None` (logged) if NVML could not say.
    pub fn memory(&self) -> Option<Memory> {
        match nvml_handle(&self.nvml, &self.which).and_then(|d| d.memory_info()) {
            Ok(m) => Some(Memory { total: m.total, free: m.free }),
            Err(e) => {
                tracing::warn!(error = %e, gpu = %self.label, "reading GPU memory failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_devices_map_to_nvml_through_cuda_visible_devices() {
        assert_eq!(nvml_device(0, None), Some(Which::Index(0)));
        assert_eq!(nvml_device(3, Some("")), Some(Which::Index(3)));
        assert_eq!(nvml_device(0, Some("2,3")), Some(Which::Index(2)));
        assert_eq!(nvml_device(1, Some("2, 3")), Some(Which::Index(3)));
        assert_eq!(nvml_device(2, Some("2,3")), None);
        assert_eq!(nvml_device(0, Some("GPU-8f3a,1")), Some(Which::Uuid("GPU-8f3a".into())));
        assert_eq!(nvml_device(0, Some("MIG-abc")), None, "MIG instances are not read");
    }

    #[test]
    fn a_cpu_hive_reads_no_gpu_and_a_machine_without_the_driver_falls_back() {
        assert!(Gpu::open("cpu", 0).is_none());
        assert!(Gpu::open("metal", 0).is_none());
        // Here (no NVIDIA driver in CI) NVML does not load: no GPU, no panic.
        if !std::path::Path::new("/proc/driver/nvidia").exists() {
            assert!(Gpu::open("cuda", 0).is_none());
        }
    }
}
