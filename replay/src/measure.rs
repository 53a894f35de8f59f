//! Process measurements: minor page faults, resident memory.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Minor page faults of the whole process so far (`getrusage(RUSAGE_SELF)`,
/// every thread included).
pub fn minor_faults() -> u64 {
    // SAFETY: `getrusage` only writes the struct we pass; all-zero is a valid
    // `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage`.
    let result = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if result == 0 {
        usage.ru_minflt as u64
    } else {
        0
    }
}

/// The page size in bytes.
pub fn page_size() -> usize {
    // SAFETY: `sysconf` has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// Reads the resident set size from `/proc/self/statm` without allocating
/// (so sampling inside a replay does not disturb the allocator under test).
pub struct RssReader {
    file: Option<File>,
    page: usize,
}

impl RssReader {
    /// Opens `/proc/self/statm`; if it cannot, every read gives 0.
    pub fn new() -> Self {
        Self {
            file: File::open("/proc/self/statm").ok(),
            page: page_size(),
        }
    }

    /// Resident bytes now.
    pub fn resident(&self) -> usize {
        let Some(file) = &self.file else { return 0 };
        let mut buffer = [0u8; 128];
        let Ok(len) = file.read_at(&mut buffer, 0) else {
            return 0;
        };
        // "size resident shared text lib data dt"
        let mut fields = buffer[..len].split(|&byte| byte == b' ');
        let _size = fields.next();
        let resident = fields.next().unwrap_or_default();
        let pages = resident
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .fold(0usize, |value, byte| value * 10 + usize::from(byte - b'0'));
        pages * self.page
    }
}

impl Default for RssReader {
    fn default() -> Self {
        Self::new()
    }
}

/// A `/proc/self/status` field given in kB (`VmRSS`, `VmHWM`), in bytes.
pub fn status_bytes(field: &str) -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: usize = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    })
}

/// Resets the peak resident set size (`VmHWM`) to the current one, by
/// writing 5 to `/proc/self/clear_refs` (Linux 4.0+). Returns whether it
/// worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_readings_agree() {
        let statm = RssReader::new().resident();
        let status = status_bytes("VmRSS").unwrap();
        assert!(statm > 0);
        // Both are the same counter read at two moments.
        assert!(statm.abs_diff(status) < 16 << 20, "{statm} vs {status}");
        assert!(status_bytes("VmHWM").unwrap() >= status / 2);
        assert!(minor_faults() > 0);
    }
}
