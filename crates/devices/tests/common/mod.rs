//! What the back-end host tests share: finding a back-end process and killing it.

/// The pid of the live child of `launcher` named `comm` (`bw-vsock`, `bw-blk0`).
pub fn backend_pid(launcher: i32, comm: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid: i32 = rest.split(' ').nth(1)?.parse().ok()?;
        if name.ends_with(&format!("({comm}")) && ppid == launcher && !rest.starts_with('Z') {
            return Some(pid);
        }
    }
    None
}

/// `kill -9 pid` through the kill command (the tests have no unsafe code of their own).
pub fn kill9(pid: i32) -> i32 {
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .map_or(-1, |s| s.code().unwrap_or(-1))
}
