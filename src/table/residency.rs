//! Whether a mapped table is served from memory or from disk: chosen when the file is opened,
//! from the table's size against the memory the process may use.

/// How a mapped table's pages reach memory ([`OpenOptions::residency`](super::OpenOptions)).
///
/// - **Resident**: the table is expected to stay in the page cache once read. The map is
///   advised for huge pages (large folios: a cold table fills in 2 MiB pieces, and random rows
///   miss the TLB less), and [`OpenOptions::populate`](super::OpenOptions) reads it all up front
///   at the disk's sequential speed.
/// - **Out of core**: the table is larger than memory can hold beside everything else, so most
///   lookups miss. The map is advised for random access (a fault reads one page, not a folio or
///   the device's read-ahead), and every operation first reads the distinct pages its rows need
///   and that are not resident, many requests in flight, before touching them (see
///   [`Table::open_with`](super::Table::open_with)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Out of core when the table is larger than half the memory available to the process
    /// ([`available_memory`]), resident otherwise. The default.
    #[default]
    Auto,
    /// Keep the table in memory: huge-page advice, optional populate.
    Resident,
    /// Serve the table from disk: random-access advice and batch read-ahead.
    OutOfCore,
}

impl Residency {
    /// The policy for a table of `table_bytes` when `available` bytes of memory are available
    /// (`None`: unknown, then resident). Only [`Residency::Auto`] looks at the figures.
    ///
    /// Half, not all, of the available memory: the rest of the process (outputs, other
    /// tables, the optimizer's state) needs room too, and a table that does not quite fit is
    /// better served at the disk's random-read rate than thrashed through huge folios.
    ///
    /// ```
    /// use embedding_lookup::table::Residency;
    ///
    /// let gib = 1u64 << 30;
    /// assert_eq!(Residency::Auto.resolve(36 * gib, Some(23 * gib)), Residency::OutOfCore);
    /// assert_eq!(Residency::Auto.resolve(gib, Some(23 * gib)), Residency::Resident);
    /// assert_eq!(Residency::Resident.resolve(36 * gib, Some(gib)), Residency::Resident);
    /// ```
    pub fn resolve(self, table_bytes: u64, available: Option<u64>) -> Residency {
        match self {
            Residency::Auto => match available {
                Some(avail) if table_bytes > avail / 2 => Residency::OutOfCore,
                _ => Residency::Resident,
            },
            chosen => chosen,
        }
    }

    /// The name `emb` prints and takes: `auto`, `resident`, `out-of-core`.
    pub fn name(self) -> &'static str {
        match self {
            Residency::Auto => "auto",
            Residency::Resident => "resident",
            Residency::OutOfCore => "out-of-core",
        }
    }
}

impl std::str::FromStr for Residency {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "auto" => Ok(Residency::Auto),
            "resident" => Ok(Residency::Resident),
            "out-of-core" | "ooc" => Ok(Residency::OutOfCore),
            _ => Err(crate::Error::InvalidArgument(format!(
                "unknown residency {s:?} (expected auto, resident or out-of-core)"
            ))),
        }
    }
}

impl std::fmt::Display for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The memory this process may still use, in bytes: the kernel's `MemAvailable` (free memory
/// plus what the page cache could give back), capped by the cgroup's memory limit less its
/// current use where a limit is set (cgroup v2 `memory.max`, v1 `memory.limit_in_bytes`).
/// `None` where neither can be read (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let mem_available = meminfo.as_deref().and_then(parse_mem_available);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| cgroup_headroom(&c, |p| std::fs::read_to_string(p).ok()));
    match (mem_available, cgroup) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// `MemAvailable` from the text of `/proc/meminfo`, in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The cgroup's limit less its use, from `/proc/self/cgroup`'s text and a file reader; `None`
/// without a limit ("max", or v1's near-`u64::MAX` "no limit").
fn cgroup_headroom(self_cgroup: &str, read: impl Fn(&str) -> Option<String>) -> Option<u64> {
    let number = |p: &str| read(p).and_then(|s| s.trim().parse::<u64>().ok());
    for line in self_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let (limit, usage) = if controllers.is_empty() {
            let dir = format!("/sys/fs/cgroup{path}");
            (
                number(&format!("{dir}/memory.max")),
                number(&format!("{dir}/memory.current")),
            )
        } else if controllers.split(',').any(|c| c == "memory") {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            (
                number(&format!("{dir}/memory.limit_in_bytes")),
                number(&format!("{dir}/memory.usage_in_bytes")),
            )
        } else {
            continue;
        };
        // v1 reports "no limit" as the largest page-aligned i64.
        if let Some(limit) = limit.filter(|&l| l < (1 << 62)) {
            return Some(limit.saturating_sub(usage.unwrap_or(0)));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn auto_goes_out_of_core_above_half_the_available_memory() {
        let avail = Some(24 * GIB);
        assert_eq!(
            Residency::Auto.resolve(12 * GIB, avail),
            Residency::Resident
        );
        assert_eq!(
            Residency::Auto.resolve(12 * GIB + 1, avail),
            Residency::OutOfCore
        );
        assert_eq!(Residency::Auto.resolve(36 * GIB, None), Residency::Resident);
        // An explicit choice is kept whatever the figures.
        assert_eq!(Residency::OutOfCore.resolve(1, avail), Residency::OutOfCore);
        assert_eq!(
            Residency::Resident.resolve(100 * GIB, avail),
            Residency::Resident
        );
    }

    #[test]
    fn meminfo_and_cgroup_limits_are_read() {
        let meminfo = "MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);

        let files = |p: &str| match p {
            "/sys/fs/cgroup/job/memory.max" => Some("8589934592\n".to_string()),
            "/sys/fs/cgroup/job/memory.current" => Some("1073741824\n".to_string()),
            "/sys/fs/cgroup/free/memory.max" => Some("max\n".to_string()),
            "/sys/fs/cgroup/memory/v1/memory.limit_in_bytes" => Some("4294967296".into()),
            "/sys/fs/cgroup/memory/v1/memory.usage_in_bytes" => Some("1073741824".into()),
            "/sys/fs/cgroup/memory/none/memory.limit_in_bytes" => {
                Some("9223372036854771712".into())
            }
            _ => None,
        };
        assert_eq!(cgroup_headroom("0::/job\n", files), Some(7 * GIB));
        assert_eq!(cgroup_headroom("0::/free\n", files), None);
        assert_eq!(
            cgroup_headroom("4:memory:/v1\n0::/\n", files),
            Some(3 * GIB)
        );
        assert_eq!(cgroup_headroom("4:memory:/none\n0::/\n", files), None);
    }
}
