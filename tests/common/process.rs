//! The real binary as a process: spawned with a clean `VERO_PROXY_*` environment, its stderr
//! read line by line, waited on with deadlines, and killed if a test fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_vero-proxy");

/// The spawned binary, its stderr arriving line by line (colour escapes removed).
pub struct Proc {
    /// The process.
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    log: Vec<String>,
}

impl Proc {
    /// Starts the binary with `args` (without argv0), logging at info level without colour, and
    /// with no `VERO_PROXY_*` variable inherited from the test's environment.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Proc {
        Self::spawn_with(args, &[], "info")
    }

    /// As `spawn`, with extra environment variables.
    pub fn spawn_env<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Proc {
        Self::spawn_with(args, env, "info")
    }

    /// As `spawn`, logging at `level`.
    pub fn spawn_logging<S: AsRef<std::ffi::OsStr>>(args: &[S], level: &str) -> Proc {
        Self::spawn_with(args, &[], level)
    }

    /// As `spawn`, with extra environment variables and the log level.
    pub fn spawn_with<S: AsRef<std::ffi::OsStr>>(
        args: &[S],
        env: &[(&str, &str)],
        level: &str,
    ) -> Proc {
        let mut cmd = clean_command(BIN);
        cmd.env("VERO_PROXY_LOG", level)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("cannot start vero-proxy");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf);
                        if tx.send(line.trim_end().to_owned()).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Proc {
            child,
            lines,
            log: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.log.join("\n")
    }

    /// Waits for a stderr line containing `needle` and returns it.
    pub async fn wait_line(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Ok(None) => {
                    let status = self.child.wait();
                    panic!(
                        "vero-proxy exited ({status:?}) before logging {needle:?}; its stderr:\n{}",
                        self.stderr()
                    )
                }
                Err(_) => panic!(
                    "no {needle:?} in vero-proxy's stderr within {within:?}; so far:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// Waits for the process to close its stderr and exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            match timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.log.push(line),
                Ok(None) => break,
                Err(_) => panic!(
                    "vero-proxy did not exit within {within:?}; its stderr:\n{}",
                    self.stderr()
                ),
            }
        }
        self.child.wait().unwrap()
    }

    /// Starts, then returns the address from the "vero-proxy is serving listen=..." line.
    pub async fn serving(&mut self) -> String {
        self.serving_addrs().await.0
    }

    /// Starts, then returns the listen and admin addresses from the "serving" line.
    pub async fn serving_addrs(&mut self) -> (String, String) {
        let line = self
            .wait_line("vero-proxy is serving", Duration::from_secs(30))
            .await;
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        (field("listen="), field("admin="))
    }

    /// Sends SIGTERM at once: the handlers are installed before the "serving" line, so a
    /// SIGTERM straight after it must drain, not kill the process.
    pub async fn terminate(&self) {
        self.signal("TERM");
    }

    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failed test must not leave a proxy running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A command for `program` (the binary, or a wrapper that runs it) without the test's own
/// `VERO_PROXY_*` variables, so only what the test passes configures the binary.
pub fn clean_command<S: AsRef<std::ffi::OsStr>>(program: S) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("VERO_PROXY_") {
            cmd.env_remove(name);
        }
    }
    cmd
}

/// Runs the binary with `args` to its end (within 60 s) with a clean environment; whether it
/// succeeded, and its stdout followed by its stderr, after checking that it did not panic.
pub async fn run_to_end<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String) {
    let mut cmd = tokio::process::Command::from(clean_command(BIN));
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.args(args).output())
        .await
        .expect("vero-proxy did not finish within 60 s")
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("panicked"), "{text}");
    (out.status.success(), text)
}

/// Runs the binary expecting it to refuse to start; returns its stderr after checking that it
/// exited non-zero, did not panic and never served.
pub async fn refused<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> String {
    let mut p = Proc::spawn_with(args, env, "info");
    let status = p.wait_exit(Duration::from_secs(30)).await;
    let log = p.stderr();
    assert!(
        status.code().is_some_and(|c| c != 0),
        "expected a non-zero exit, got {status:?}; stderr:\n{log}"
    );
    assert!(!log.contains("panicked"), "it panicked:\n{log}");
    assert!(!log.contains("vero-proxy is serving"), "it started:\n{log}");
    log
}
