//! The cpio "newc" format (`070701`), the format Linux unpacks an initramfs from.
//!
//! [`CpioWriter`] streams an archive: each entry is a 110-byte ASCII header (13 fields of 8 hex
//! digits after the magic), the NUL-terminated name padded so that header plus name is a multiple
//! of 4 bytes, then the data padded to 4 bytes; `TRAILER!!!` ends the archive. Parent directories
//! are added on demand, duplicate paths are refused (an extra file must not silently replace
//! `/init`), and every timestamp is 0 so that the same inputs give the same bytes (the manifest's
//! hashes are then reproducible).
//!
//! [`parse`] reads an archive back; the tests use it, and so can anything that must check that an
//! initrd is a newc archive before booting it.

use std::collections::HashSet;
use std::io::{self, Read, Write};

/// File type bits of `st_mode`.
pub const S_IFREG: u32 = 0o100_000;
pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFLNK: u32 = 0o120_000;
pub const S_IFCHR: u32 = 0o020_000;
const S_IFMT: u32 = 0o170_000;

const MAGIC: &[u8; 6] = b"070701";
const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";

#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error(
        "cpio path {0:?} is not usable: give a relative path of plain components (no `..`, `.`, or empty parts)"
    )]
    BadPath(String),
    #[error(
        "cpio path {0:?} was added twice: each file of the initramfs must come from one source"
    )]
    DuplicatePath(String),
    #[error("{path:?} is {size} bytes; newc archives hold files below 4 GiB")]
    TooLarge { path: String, size: u64 },
    #[error("{path:?}: the reader gave {got} bytes but {expected} were announced")]
    ShortRead {
        path: String,
        expected: u64,
        got: u64,
    },
    #[error("cannot write the cpio archive")]
    Io(#[from] io::Error),
    #[error("not a newc cpio archive at byte {offset}: {problem}")]
    Malformed {
        offset: usize,
        problem: &'static str,
    },
}

/// Writes a newc archive to `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    paths: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            paths: HashSet::new(),
        }
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.written
    }

    pub fn is_empty(&self) -> bool {
        self.written == 0
    }

    /// Whether `path` (normalised) is already in the archive.
    pub fn contains(&self, path: &str) -> bool {
        normalize(path).is_ok_and(|p| self.paths.contains(&p))
    }

    /// A directory with permission bits `perm` (e.g. `0o755`). Adding one that exists already
    /// (for example as the parent of an earlier file) is not an error.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        let path = normalize(path)?;
        if self.paths.contains(&path) {
            return Ok(());
        }
        self.parents(&path)?;
        self.entry(&path, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])?;
        Ok(())
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let mut reader = data;
        self.file_from_reader(path, perm, data.len() as u64, &mut reader)
    }

    /// A regular file of `size` bytes read from `reader` (large files need not be in memory).
    pub fn file_from_reader(
        &mut self,
        path: &str,
        perm: u32,
        size: u64,
        reader: &mut dyn Read,
    ) -> Result<(), CpioError> {
        let path = self.new_path(path)?;
        let size32 = u32::try_from(size).map_err(|_| CpioError::TooLarge {
            path: path.clone(),
            size,
        })?;
        self.header(&path, S_IFREG | (perm & 0o7777), 1, size32, (0, 0))?;
        let copied = io::copy(&mut reader.take(size), &mut self.out)?;
        if copied != size {
            return Err(CpioError::ShortRead {
                path,
                expected: size,
                got: copied,
            });
        }
        self.written += size;
        self.pad()?;
        Ok(())
    }

    /// A symbolic link `path` -> `target` (the target is stored as the entry's data).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node (e.g. `dev/console`, 5:1). Writing one needs no privileges: it is
    /// the kernel that creates the node when it unpacks the archive.
    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let path = self.new_path(path)?;
        self.entry(&path, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the output.
    pub fn finish(self) -> Result<W, CpioError> {
        self.finish_with_len().map(|(out, _)| out)
    }

    /// Writes the trailer and returns the output and the archive's total length.
    pub fn finish_with_len(mut self) -> Result<(W, u64), CpioError> {
        self.header(TRAILER, 0, 1, 0, (0, 0))?;
        // Conventionally archives are padded to 512 bytes; the kernel does not need it, but cpio(1)
        // and other readers expect whole blocks.
        let rem = self.written % 512;
        if rem != 0 {
            let pad = vec![0u8; (512 - rem) as usize];
            self.out.write_all(&pad)?;
            self.written += pad.len() as u64;
        }
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn new_path(&mut self, path: &str) -> Result<String, CpioError> {
        let path = normalize(path)?;
        if self.paths.contains(&path) {
            return Err(CpioError::DuplicatePath(path));
        }
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = path[end..].find('/') {
            end += i;
            let parent = &path[..end];
            if !self.paths.contains(parent) {
                let parent = parent.to_owned();
                self.entry(&parent, S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
            end += 1;
        }
        Ok(())
    }

    fn entry(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            path: path.to_owned(),
            size: data.len() as u64,
        })?;
        self.header(path, mode, nlink, size, rdev)?;
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        self.pad()
    }

    /// Header and padded name. `rdev` is (major, minor) of a device node.
    fn header(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        size: u32,
        rdev: (u32, u32),
    ) -> Result<(), CpioError> {
        let ino = if path == TRAILER {
            0
        } else {
            self.paths.insert(path.to_owned());
            let ino = self.next_ino;
            self.next_ino += 1;
            ino
        };
        let fields = [
            ino,
            mode,
            0, // uid: root
            0, // gid: root
            nlink,
            0, // mtime: fixed, for reproducible archives
            size,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            path.len() as u32 + 1, // namesize, with the NUL
            0,                     // check (only for 070702)
        ];
        let mut header = Vec::with_capacity(HEADER_LEN + path.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        header.extend_from_slice(path.as_bytes());
        header.push(0);
        self.out.write_all(&header)?;
        self.written += header.len() as u64;
        self.pad()
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = (4 - self.written % 4) % 4;
        self.out.write_all(&[0u8; 3][..n as usize])?;
        self.written += n;
        Ok(())
    }
}

/// Strips a leading `/` and refuses paths that could escape or be ambiguous.
fn normalize(path: &str) -> Result<String, CpioError> {
    let p = path.trim_start_matches('/');
    let ok = !p.is_empty()
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(p.to_owned())
    } else {
        Err(CpioError::BadPath(path.to_owned()))
    }
}

/// One entry of a parsed archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpioEntry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: Vec<u8>,
}

