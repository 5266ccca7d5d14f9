//! Processes and waiting: the pieces every end-to-end test needs before it can start a daemon.
//!
//! [`Child`] owns a spawned daemon (containerd, docker-registry, `shoal node` ...): its stdout and
//! stderr go to a log file that the test can read back with [`Child::log`], and dropping it stops
//! the process (SIGTERM, then SIGKILL after a short grace) and reaps it, so a failing test leaves
//! nothing running. When it is dropped during a panic it also prints the tail of its log, which
//! is usually the only clue to why a daemon misbehaved.
//!
//! Tests never sleep to let something happen: they poll with [`wait_until`] or
//! [`wait_for_tcp`], which fail with an error naming what was awaited. Short-lived commands
//! (`ctr`, `skopeo`) run through [`run`] / [`run_ok`], which enforce a timeout so a hung tool
//! fails the test instead of hanging CI.
//!
//! Everything here is blocking; see the crate docs for how to call it from async tests.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};
use std::{fmt, thread};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// How often [`wait_until`] and friends look again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long a [`Child`] gets to exit after SIGTERM before it is sent SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Lines of a child's log printed when it is dropped during a panic.
const LOG_TAIL_LINES: usize = 60;

/// A daemon started by a test; stopped and reaped when dropped.
#[derive(Debug)]
pub struct Child {
    name: String,
    log_path: PathBuf,
    /// `None` once the process has been reaped.
    process: Option<std::process::Child>,
    status: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` with stdin from /dev/null and stdout + stderr appended to
    /// `log_dir/<name>.log`.
    ///
    /// The log is opened in append mode, so a daemon restarted under the same name keeps one log
    /// with all its lives; each life starts with a `==> command` line.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Child> {
        fs::create_dir_all(log_dir)
            .with_context(|| format!("creating log directory {}", log_dir.display()))?;
        let log_path = log_dir.join(format!("{name}.log"));
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        writeln!(log, "==> {cmd:?}")?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let process = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        Ok(Child {
            name: name.to_owned(),
            log_path,
            process: Some(process),
            status: None,
        })
    }

    /// The name given to [`Child::spawn`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id, or `None` once the process has been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|p| p.id())
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process wrote so far (lossily decoded; empty if the log cannot be read).
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }

    /// The last `n` lines of [`Child::log`].
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(status)` if the process has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        let Some(process) = &mut self.process else {
            return Ok(self.status);
        };
        if let Some(status) = process
            .try_wait()
            .with_context(|| format!("checking on {}", self.name))?
        {
            self.process = None;
            self.status = Some(status);
        }
        Ok(self.status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Fails, with the log tail, if the process has exited: for readiness loops, so that a
    /// daemon that died on startup is reported at once instead of after the whole timeout.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); its log ({}) ends with:\n{}",
                self.name,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// Sends `sig` to the process (no-op once it is reaped). SIGSTOP / SIGCONT make a hung peer.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        if let Some(pid) = self.pid() {
            signal::kill(Pid::from_raw(pid as i32), sig)
                .with_context(|| format!("sending {sig} to {} ({pid})", self.name))?;
        }
        Ok(())
    }

    /// Stops the process: SIGTERM, then SIGKILL if it is still running after [`STOP_GRACE`].
    /// Reaps it and returns how it ended. Calling it again returns the same status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        self.stop_within(STOP_GRACE)
    }

    /// Like [`Child::stop`] but with SIGKILL straight away: a crash, as far as peers can tell.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.stop_within(Duration::ZERO)
    }

    fn stop_within(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if !grace.is_zero() {
            // The process may exit between try_wait and kill: ESRCH is not a failure then,
            // and the reap below tells how it ended.
            let _ = self.signal(Signal::SIGCONT);
            let _ = self.signal(Signal::SIGTERM);
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Some(status) = self.try_wait()? {
                    return Ok(status);
                }
                thread::sleep(Duration::from_millis(10));
            }
        }
        let Some(mut process) = self.process.take() else {
            bail!("{} vanished while stopping", self.name);
        };
        let _ = process.kill();
        let status = process
            .wait()
            .with_context(|| format!("reaping {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}) ---\n{}\n--- end of {} ---",
                self.name,
                self.log_path.display(),
                self.log_tail(LOG_TAIL_LINES),
                self.name
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("stopping {}: {e:#}", self.name);
        }
    }
}

