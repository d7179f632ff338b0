//! Running one command for an [`ExecRequest`].
//!
//! The command runs in its own process group with stdin, stdout and stderr piped. So that it
//! can never block on a full pipe while the agent waits for something else, helper threads do
//! the pipe I/O: one writes the request's stdin and closes it, one drains each output stream
//! (keeping the first [`OUTPUT_CAP`] bytes, reading and discarding the rest). The serving
//! thread collects their results and polls for the exit, with the request's deadline.
//!
//! At the deadline the whole process group is killed with `SIGKILL` (so a shell's children die
//! too and release the pipes), and the reply reports status 128 + 9. Output is complete once
//! both pipes reach end-of-file, which for a command that leaves a background process holding
//! them is when that process exits — or, with a timeout, when the group is killed. A process
//! that escaped the group (`setsid`) and keeps a pipe open past the kill is abandoned after a
//! grace period: that stream's reply is empty and marked truncated.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread;
use std::time::{Duration, Instant};

use crate::proto::{ExecRequest, ExecResult, MAX_FRAME_LEN, Message, error_code};
use crate::sys;

/// Bytes kept from each of stdout and stderr, 6 MiB; the rest is discarded and the result
/// marked `truncated`. Both full streams still fit one reply frame.
pub const OUTPUT_CAP: usize = 6 << 20;
const _: () = assert!(2 * OUTPUT_CAP + 64 <= MAX_FRAME_LEN);

/// How long to wait for the pipes to close and the command to be reaped after the kill.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Longest pause between exit-status polls while output is still flowing.
const MAX_POLL: Duration = Duration::from_millis(50);

/// Runs `request` to completion and returns the reply: [`Message::ExecResult`] if the command
/// ran (whatever its status), [`Message::Error`] if it could not be started
/// ([`error_code::SPAWN_FAILED`]), the request is unusable ([`error_code::INVALID_REQUEST`]),
/// or the agent failed while running it ([`error_code::INTERNAL`]).
pub fn exec(request: ExecRequest) -> Message {
    let ExecRequest {
        argv,
        env,
        stdin,
        timeout_ms,
    } = request;
    let Some((program, args)) = argv.split_first() else {
        return error(
            error_code::INVALID_REQUEST,
            "ExecRequest.argv is empty; name the program to run".into(),
        );
    };
    if let Some((key, _)) = env
        .iter()
        .find(|(key, _)| key.is_empty() || key.contains(['=', '\0']))
    {
        return error(
            error_code::INVALID_REQUEST,
            format!("environment variable name {key:?} is empty or contains '=' or NUL"),
        );
    }
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return error(
                error_code::SPAWN_FAILED,
                format!("cannot run {program:?}: {e}"),
            );
        }
    };
    let timeout = (timeout_ms > 0).then(|| Duration::from_millis(u64::from(timeout_ms)));
    match Running::start(child, stdin) {
        Ok(running) => running.finish(timeout),
        Err((child, e)) => {
            abandon(child);
            error(
                error_code::INTERNAL,
                format!("cannot start the I/O threads for {program:?}: {e}"),
            )
        }
    }
}

fn error(code: u16, message: String) -> Message {
    Message::Error { code, message }
}

/// What a reader thread captured from one output stream.
struct Captured {
    bytes: Vec<u8>,
    truncated: bool,
}

enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(&self) -> &'static str {
        match self {
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
        }
    }
}

/// A spawned command whose helper threads are running.
struct Running {
    child: Child,
    events: Receiver<(Stream, io::Result<Captured>)>,
}

