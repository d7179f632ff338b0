//! Talking to monitor processes: spawning them in their own process group, the control
//! channel over tokio, and telling from `/proc` whether a recorded monitor still lives.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bulwark_channel::{ChannelError, MAX_FRAME_LEN, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::store::{ExitRecord, MonitorProc};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("cannot start the monitor {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give the restore key to the monitor")]
    Key(#[source] std::io::Error),
    #[error("the monitor's control socket does not answer")]
    Channel(#[from] ChannelError),
    #[error("the monitor did not answer within {0:?}")]
    Timeout(Duration),
}

/// How to start one monitor.
#[derive(Debug)]
pub struct Launch<'a> {
    /// The `bulwark` executable.
    pub monitor: &'a Path,
    /// The VM's directory.
    pub dir: &'a Path,
    /// Restore from a snapshot instead of booting.
    pub restore: Option<&'a RestoreFrom>,
    /// Pass `--no-jail` (debugging only).
    pub no_jail: bool,
}

/// A snapshot to start a VM from.
#[derive(Debug)]
pub struct RestoreFrom {
    pub path: std::path::PathBuf,
    /// The owner's key, given to the monitor on its stdin.
    pub key: String,
    /// Resume at once and fill memory on first touch.
    pub lazy: bool,
}

/// Starts `bulwark monitor --dir DIR` in its own process group (so it outlives bulwarkd and
/// a Ctrl-C on bulwarkd's terminal does not reach it), stdin from /dev/null (or the restore
/// key), stdout and stderr appended to `DIR/monitor.log`.
pub async fn spawn(l: &Launch<'_>) -> Result<tokio::process::Child, MonitorError> {
    let log_path = l.dir.join("monitor.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|source| MonitorError::Log {
            path: log_path.clone(),
            source,
        })?;
    let log2 = log.try_clone().map_err(|source| MonitorError::Log {
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = tokio::process::Command::new(l.monitor);
    cmd.arg("monitor").arg("--dir").arg(l.dir);
    if l.no_jail {
        cmd.arg("--no-jail");
    }
    if let Some(r) = l.restore {
        cmd.arg("--restore").arg(&r.path).arg("--key-stdin");
        if r.lazy {
            cmd.arg("--lazy");
        }
        cmd.stdin(Stdio::piped());
    } else {
        cmd.stdin(Stdio::null());
    }
    cmd.stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|source| MonitorError::Spawn {
        path: l.monitor.to_path_buf(),
        source,
    })?;
    if let Some(RestoreFrom { key, .. }) = l.restore
        && let Some(mut stdin) = child.stdin.take()
    {
        // A monitor that exits before reading the key closes the pipe; its exit is reported
        // by the readiness wait, so a write error here is not the interesting one.
        let _ = stdin.write_all(format!("{key}\n").as_bytes()).await;
        drop(stdin);
    }
    Ok(child)
}

/// Sends one request on a fresh connection to `control.sock` and reads the answer.
pub async fn call(sock: &Path, req: &Request, timeout: Duration) -> Result<Response, MonitorError> {
    let exchange = async {
        let mut s = UnixStream::connect(sock).await.map_err(ChannelError::Io)?;
        s.write_all(&bulwark_channel::encode(req))
            .await
            .map_err(ChannelError::Io)?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ChannelError::Closed
            } else {
                ChannelError::Io(e)
            }
        })?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            return Err(ChannelError::FrameSize(len));
        }
        let mut frame = vec![0u8; len];
        s.read_exact(&mut frame).await.map_err(ChannelError::Io)?;
        bulwark_channel::decode::<Response>(&frame)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(MonitorError::Timeout(timeout)),
    }
}

/// `(state letter, start time)` of a process from `/proc/PID/stat` (fields 3 and 22).
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    // Field 3 was `state`; field 22 is 19 further.
    let start = f.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// Whether the recorded monitor is still the same, living process (not a zombie, not a
/// recycled pid).
pub fn alive(m: &MonitorProc) -> bool {
    matches!(proc_stat(m.pid), Some((s, t)) if t == m.start_time && s != 'Z' && s != 'X')
}

/// Reads `exit.json` if the monitor wrote one.
pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let text = std::fs::read(dir.join(bulwark_channel::EXIT_FILE)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// The last lines of `monitor.log`, for errors about a monitor that would not start.
pub fn log_tail(dir: &Path) -> String {
    let text = std::fs::read(dir.join("monitor.log")).unwrap_or_default();
    let start = text.len().saturating_sub(600);
    let tail = String::from_utf8_lossy(&text[start..]);
    tail.trim()
        .lines()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_reads_own_process() {
        let (state, start) = proc_stat(std::process::id()).unwrap();
        assert!(state == 'R' || state == 'S', "{state}");
        assert!(start > 0);
        let me = MonitorProc {
            pid: std::process::id(),
            start_time: start,
        };
        assert!(alive(&me));
        assert!(!alive(&MonitorProc {
            start_time: start + 1,
            ..me
        }));
    }
}