impl CpioEntry {
    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    pub fn perm(&self) -> u32 {
        self.mode & 0o7777
    }
}

/// Parses a newc archive up to its trailer (the trailer is not returned). Concatenated archives
/// (as the kernel accepts) are not followed: this reads the first one.
pub fn parse(data: &[u8]) -> Result<Vec<CpioEntry>, CpioError> {
    let mut entries = Vec::new();
    let mut pos = 0usize;
    loop {
        let bad = |offset, problem| CpioError::Malformed { offset, problem };
        let header = data
            .get(pos..pos + HEADER_LEN)
            .ok_or(bad(pos, "archive ends before the trailer"))?;
        if &header[..6] != MAGIC && &header[..6] != b"070702" {
            return Err(bad(pos, "no 070701 magic"));
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i])
                .map_err(|_| bad(pos, "header field is not ASCII"))?;
            *v = u32::from_str_radix(hex, 16).map_err(|_| bad(pos, "header field is not hex"))?;
        }
        let [
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            size,
            _,
            _,
            rmaj,
            rmin,
            namesize,
            _,
        ] = f;
        let name_start = pos + HEADER_LEN;
        let name_end = name_start + namesize as usize;
        let name = data
            .get(name_start..name_end)
            .ok_or(bad(pos, "name runs past the end"))?;
        let name = name
            .strip_suffix(&[0])
            .ok_or(bad(pos, "name is not NUL-terminated"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad(pos, "name is not UTF-8"))?;
        let data_start = align4(name_end);
        let data_end = data_start + size as usize;
        if name == TRAILER {
            return Ok(entries);
        }
        let body = data
            .get(data_start..data_end)
            .ok_or(bad(pos, "data runs past the end"))?;
        entries.push(CpioEntry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major: rmaj,
            rdev_minor: rmin,
            data: body.to_vec(),
        });
        pos = align4(data_end);
    }
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut CpioWriter<Vec<u8>>)) -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        build(&mut w);
        w.finish().unwrap()
    }

    #[test]
    fn cpio_round_trip_keeps_names_modes_data_and_links() {
        let bytes = archive(|w| {
            w.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
            w.file("lib/modules/x/a.ko", 0o644, &[1, 2, 3, 4, 5])
                .unwrap();
            w.symlink("bin/sh", "busybox").unwrap();
            w.char_device("dev/console", 0o600, 5, 1).unwrap();
            w.dir("proc", 0o555).unwrap();
        });
        let entries = parse(&bytes).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "init",
                "lib",
                "lib/modules",
                "lib/modules/x",
                "lib/modules/x/a.ko",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "proc"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert!(get("init").is_file());
        assert_eq!(get("init").perm(), 0o755);
        assert_eq!(get("init").data, b"#!/bin/sh\n");
        assert_eq!(get("lib/modules/x/a.ko").data, [1, 2, 3, 4, 5]);
        assert!(get("lib/modules").is_dir());
        assert_eq!(get("lib/modules").nlink, 2);
        assert!(get("bin/sh").is_symlink());
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("dev/console").mode, S_IFCHR | 0o600);
        assert_eq!(
            (get("dev/console").rdev_major, get("dev/console").rdev_minor),
            (5, 1)
        );
        assert_eq!(get("proc").perm(), 0o555);
        // Reproducible: root-owned, time 0, distinct inodes.
        assert!(
            entries
                .iter()
                .all(|e| e.uid == 0 && e.gid == 0 && e.mtime == 0)
        );
        let inodes: HashSet<u32> = entries.iter().map(|e| e.ino).collect();
        assert_eq!(inodes.len(), entries.len());
    }

    #[test]
    fn cpio_header_layout_matches_newc() {
        let bytes = archive(|w| w.file("ab", 0o644, b"xyz").unwrap());
        // 110-byte header, "ab\0" -> 113, padded to 116; 3 data bytes padded to 120.
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001"); // ino
        assert_eq!(&bytes[14..22], b"000081a4"); // mode 0100644
        assert_eq!(&bytes[54..62], b"00000003"); // filesize
        assert_eq!(&bytes[94..102], b"00000003"); // namesize "ab\0"
        assert_eq!(&bytes[110..113], b"ab\0");
        assert_eq!(&bytes[113..116], [0, 0, 0]);
        assert_eq!(&bytes[116..119], b"xyz");
        assert_eq!(bytes[119], 0);
        assert_eq!(&bytes[120..126], b"070701");
        assert_eq!(&bytes[230..241], b"TRAILER!!!\0");
        assert_eq!(bytes.len() % 512, 0);
        assert!(bytes[244..].iter().all(|&b| b == 0));
    }

    #[test]
    fn cpio_every_entry_starts_aligned_for_all_name_and_data_lengths() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let name = "n".repeat(name_len);
                let data = vec![7u8; data_len];
                let bytes = archive(|w| {
                    w.file(&name, 0o600, &data).unwrap();
                    w.file("z", 0o600, b"1").unwrap();
                });
                let entries = parse(&bytes).unwrap();
                assert_eq!(entries.len(), 2, "name {name_len} data {data_len}");
                assert_eq!(entries[0].data, data);
                assert_eq!(entries[1].data, b"1");
            }
        }
    }

    #[test]
    fn cpio_duplicate_or_escaping_paths_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("init", 0o755, b"a").unwrap();
        assert!(matches!(
            w.file("/init", 0o755, b"b"),
            Err(CpioError::DuplicatePath(p)) if p == "init"
        ));
        for bad in ["", "/", "../x", "a/../b", "a//b", "./a", "a/."] {
            assert!(
                matches!(w.file(bad, 0o644, b""), Err(CpioError::BadPath(_))),
                "{bad:?}"
            );
        }
        // A directory added again is fine (it may have been created as a parent).
        w.file("d/f", 0o644, b"").unwrap();
        w.dir("d", 0o700).unwrap();
        assert!(w.contains("/d/f"));
    }

    #[test]
    fn cpio_short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let mut r: &[u8] = b"abc";
        assert!(matches!(
            w.file_from_reader("f", 0o644, 10, &mut r),
            Err(CpioError::ShortRead {
                expected: 10,
                got: 3,
                ..
            })
        ));
    }

    #[test]
    fn cpio_parse_rejects_garbage_and_truncation() {
        assert!(matches!(
            parse(b"\x1f\x8b not cpio"),
            Err(CpioError::Malformed { .. })
        ));
        let bytes = archive(|w| w.file("f", 0o644, b"data").unwrap());
        assert!(parse(&bytes[..100]).is_err());
        assert!(parse(&bytes[..120]).is_err());
        let mut bad = bytes.clone();
        bad[0] = b'1';
        assert!(parse(&bad).is_err());
    }

    /// GNU cpio(1), an independent reader, must list the same names (.ci/run installs it).
    #[test]
    fn cpio_output_is_readable_by_gnu_cpio() {
        let bytes = archive(|w| {
            w.file("bin/busybox", 0o755, b"\x7fELF").unwrap();
            w.symlink("bin/sh", "busybox").unwrap();
        });
        let child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = child.expect("this test needs GNU cpio: apt-get install cpio");
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bin\nbin/busybox\nbin/sh\n"
        );
    }
}