impl Running {
    /// Starts the stdin writer and the two output readers. On failure hands the child back so
    /// the caller can kill it.
    fn start(mut child: Child, stdin: Vec<u8>) -> Result<Self, (Child, io::Error)> {
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(mut stdin_pipe), Some(stdout), Some(stderr)) = pipes else {
            let e = io::Error::other("the command's pipes were not created");
            return Err((child, e));
        };
        let (tx, events) = mpsc::channel();
        let started = helper("exec-stdin", move || {
            // A command that exits without reading its input closes the pipe: not an error.
            let _ = stdin_pipe.write_all(&stdin);
        })
        .and_then(|()| reader(stdout, Stream::Stdout, tx.clone()))
        .and_then(|()| reader(stderr, Stream::Stderr, tx));
        match started {
            Ok(()) => Ok(Self { child, events }),
            Err(e) => Err((child, e)),
        }
    }

    /// Waits for the exit and both streams, enforcing `timeout`, and builds the reply.
    fn finish(mut self, timeout: Option<Duration>) -> Message {
        let pid = self.child.id();
        let mut deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut killed = false;
        let mut status: Option<ExitStatus> = None;
        let mut stdout: Option<io::Result<Captured>> = None;
        let mut stderr: Option<io::Result<Captured>> = None;
        let mut poll = Duration::from_millis(1);
        loop {
            if status.is_none() {
                match self.child.try_wait() {
                    Ok(exited) => status = exited,
                    Err(e) => {
                        abandon(self.child);
                        return error(
                            error_code::INTERNAL,
                            format!("cannot wait for the command: {e}"),
                        );
                    }
                }
            }
            let outputs_done = stdout.is_some() && stderr.is_some();
            if status.is_some() && outputs_done {
                break;
            }
            let now = Instant::now();
            if deadline.is_some_and(|at| now >= at) {
                if killed {
                    break; // The grace period is over too.
                }
                if let Err(e) = sys::kill_process_group(pid) {
                    eprintln!("bulwark-agent: cannot kill process group {pid}: {e}");
                }
                killed = true;
                deadline = now.checked_add(KILL_GRACE);
                continue;
            }
            let until_deadline = deadline.map(|at| at.saturating_duration_since(now));
            // While the command runs, wake up to poll its status; once it has exited, only
            // the pipes (or the deadline) are left to wait for.
            let wait = match status {
                None => Some(until_deadline.map_or(poll, |u| u.min(poll))),
                Some(_) => until_deadline,
            };
            poll = (poll * 2).min(MAX_POLL);
            if outputs_done {
                // Nothing more will arrive on the channel; just pause before the next poll.
                thread::sleep(wait.unwrap_or(poll));
                continue;
            }
            let event = match wait {
                Some(wait) => self.events.recv_timeout(wait),
                None => self
                    .events
                    .recv()
                    .map_err(|_| RecvTimeoutError::Disconnected),
            };
            match event {
                Ok((Stream::Stdout, captured)) => stdout = Some(captured),
                Ok((Stream::Stderr, captured)) => stderr = Some(captured),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // A reader ended without reporting; treat its stream as lost.
                    let lost = || Err(io::Error::other("the reader thread stopped"));
                    stdout.get_or_insert_with(lost);
                    stderr.get_or_insert_with(lost);
                }
            }
        }
        let Some(status) = status else {
            abandon(self.child);
            return error(
                error_code::INTERNAL,
                format!("the command (pid {pid}) did not exit after SIGKILL"),
            );
        };
        let mut result = ExecResult {
            status: status_code(status),
            ..ExecResult::default()
        };
        for (stream, captured, out) in [
            (Stream::Stdout, stdout, &mut result.stdout),
            (Stream::Stderr, stderr, &mut result.stderr),
        ] {
            match captured {
                Some(Ok(captured)) => {
                    *out = captured.bytes;
                    result.truncated |= captured.truncated;
                }
                // Held open past the kill by a process outside the group: give up on it.
                None => result.truncated = true,
                Some(Err(e)) => {
                    return error(
                        error_code::INTERNAL,
                        format!("reading the command's {} failed: {e}", stream.name()),
                    );
                }
            }
        }
        Message::ExecResult(result)
    }
}

/// Starts a detached, named helper thread.
fn helper(name: &str, body: impl FnOnce() + Send + 'static) -> io::Result<()> {
    thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
}

