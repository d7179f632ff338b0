//! Listing processes from `/proc`, without a `ps` binary in the guest.
//!
//! For every numeric directory, `stat` gives the command name, state and parent, and `status`
//! gives the real uid. `comm` in `stat` is wrapped in parentheses and may itself contain
//! spaces and `)`, so it ends at the *last* `)` in the file. Processes exit while the scan runs;
//! one whose files cannot be read or parsed is left out rather than failing the listing.

use std::fs;
use std::io;
use std::path::Path;

use crate::proto::Proc;

/// Lists the processes under `proc_root` (normally `/proc`), sorted by pid. Fails only if the
/// directory itself cannot be read.
pub fn list_processes(proc_root: &Path) -> io::Result<Vec<Proc>> {
    let mut procs: Vec<Proc> = fs::read_dir(proc_root)?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let pid = parse_pid(entry.file_name().to_str()?)?;
            read_proc(&entry.path(), pid)
        })
        .collect();
    procs.sort_by_key(|p| p.pid);
    Ok(procs)
}

/// A `/proc` entry name that is a pid: ASCII digits only (so not `+1`), fitting a u32.
fn parse_pid(name: &str) -> Option<u32> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

fn read_proc(dir: &Path, pid: u32) -> Option<Proc> {
    let stat = parse_stat(&fs::read(dir.join("stat")).ok()?)?;
    let uid = parse_status_uid(&fs::read(dir.join("status")).ok()?)?;
    Some(Proc {
        pid,
        ppid: stat.ppid,
        uid,
        comm: stat.comm,
        state: stat.state,
    })
}

/// The fields the agent reports from `/proc/[pid]/stat`.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: u8,
    ppid: u32,
}

/// Parses `pid (comm) state ppid ...`: comm runs from the first `(` to the last `)`.
fn parse_stat(stat: &[u8]) -> Option<Stat> {
    let open = stat.iter().position(|&b| b == b'(')?;
    let close = stat.iter().rposition(|&b| b == b')')?;
    let comm = stat.get(open.checked_add(1)?..close)?;
    let mut fields = stat
        .get(close.checked_add(1)?..)?
        .split(u8::is_ascii_whitespace)
        .filter(|field| !field.is_empty());
    let state = match fields.next()? {
        [state] => *state,
        _ => return None,
    };
    let ppid = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
    Some(Stat {
        comm: String::from_utf8_lossy(comm).into_owned(),
        state,
        ppid,
    })
}

/// The real uid: the first number on the `Uid:` line of `/proc/[pid]/status`. The file is read
/// as bytes because its `Name:` line may hold any bytes the process chose.
fn parse_status_uid(status: &[u8]) -> Option<u32> {
    let line = status
        .split(|&b| b == b'\n')
        .find_map(|line| line.strip_prefix(b"Uid:"))?;
    let real = line
        .split(u8::is_ascii_whitespace)
        .find(|field| !field.is_empty())?;
    std::str::from_utf8(real).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(comm: &str, state: u8, ppid: u32) -> Option<Stat> {
        Some(Stat {
            comm: comm.into(),
            state,
            ppid,
        })
    }

    #[test]
    fn parse_stat_plain_comm() {
        assert_eq!(
            parse_stat(b"42 (sh) S 1 42 42 0 -1 4194560 100 0 0 0\n"),
            stat("sh", b'S', 1)
        );
    }

    #[test]
    fn parse_stat_comm_with_spaces_and_parens_ends_at_last_paren() {
        assert_eq!(
            parse_stat(b"7 (a) (b c)) R 3 7 7 0\n"),
            stat("a) (b c)", b'R', 3)
        );
        assert_eq!(parse_stat(b"8 () Z 2 0\n"), stat("", b'Z', 2));
    }

    #[test]
    fn parse_stat_non_utf8_comm_is_replaced() {
        assert_eq!(parse_stat(b"9 (\xff) S 1\n"), stat("\u{fffd}", b'S', 1));
    }

    #[test]
    fn parse_stat_malformed_is_none() {
        for bad in [
            &b""[..],
            b"1 sh S 1",
            b"1 )sh( S 1",
            b"1 (sh)",
            b"1 (sh) S",
            b"1 (sh) SS 1",
            b"1 (sh) S x",
            b"1 (sh) S -1",
        ] {
            assert_eq!(parse_stat(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn parse_status_uid_takes_the_real_uid() {
        let status = b"Name:\t\xffodd\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t5\t5\t5\t5\n";
        assert_eq!(parse_status_uid(status), Some(1000));
        assert_eq!(parse_status_uid(b"Name:\tx\n"), None);
        assert_eq!(parse_status_uid(b"Uid:\t\n"), None);
    }

    #[test]
    fn parse_pid_accepts_digits_only() {
        assert_eq!(parse_pid("123"), Some(123));
        for bad in ["", "+1", "self", "1a", "99999999999"] {
            assert_eq!(parse_pid(bad), None, "{bad}");
        }
    }

    #[test]
    fn list_processes_finds_this_process() {
        let procs = list_processes(Path::new("/proc")).unwrap();
        let me = procs.iter().find(|p| p.pid == std::process::id()).unwrap();
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
        assert!(procs.windows(2).all(|w| w[0].pid < w[1].pid), "sorted");
    }
}
