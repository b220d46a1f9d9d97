//! Real servers as local child processes, for `partita demo`, the tests and the benchmarks:
//! Apache Kafka in KRaft mode ([`kafka::LocalKafka`]) and Apache Cassandra as the CQL store of the
//! ScyllaDB backend ([`cassandra::LocalCassandra`]). Their jars come from Maven Central through
//! `scripts/setup.sh` (pinned in `scripts/jars/*/pom.xml`) into `$PARTITA_JARS`.
//!
//! Every server JVM starts through `ParentWatch` (`scripts/jars/ParentWatch.java`), which halts the
//! JVM when its standard input closes: we hold the pipe's write end, so a server never outlives the
//! process that started it, even when that process is killed with SIGKILL or a test binary exits
//! with servers still in a `static`.

pub mod cassandra;
pub mod kafka;
pub mod scrape;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Where setup put the server jars: `$PARTITA_JARS`, else `$PARTITA_CACHE/jars`, else
/// `~/.cache/partita/jars`.
pub fn jars_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("PARTITA_JARS") {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("PARTITA_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/partita")
    });
    cache.join("jars")
}

/// A free TCP port on 127.0.0.1 for a server to listen on: taken from 20000-32767, below
/// Linux's ephemeral range (32768-60999), so the clients' outgoing connections, which take their
/// ports from that range, cannot grab it between this check and the server's bind; and never the
/// same port twice in one process.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_768;
    // Processes started together begin at different points of the range.
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    for _ in 0..COUNT {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % COUNT) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "no free port in 20000-32767"))
}

/// A server JVM's command line: heap, flags, system properties, main class and arguments.
#[derive(Debug, Clone)]
pub(crate) struct JvmCommand {
    /// `jars_dir()` subfolder with the server's jars (`kafka`, `cassandra`).
    pub jars: &'static str,
    pub main_class: &'static str,
    pub jvm_flags: Vec<String>,
    pub args: Vec<String>,
    /// stdout and stderr of the server go here (appended).
    pub log: PathBuf,
}

impl JvmCommand {
    fn classpath(&self) -> anyhow::Result<String> {
        let dir = jars_dir();
        let jars = dir.join(self.jars);
        let launcher = dir.join("launcher");
        if !jars.is_dir() || !launcher.join("ParentWatch.class").is_file() {
            bail!(
                "the {} server jars are not in {} (run scripts/setup.sh, or set PARTITA_JARS)",
                self.jars,
                dir.display()
            );
        }
        Ok(format!("{}:{}/*", launcher.display(), jars.display()))
    }

    /// Run to completion within `within` (a tool such as Kafka's storage formatter), under
    /// `ParentWatch` like a server; fails with its output in the log file, or if it takes longer.
    pub fn run(&self, within: Duration) -> anyhow::Result<()> {
        let mut process = self.spawn()?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = process.child.try_wait()? {
                if !status.success() {
                    bail!("{} failed ({status}):\n{}", self.main_class, log_tail(&self.log, 40));
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                process.kill();
                bail!("{} did not finish within {within:?}:\n{}", self.main_class, log_tail(&self.log, 40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Start as a server under `ParentWatch`.
    pub fn spawn(&self) -> anyhow::Result<JvmProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut child = Command::new("java")
            .args(&self.jvm_flags)
            .args(["-cp", &self.classpath()?, "ParentWatch", self.main_class])
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting java (is a JDK 17 installed?)")?;
        let stdin = child.stdin.take();
        Ok(JvmProcess { child, _stdin: stdin, log: self.log.clone() })
    }
}

/// A running server JVM. Dropping it kills the process (SIGKILL) and reaps it.
#[derive(Debug)]
pub struct JvmProcess {
    child: Child,
    /// Held open: the JVM halts when this closes.
    _stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl JvmProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fail with the tail of the server's log if it has exited.
    pub fn check_running(&mut self, what: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{what} exited ({status}); its log {}:\n{}", self.log.display(), log_tail(&self.log, 40));
        }
        Ok(())
    }

    /// SIGKILL, as a crash would, and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Send SIGTERM (an orderly shutdown) if it still runs.
    pub fn term(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        }
    }

    /// Wait up to `grace` for the process to exit, then SIGKILL it.
    pub fn wait_or_kill(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    /// Stop every process in `all`: SIGTERM to all at once, then SIGKILL whatever still runs
    /// after `grace`.
    pub fn stop_all<'a>(all: impl IntoIterator<Item = &'a mut JvmProcess>, grace: Duration) {
        let mut all: Vec<&mut JvmProcess> = all.into_iter().collect();
        all.iter_mut().for_each(|p| p.term());
        all.iter_mut().for_each(|p| p.wait_or_kill(grace));
    }
}

impl Drop for JvmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Write `text` to `path`, creating its folder.
pub(crate) fn write_file(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// The folder the servers keep their data and logs in: the given one (kept), or a new temporary
/// one (removed with its owner).
#[derive(Debug)]
pub enum DataDir {
    Kept(PathBuf),
    Temp(tempfile::TempDir),
}

impl DataDir {
    pub fn new(dir: Option<PathBuf>, prefix: &str) -> anyhow::Result<Self> {
        Ok(match dir {
            Some(d) => {
                std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
                Self::Kept(d)
            }
            None => Self::Temp(tempfile::Builder::new().prefix(prefix).tempdir()?),
        })
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Kept(d) => d,
            Self::Temp(t) => t.path(),
        }
    }
}