/// Reads a log file that may be mid-write and need not be UTF-8.
pub fn read_log(path: &Path) -> String {
    let mut bytes = Vec::new();
    match File::open(path).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    }
}

/// Polls `f` every [`POLL_INTERVAL`] until it returns `Ok(true)`.
///
/// Fails with an error naming `what` if `timeout` passes first, or at once if `f` returns an
/// error: return `Ok(false)` for "not yet" (a refused connection, a 404), and `Err` for "this
/// will never happen" (the daemon died).
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if f().with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
///
/// The port is released before returning, so another process could take it first; that is
/// rare enough for tests, and the daemons we start cannot be handed a bound socket anyway.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Waits until something accepts TCP connections at `addr`.
pub fn wait_for_tcp<A: ToSocketAddrs + fmt::Display>(addr: A, timeout: Duration) -> Result<()> {
    let what = format!("a TCP listener at {addr}");
    wait_until(timeout, &what, || {
        let Ok(addrs) = addr.to_socket_addrs() else {
            return Ok(false);
        };
        Ok(addrs
            .into_iter()
            .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok()))
    })
}

/// Runs a short-lived command to completion, capturing stdout and stderr; kills it and fails if
/// it takes longer than `timeout`. A non-zero exit is *not* an error here (see [`run_ok`]).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            bail!(
                "{cmd:?} did not finish within {timeout:?}; stderr so far:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// [`run`], failing unless the command exits 0 (the error carries its stderr and stdout);
/// returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let output = run(cmd, timeout)?;
    check_output(&format!("{cmd:?}"), output)
}

/// Turns a finished command's output into its stdout, or an error with everything it printed.
pub fn check_output(what: &str, output: Output) -> Result<String> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\nstderr: {}\nstdout: {stdout}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end(),
        );
    }
    Ok(stdout)
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_names_what_it_waited_for() {
        let err = wait_until(Duration::from_millis(120), "the moon", || Ok(false))
            .expect_err("must time out");
        assert!(format!("{err:#}").contains("the moon"), "{err:#}");
    }

    #[test]
    fn wait_until_stops_at_first_error() -> Result<()> {
        let mut calls = 0;
        let result = wait_until(Duration::from_secs(10), "x", || {
            calls += 1;
            bail!("broken")
        });
        assert!(result.is_err());
        assert_eq!(calls, 1);
        Ok(())
    }

    #[test]
    fn child_logs_and_is_stopped_on_drop() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; echo oops >&2; exec sleep 1000"]);
        let child = Child::spawn("sleeper", cmd, dir.path())?;
        let pid = child.pid().context("no pid")?;
        wait_until(Duration::from_secs(10), "the sleeper's log", || {
            Ok(child.log().contains("started") && child.log().contains("oops"))
        })?;
        drop(child);
        // Reaped, so the pid no longer exists (it could be reused, but not this fast).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn child_that_ignores_sigterm_is_killed() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.05; done",
        ]);
        let mut child = Child::spawn("stubborn", cmd, dir.path())?;
        wait_until(Duration::from_secs(10), "stubborn to trap TERM", || {
            Ok(child.log().contains("ready"))
        })?;
        let status = child.stop_within(Duration::from_millis(200))?;
        assert!(!status.success());
        assert!(!child.is_running());
        Ok(())
    }

    #[test]
    fn run_times_out() {
        let err = run(
            Command::new("sleep").arg("1000"),
            Duration::from_millis(100),
        )
        .expect_err("must time out");
        assert!(format!("{err:#}").contains("did not finish"), "{err:#}");
    }

    #[test]
    fn run_ok_reports_stderr() {
        let err = run_ok(
            Command::new("sh").args(["-c", "echo bad thing >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .expect_err("must fail");
        assert!(format!("{err:#}").contains("bad thing"), "{err:#}");
    }

    #[test]
    fn free_port_is_connectable_once_bound() -> Result<()> {
        let port = free_port()?;
        let _listener = TcpListener::bind(("127.0.0.1", port))?;
        wait_for_tcp(format!("127.0.0.1:{port}").as_str(), Duration::from_secs(5))
    }
}
