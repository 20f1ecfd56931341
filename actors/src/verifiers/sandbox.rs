//! A process sandbox for untrusted code: a temp directory as cwd, rlimits, a new session, no network.
//!
//! What is in force, in order of strength:
//! - **rlimits** set in `pre_exec`: CPU seconds, address space, process count, file size, no core dumps.
//! - **A new session** (`setsid`): the child leads its own process group; on the wall-clock timeout (or as
//!   soon as it writes more than the output cap) the whole group gets `SIGKILL`.
//! - **A sandbox uid** when we run as root: the child drops to a uid of its own (one per run, from
//!   [`SandboxLimits::uid_base`]), so `RLIMIT_NPROC` (which root ignores) bounds a fork bomb, the child cannot
//!   touch the parent's files, and after the run a sweep kills every process of that uid, including ones that
//!   left the process group with their own `setsid`. Not root: the child keeps our uid, and `RLIMIT_NPROC`
//!   counts all of our processes (a fork bomb stops there, and the group kill reaps it).
//! - **No network**: `unshare(CLONE_NEWNET)` (root), else `unshare(CLONE_NEWUSER | CLONE_NEWNET)`
//!   (unprivileged user namespaces). Where neither works the documented fallback is
//!   [`NetworkPolicy::IsolateIfPossible`]: the code runs with the host network and a warning is logged once;
//!   [`NetworkPolicy::Isolate`] refuses to run instead. [`network_isolation`] says which is in force.
//! - **A cleared environment**: only `PATH`, `LANG`, `HOME` (the temp dir) and a few `PYTHON*` settings.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Whether sandboxed code may reach the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkPolicy {
    /// A private network namespace, or refuse to run when the machine cannot make one.
    Isolate,
    /// A private network namespace where the machine allows it, else the host network (logged once).
    IsolateIfPossible,
    /// The host network.
    Allow,
}

/// How the machine can cut sandboxed code off the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkIsolation {
    /// `unshare(CLONE_NEWNET)`: needs CAP_SYS_ADMIN (root).
    NetNamespace,
    /// `unshare(CLONE_NEWUSER | CLONE_NEWNET)`: unprivileged user namespaces.
    UserAndNetNamespace,
    /// Neither works: no isolation.
    Unavailable,
}

/// The limits one sandboxed run gets.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    /// Wall-clock limit; the whole process tree is killed when it passes.
    pub wall_timeout: Duration,
    /// `RLIMIT_CPU` in seconds.
    pub cpu_secs: u64,
    /// `RLIMIT_AS` in bytes.
    pub memory_bytes: u64,
    /// `RLIMIT_NPROC`: processes (and threads) the sandbox uid may have.
    pub max_processes: u64,
    /// `RLIMIT_FSIZE` in bytes: the largest file the code may write.
    pub file_size_bytes: u64,
    /// Bytes kept of stdout and of stderr each; more stdout than this kills the run.
    pub output_limit_bytes: usize,
    /// Network policy.
    pub network: NetworkPolicy,
    /// First uid of the range sandbox uids are taken from when running as root.
    pub uid_base: u32,
}

/// How a sandboxed run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Exited with this code.
    Exited(i32),
    /// Killed by this signal (e.g. `SIGXCPU` on the CPU limit, `SIGKILL` on the address-space limit).
    Signaled(i32),
    /// Killed by us on the wall-clock timeout.
    TimedOut,
    /// Killed by us because stdout passed the output cap.
    OutputLimit,
}

/// The outcome of one sandboxed run.
#[derive(Debug, Clone)]
pub struct SandboxOutput {
    /// How the run ended.
    pub termination: Termination,
    /// Standard output, at most `output_limit_bytes` of it.
    pub stdout: Vec<u8>,
    /// Standard error, at most `output_limit_bytes` of it.
    pub stderr: Vec<u8>,
    /// Wall-clock time the run took.
    pub elapsed: Duration,
}