/// Starts a thread that captures `pipe` and reports on `tx`.
fn reader<P: Read + Send + 'static>(
    pipe: P,
    stream: Stream,
    tx: Sender<(Stream, io::Result<Captured>)>,
) -> io::Result<()> {
    let name = match stream {
        Stream::Stdout => "exec-stdout",
        Stream::Stderr => "exec-stderr",
    };
    helper(name, move || {
        // The receiver is gone only if the serving thread gave up on this stream.
        let _ = tx.send((stream, capture(pipe)));
    })
}

/// Reads `pipe` to end-of-file, keeping the first [`OUTPUT_CAP`] bytes.
fn capture(mut pipe: impl Read) -> io::Result<Captured> {
    let mut bytes = Vec::new();
    // OUTPUT_CAP is a few MiB: it fits in u64.
    let cap = u64::try_from(OUTPUT_CAP).unwrap_or(u64::MAX);
    pipe.by_ref().take(cap).read_to_end(&mut bytes)?;
    // Keep draining so the command never blocks on a full pipe.
    let discarded = io::copy(&mut pipe, &mut io::sink())?;
    Ok(Captured {
        bytes,
        truncated: discarded > 0,
    })
}

/// The exit code, or 128 + the signal number, as a shell reports it; -1 if neither (which
/// `wait` does not return for a terminated process).
fn status_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128i32.saturating_add(signal)))
        .unwrap_or(-1)
}

/// Kills a command the agent is giving up on, and reaps it on a detached thread so no zombie
/// is left behind.
fn abandon(mut child: Child) {
    let _ = sys::kill_process_group(child.id());
    let _ = helper("exec-reap", move || {
        let _ = child.wait();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(argv: &[&str], stdin: &[u8], timeout_ms: u32) -> Message {
        exec(ExecRequest {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: vec![("AGENT_TEST".into(), "value".into())],
            stdin: stdin.to_vec(),
            timeout_ms,
        })
    }

    #[test]
    fn exec_status_and_streams_are_reported() {
        let reply = run(
            &["sh", "-c", "echo \"$AGENT_TEST\"; cat >&2; exit 7"],
            b"input",
            0,
        );
        let Message::ExecResult(result) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(result.status, 7);
        assert_eq!(result.stdout, b"value\n");
        assert_eq!(result.stderr, b"input");
        assert!(!result.truncated);
    }

    #[test]
    fn exec_output_beyond_cap_is_truncated_and_drained() {
        let reply = run(
            &["head", "-c", &(OUTPUT_CAP + 100).to_string(), "/dev/zero"],
            b"",
            0,
        );
        let Message::ExecResult(result) = reply else {
            panic!("{reply:?}")
        };
        assert_eq!(result.status, 0, "the command was not blocked or killed");
        assert_eq!(result.stdout.len(), OUTPUT_CAP);
        assert!(result.truncated);
    }

    #[test]
    fn exec_timeout_kills_background_children_holding_the_pipes() {
        let started = Instant::now();
        let reply = run(&["sh", "-c", "sleep 30 & echo started; wait"], b"", 200);
        let Message::ExecResult(result) = reply else {
            panic!("{reply:?}")
        };
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(result.status, 128 + 9);
        assert_eq!(result.stdout, b"started\n");
    }

    #[test]
    fn exec_empty_argv_or_bad_env_name_is_invalid() {
        for request in [
            ExecRequest::default(),
            ExecRequest {
                argv: vec!["true".into()],
                env: vec![("A=B".into(), String::new())],
                ..ExecRequest::default()
            },
        ] {
            let reply = exec(request);
            assert!(
                matches!(
                    reply,
                    Message::Error {
                        code: error_code::INVALID_REQUEST,
                        ..
                    }
                ),
                "{reply:?}"
            );
        }
    }

    #[test]
    fn status_code_signal_is_128_plus_signal() {
        assert_eq!(status_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(status_code(ExitStatus::from_raw(3 << 8)), 3);
    }
}
