//! The memory of the GPU a CUDA hive's workers run on, read through NVML.
//!
//! NVML (`libnvidia-ml.so.1`) comes with the NVIDIA driver and is loaded at
//! run time, so the hive builds and runs on machines without it. Where it
//! cannot be loaded, the hive says so once and places models by RAM, as a
//! CPU hive does.
//!
//! NVML (like `nvidia-smi`) numbers GPUs in PCI bus order; CUDA by default
//! puts the fastest first. The hive starts CUDA workers with
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID` unless that is set already (see
//! [`worker_env`]), so `--device N` is `nvidia-smi`'s GPU N for the worker
//! and for the readings here. It maps `--device N` through
//! `CUDA_VISIBLE_DEVICES` (indices or `GPU-` UUIDs) as CUDA does.
//!
//! Tests of placement by GPU memory run where there is no GPU: the hive's
//! hidden `--test-gpu NAME:TOTAL_MIB:FREE_MIB` gives a CUDA hive fixed
//! readings instead of NVML's ([`Gpu::fixed`]).

use nvml_wrapper::Nvml;

/// The order CUDA numbers GPUs in, for workers: the one NVML uses.
pub const CUDA_DEVICE_ORDER: &str = "CUDA_DEVICE_ORDER";
const PCI_BUS_ID: &str = "PCI_BUS_ID";

/// What a worker of `backend` needs in its environment so that its device
/// numbers are NVML's, given the hive's own `CUDA_DEVICE_ORDER` (`current`).
/// A value the user set is kept.
pub fn worker_env(backend: &str, current: Option<&str>) -> Option<(&'static str, &'static str)> {
    (backend == "cuda" && current.is_none()).then_some((CUDA_DEVICE_ORDER, PCI_BUS_ID))
}

/// Free and total memory of one GPU, bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub total: u64,
    pub free: u64,
}

/// One GPU, open for memory readings.
pub struct Gpu {
    source: Source,
    /// Its model, as the driver names it: `NVIDIA H200`.
    pub name: String,
    /// For people: `cuda:0 (NVIDIA H200)`.
    pub label: String,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("label", &self.label).finish()
    }
}

/// Where a GPU's readings come from.
enum Source {
    /// Boxed: NVML's function table is ~12 KB.
    Nvml { nvml: Box<Nvml>, which: Which },
    /// `--test-gpu`: the same readings every time.
    Fixed(Memory),
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
        if let Ok(order) = std::env::var(CUDA_DEVICE_ORDER) {
            if order != PCI_BUS_ID {
                tracing::warn!(
                    "CUDA_DEVICE_ORDER={order}: CUDA may number the GPUs differently from NVML, and the memory read for device {device} may be another GPU's; unset it or set PCI_BUS_ID"
                );
            }
        }
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
        Some(Gpu { source: Source::Nvml { nvml: Box::new(nvml), which }, label: format!("cuda:{device} ({name})"), name })
    }

    /// A GPU that always reads `memory` (the hive's hidden `--test-gpu`).
    pub fn fixed(device: usize, name: &str, memory: Memory) -> Gpu {
        Gpu { source: Source::Fixed(memory), label: format!("cuda:{device} ({name})"), name: name.to_owned() }
    }

    /// Its memory now; `None` (logged) if NVML could not say.
    pub fn memory(&self) -> Option<Memory> {
        let (nvml, which) = match &self.source {
            Source::Nvml { nvml, which } => (nvml, which),
            Source::Fixed(m) => return Some(*m),
        };
        match nvml_handle(nvml, which).and_then(|d| d.memory_info()) {
            Ok(m) => Some(Memory { total: m.total, free: m.free }),
            Err(e) => {
                tracing::warn!(error = %e, gpu = %self.label, "reading GPU memory failed");
                None
            }
        }
    }
}

/// Parses `--test-gpu`: `NAME:TOTAL_MIB:FREE_MIB`.
pub fn parse_test_gpu(s: &str) -> Result<(String, Memory), String> {
    let bad = || format!("{s:?}: expected NAME:TOTAL_MIB:FREE_MIB, e.g. \"Test GPU:1024:40\"");
    let mut parts = s.rsplitn(3, ':');
    let (Some(free), Some(total), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad());
    };
    let mib = |v: &str| v.trim().parse::<u64>().map(|m| m << 20).map_err(|_| bad());
    let memory = Memory { total: mib(total)?, free: mib(free)? };
    if name.is_empty() || memory.free > memory.total {
        return Err(bad());
    }
    Ok((name.to_owned(), memory))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_workers_count_gpus_in_nvml_order_unless_told_otherwise() {
        assert_eq!(worker_env("cuda", None), Some(("CUDA_DEVICE_ORDER", "PCI_BUS_ID")));
        assert_eq!(worker_env("cuda", Some("FASTEST_FIRST")), None, "the user's choice is kept");
        assert_eq!(worker_env("cpu", None), None);
        assert_eq!(worker_env("metal", None), None);
    }

    #[test]
    fn test_gpu_readings_parse_and_are_fixed() {
        let (name, memory) = parse_test_gpu("Test GPU:1024:40").unwrap();
        assert_eq!(name, "Test GPU");
        assert_eq!(memory, Memory { total: 1024 << 20, free: 40 << 20 });
        let gpu = Gpu::fixed(1, &name, memory);
        assert_eq!(gpu.label, "cuda:1 (Test GPU)");
        assert_eq!(gpu.memory(), Some(memory));
        for bad in ["", "1024:40", ":1024:40", "G:40:1024", "G:x:40"] {
            assert!(parse_test_gpu(bad).is_err(), "{bad:?}");
        }
    }

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