/// Which network isolation this machine supports (probed once, the result logged once).
pub fn network_isolation() -> NetworkIsolation {
    static PROBED: OnceLock<NetworkIsolation> = OnceLock::new();
    *PROBED.get_or_init(|| {
        let isolation = if probe_unshare(libc::CLONE_NEWNET) {
            NetworkIsolation::NetNamespace
        } else if probe_unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) {
            NetworkIsolation::UserAndNetNamespace
        } else {
            NetworkIsolation::Unavailable
        };
        match isolation {
            NetworkIsolation::Unavailable => tracing::warn!(
                "sandbox: no network namespace available on this machine; sandboxed code keeps the host network \
                 (network = \"isolate\" refuses to run instead)"
            ),
            _ => tracing::info!(?isolation, "sandbox: network isolation in force"),
        }
        isolation
    })
}

/// Whether a child can `unshare(flags)`: spawn `true` with the unshare in `pre_exec`.
fn probe_unshare(flags: libc::c_int) -> bool {
    let mut command = Command::new("true");
    command.stdout(Stdio::null()).stderr(Stdio::null());
    // SAFETY: `unshare` is async-signal-safe; the closure touches no shared state.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    matches!(command.status(), Ok(status) if status.success())
}

/// Run `argv` in `dir` under `limits`, feeding it `stdin`. `Err` only when the process could not start.
pub fn run_sandboxed(
    argv: &[String],
    dir: &Path,
    stdin: &[u8],
    limits: &SandboxLimits,
) -> std::io::Result<SandboxOutput> {
    let Some((program, args)) = argv.split_first() else {
        return Err(std::io::Error::other("empty command"));
    };
    let isolation = match limits.network {
        NetworkPolicy::Allow => NetworkIsolation::Unavailable,
        policy => {
            let isolation = network_isolation();
            if policy == NetworkPolicy::Isolate && isolation == NetworkIsolation::Unavailable {
                return Err(std::io::Error::other(
                    "network = \"isolate\" but this machine cannot create a network namespace",
                ));
            }
            isolation
        }
    };
    let sandbox_uid = sandbox_uid(limits.uid_base);
    if let Some(uid) = sandbox_uid {
        std::os::unix::fs::chown(dir, Some(uid), Some(uid))?;
    }

    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("HOME", dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONHASHSEED", "0")
        .env("PYTHONIOENCODING", "utf-8")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let rlimits = [
        (libc::RLIMIT_CPU, limits.cpu_secs),
        (libc::RLIMIT_AS, limits.memory_bytes),
        (libc::RLIMIT_NPROC, limits.max_processes),
        (libc::RLIMIT_FSIZE, limits.file_size_bytes),
        (libc::RLIMIT_CORE, 0),
    ];
    // SAFETY: between fork and exec the closure only makes raw syscalls (setsid, unshare, setrlimit, setgroups,
    // setgid, setuid), which are async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let check = |ret: libc::c_int| {
                if ret != 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(if libc::setsid() < 0 { -1 } else { 0 })?;
            match isolation {
                NetworkIsolation::NetNamespace => check(libc::unshare(libc::CLONE_NEWNET))?,
                NetworkIsolation::UserAndNetNamespace => {
                    check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET))?
                }
                NetworkIsolation::Unavailable => {}
            }
            for (resource, value) in rlimits {
                // CPU: the soft limit sends SIGXCPU (reported as such), the hard one a second later SIGKILL.
                let hard = if resource == libc::RLIMIT_CPU {
                    value + 1
                } else {
                    value
                };
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: hard,
                };
                check(libc::setrlimit(resource, &limit))?;
            }
            if let Some(uid) = sandbox_uid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(uid))?;
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }

    let start = Instant::now();
    let mut child = command.spawn()?;
    let pgid = child.id() as libc::pid_t;
    let (event_tx, event_rx) = mpsc::channel::<Event>();

    // stdin: written by its own thread so a child that never reads cannot block us.
    let mut child_stdin = child.stdin.take();
    let input = stdin.to_vec();
    std::thread::spawn(move || {
        if let Some(pipe) = child_stdin.as_mut() {
            let _ = pipe.write_all(&input); // a child that exits early closes the pipe: not an error
        }
    });
    let stdout = spawn_reader(
        child.stdout.take(),
        limits.output_limit_bytes,
        Some(event_tx.clone()),
    );
    let stderr = spawn_reader(child.stderr.take(), limits.output_limit_bytes, None);
    let waiter_tx = event_tx;
    std::thread::spawn(move || {
        let _ = waiter_tx.send(Event::Exited(child.wait()));
    });

    let deadline = start + limits.wall_timeout;
    let mut killed_for = None;
    let status: Option<ExitStatus> = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match event_rx.recv_timeout(left) {
            Ok(Event::Exited(status)) => break status.ok(),
            Ok(Event::OutputFull) => {
                killed_for.get_or_insert(Termination::OutputLimit);
                kill_group(pgid);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                killed_for.get_or_insert(Termination::TimedOut);
                kill_group(pgid);
                // The group is dead or dying: wait for the waiter's report (SIGKILL cannot be ignored).
                match event_rx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Event::Exited(status)) => break status.ok(),
                    _ => break None,
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break None,
        }
    };
    let elapsed = start.elapsed();
    // Whatever is left of the tree: the group, and with a sandbox uid every process of that uid.
    kill_group(pgid);
    if let Some(uid) = sandbox_uid {
        kill_uid(uid);
    }
    let termination = killed_for.unwrap_or(match status {
        Some(status) => match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(signal)) => Termination::Signaled(signal),
            (None, None) => Termination::Signaled(0),
        },
        None => Termination::TimedOut,
    });
    Ok(SandboxOutput {
        termination,
        stdout: stdout.collect(),
        stderr: stderr.collect(),
        elapsed,
    })
}

