//! Pinning the inference threads to chosen cores (`[inference] cpu_affinity`).
//!
//! A worker's device thread pins itself when it creates its backend; the feeder thread and
//! libtorch's intra-op threads it starts afterwards inherit the mask (Linux threads start with
//! their creator's affinity).

use std::fmt;

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// A set of CPU cores, as Linux writes them (`0-3,8`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl CpuList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cores: Vec<String> = self.0.iter().map(usize::to_string).collect();
        f.write_str(&cores.join(","))
    }
}

/// Parse a CPU list: comma-separated cores and inclusive ranges (`1`, `2-3,6`); empty: none.
pub fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let mut cores = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let core =
            |c: &str| c.trim().parse::<usize>().map_err(|_| format!("{c:?} is not a core number in {s:?}"));
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (core(a)?, core(b)?);
                if a > b {
                    return Err(format!("range {part:?} runs backwards"));
                }
                cores.extend(a..=b.min(CpuSet::count()));
            }
            None => cores.push(core(part)?),
        }
    }
    // (A range is cut at the first core past the limit, so a huge one never allocates.)
    if cores.iter().any(|&c| c >= CpuSet::count()) {
        return Err(format!("{s:?} names a core past {}", CpuSet::count() - 1));
    }
    cores.sort_unstable();
    cores.dedup();
    Ok(CpuList(cores))
}

/// The cores the calling thread may run on.
pub fn available() -> nix::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0))?;
    Ok((0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect())
}

/// `Err` naming the cores of `cores` this process may not run on.
pub fn check_available(cores: &CpuList) -> Result<(), String> {
    let allowed = available().map_err(|e| format!("cannot read the cores this process may use: {e}"))?;
    let missing: Vec<String> =
        cores.0.iter().filter(|c| !allowed.contains(c)).map(usize::to_string).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{cores}: core(s) {} are not available to this process (it may run on {})",
            missing.join(","),
            CpuList(allowed)
        ))
    }
}

/// Restrict the calling thread to `cores`.
pub fn pin_current_thread(cores: &CpuList) -> nix::Result<()> {
    let mut set = CpuSet::new();
    for &c in &cores.0 {
        set.set(c)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_linux_writes_them() {
        assert_eq!(parse_cpu_list("").unwrap(), CpuList::default());
        assert_eq!(parse_cpu_list("1").unwrap(), CpuList(vec![1]));
        assert_eq!(parse_cpu_list("6, 2-3,2").unwrap(), CpuList(vec![2, 3, 6]));
        assert_eq!(parse_cpu_list("2-3,6").unwrap().to_string(), "2,3,6");
        assert!(parse_cpu_list("3-1").unwrap_err().contains("backwards"));
        assert!(parse_cpu_list("a").unwrap_err().contains("not a core number"));
        assert!(parse_cpu_list("100000").unwrap_err().contains("past"));
        assert!(parse_cpu_list("0-4000000000").unwrap_err().contains("past"));
    }

    #[test]
    fn a_pinned_thread_runs_only_on_its_cores_and_unavailable_cores_are_named() {
        let first = available().unwrap()[0];
        let mine = CpuList(vec![first]);
        std::thread::spawn(move || {
            pin_current_thread(&mine).unwrap();
            assert_eq!(available().unwrap(), vec![first], "the thread's own mask");
            // A thread it starts inherits the mask.
            let child = std::thread::spawn(|| available().unwrap()).join().unwrap();
            assert_eq!(child, vec![first]);
        })
        .join()
        .unwrap();
        let err = check_available(&CpuList(vec![1000])).unwrap_err();
        assert!(err.contains("1000") && err.contains("not available"), "{err}");
    }
}
