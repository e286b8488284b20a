//! What the machine has: memory (from /proc/meminfo on Linux) and the memory
//! a model is estimated to need.

/// (total, available) memory in bytes; (0, 0) where it cannot be read.
pub fn memory() -> (u64, u64) {
    let Ok(text) = std::fs::read_to_string("/proc/meminfo") else { return (0, 0) };
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Memory a worker for a model file of `file_size` bytes is estimated to
/// need: the weights (loaded into memory), a fifth more for activations and
/// the KV cache of long prompts, and 64 MiB for the process itself.
pub fn model_memory(file_size: u64) -> u64 {
    file_size + file_size / 5 + 64 * 1024 * 1024
}

/// Bytes for people: "98.4 MB".
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_and_estimates_grow_with_size() {
        let (total, free) = memory();
        if cfg!(target_os = "linux") {
            assert!(total > 0 && free > 0 && free <= total);
        }
        assert!(model_memory(100 << 20) > 100 << 20);
        assert_eq!(human(98_362_432), "98.4 MB");
        assert_eq!(human(12), "12 B");
    }
}