/// What the run's helper threads report to the supervising loop.
enum Event {
    Exited(std::io::Result<ExitStatus>),
    OutputFull,
}

/// A pipe drained by its own thread into a capped buffer.
struct Reader {
    buffer: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Receiver<()>,
}

impl Reader {
    /// The bytes read, waiting a moment for the pipe to drain (an escaped grandchild may hold it open:
    /// then what was read so far).
    fn collect(self) -> Vec<u8> {
        let _ = self.done.recv_timeout(Duration::from_millis(500));
        let mut buffer = self
            .buffer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *buffer)
    }
}

fn spawn_reader(
    pipe: Option<impl Read + Send + 'static>,
    cap: usize,
    full: Option<mpsc::Sender<Event>>,
) -> Reader {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done) = mpsc::channel();
    let shared = buffer.clone();
    std::thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0u8; 8192];
        let mut overflowed = false;
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let mut buffer = shared
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let room = cap.saturating_sub(buffer.len());
            buffer.extend_from_slice(&chunk[..n.min(room)]);
            if n > room && !overflowed {
                overflowed = true;
                if let Some(full) = &full {
                    let _ = full.send(Event::OutputFull);
                }
            }
        }
        let _ = done_tx.send(());
    });
    Reader { buffer, done }
}

/// The uid a run drops to: one per run from `base`, only when we are root.
fn sandbox_uid(base: u32) -> Option<u32> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    Some(base + NEXT.fetch_add(1, Ordering::Relaxed) % 4096)
}

fn kill_group(pgid: libc::pid_t) {
    // SAFETY: kill has no memory preconditions; a stale group id gets ESRCH, which we ignore.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
}

/// Kill every process running as `uid`: a forked child becomes that uid and sends `kill(-1, SIGKILL)`.
fn kill_uid(uid: u32) {
    // SAFETY: the forked child only makes async-signal-safe syscalls and leaves with `_exit`.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            if libc::setuid(uid) == 0 {
                libc::kill(-1, libc::SIGKILL);
            }
            libc::_exit(0);
        }
        if pid > 0 {
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
    }
}
