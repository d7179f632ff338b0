//! The x86 bzImage: the setup header of the Linux boot protocol and the compressed kernel inside.
//!
//! Layout (Documentation/arch/x86/boot.rst): the real-mode setup is `setup_sects + 1` sectors of
//! 512 bytes (`setup_sects` at 0x1f1; 0 means 4), protected-mode code follows. Since protocol
//! 2.08 the header gives `payload_offset` (0x248) and `payload_length` (0x24c), relative to the
//! protected-mode code, of the compressed kernel ELF. The x86 build appends the decompressed size
//! as a little-endian u32 to every payload; [`BzImage::extract_vmlinux`] uses it to check the
//! result.

use crate::decompress::{self, Compression, DecompressError};

const BOOT_FLAG: u16 = 0xAA55;
const HDRS: &[u8; 4] = b"HdrS";
/// Largest kernel ELF accepted (Debian's 6.1 cloud vmlinux is ~55 MiB).
pub const VMLINUX_LIMIT: usize = 512 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BzImageError {
    #[error("file is {0} bytes, too short for a bzImage setup header")]
    TooShort(usize),
    #[error("not a bzImage: {0}; pass a Linux x86 bzImage (e.g. /boot/vmlinuz-*)")]
    NotBzImage(&'static str),
    #[error(
        "boot protocol {major}.{minor:02} is older than 2.08 and has no payload fields; use a newer kernel"
    )]
    OldProtocol { major: u8, minor: u8 },
    #[error(
        "payload (offset {offset}, length {length}) lies outside the {file_len}-byte file: the bzImage is truncated"
    )]
    PayloadOutOfBounds {
        offset: usize,
        length: usize,
        file_len: usize,
    },
    #[error("cannot decompress the kernel payload")]
    Decompress(#[source] DecompressError),
    #[error(
        "payload decompressed to {got} bytes but the bzImage says {expected}: the image is corrupt"
    )]
    SizeMismatch { got: usize, expected: usize },
}

/// A parsed bzImage, borrowing the file's bytes.
#[derive(Debug)]
pub struct BzImage<'a> {
    data: &'a [u8],
    /// Sectors of real-mode setup code after the boot sector (0 in the file is reported as 4).
    pub setup_sects: u8,
    /// Boot protocol version, e.g. 0x020f.
    pub protocol: u16,
    /// The kernel's version string (`6.1.0-56-cloud-amd64 (debian-kernel@...) #1 SMP ...`).
    pub kernel_version: Option<String>,
    /// Linear memory the kernel needs to decompress and run in place (`init_size`).
    pub init_size: u32,
    payload: std::ops::Range<usize>,
}

impl<'a> BzImage<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, BzImageError> {
        if data.len() < 0x264 {
            return Err(BzImageError::TooShort(data.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        if u16_at(0x1fe) != BOOT_FLAG {
            return Err(BzImageError::NotBzImage("no 0xAA55 boot flag at 0x1fe"));
        }
        if &data[0x202..0x206] != HDRS {
            return Err(BzImageError::NotBzImage("no \"HdrS\" signature at 0x202"));
        }
        let protocol = u16_at(0x206);
        if protocol < 0x0208 {
            return Err(BzImageError::OldProtocol {
                major: (protocol >> 8) as u8,
                minor: protocol as u8,
            });
        }
        let setup_sects = match data[0x1f1] {
            0 => 4,
            n => n,
        };
        let pm_start = (setup_sects as usize + 1) * 512;
        let offset = pm_start + u32_at(0x248) as usize;
        let length = u32_at(0x24c) as usize;
        if length < 8
            || offset
                .checked_add(length)
                .is_none_or(|end| end > data.len())
        {
            return Err(BzImageError::PayloadOutOfBounds {
                offset,
                length,
                file_len: data.len(),
            });
        }
        let kernel_version = match u16_at(0x20e) {
            0 => None,
            p => data.get(p as usize + 0x200..).and_then(|s| {
                let end = s.iter().take(512).position(|&b| b == 0)?;
                let s = std::str::from_utf8(&s[..end]).ok()?;
                s.chars().all(|c| !c.is_control()).then(|| s.to_owned())
            }),
        };
        Ok(Self {
            data,
            setup_sects,
            protocol,
            kernel_version,
            init_size: u32_at(0x260),
            payload: offset..offset + length,
        })
    }

    /// The kernel release (`uname -r`): the first word of the version string.
    pub fn release(&self) -> Option<&str> {
        self.kernel_version.as_deref()?.split_whitespace().next()
    }

    /// The compressed payload, including the appended size.
    pub fn payload(&self) -> &'a [u8] {
        &self.data[self.payload.clone()]
    }

    /// The payload's compression (from its magic), if known.
    pub fn compression(&self) -> Option<Compression> {
        Compression::detect(self.payload())
    }

    /// Decompresses the payload: the kernel's ELF (`vmlinux`, stripped of debug sections by the
    /// kernel build), bootable through PVH when it has the PVH note. Checks the result's length
    /// against the size appended to the payload.
    pub fn extract_vmlinux(&self) -> Result<(Compression, Vec<u8>), BzImageError> {
        let payload = self.payload();
        let (body, size) = payload.split_at(payload.len() - 4);
        let expected = u32::from_le_bytes([size[0], size[1], size[2], size[3]]) as usize;
        let (format, out) =
            decompress::decompress(body, VMLINUX_LIMIT).map_err(BzImageError::Decompress)?;
        if out.len() != expected {
            return Err(BzImageError::SizeMismatch {
                got: out.len(),
                expected,
            });
        }
        Ok((format, out))
    }
}

/// Test helper: a minimal bzImage around `payload` (which must already end in the size word).
#[cfg(test)]
pub(crate) fn synthetic_bzimage(payload: &[u8], version: &str) -> Vec<u8> {
    let setup_sects = 3u8;
    let pm_start = (setup_sects as usize + 1) * 512;
    let payload_offset = 0x40usize;
    let mut img = vec![0u8; pm_start + payload_offset];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
    img[0x202..0x206].copy_from_slice(HDRS);
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    // The version string lives in the setup code; its pointer is relative to 0x200.
    let vpos = 0x300usize;
    img[0x20e..0x210].copy_from_slice(&((vpos - 0x200) as u16).to_le_bytes());
    img[vpos..vpos + version.len()].copy_from_slice(version.as_bytes());
    img[0x248..0x24c].copy_from_slice(&(payload_offset as u32).to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img[0x260..0x264].copy_from_slice(&0x0100_0000u32.to_le_bytes());
    img.extend_from_slice(payload);
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompress::{gzip_compress, lz4_legacy_compress};

    fn fake_elf() -> Vec<u8> {
        let mut v = b"\x7fELF\x02\x01\x01".to_vec();
        v.extend((0..200_000u32).map(|i| (i % 13) as u8));
        v
    }

    fn with_size(mut c: Vec<u8>, len: usize) -> Vec<u8> {
        c.extend_from_slice(&(len as u32).to_le_bytes());
        c
    }

    const VERSION: &str = "6.1.0-99-cloud-amd64 (test@example) #1 SMP PREEMPT_DYNAMIC Debian";

    #[test]
    fn bzimage_lz4_legacy_payload_is_extracted_and_header_read() {
        let elf = fake_elf();
        let img = synthetic_bzimage(&with_size(lz4_legacy_compress(&elf), elf.len()), VERSION);
        let bz = BzImage::parse(&img).unwrap();
        assert_eq!(bz.setup_sects, 3);
        assert_eq!(bz.protocol, 0x020f);
        assert_eq!(bz.release(), Some("6.1.0-99-cloud-amd64"));
        assert_eq!(bz.init_size, 0x0100_0000);
        assert_eq!(bz.compression(), Some(Compression::Lz4Legacy));
        let (fmt, out) = bz.extract_vmlinux().unwrap();
        assert_eq!(fmt, Compression::Lz4Legacy);
        assert_eq!(out, elf);
    }

    #[test]
    fn bzimage_gzip_payload_is_extracted() {
        let elf = fake_elf();
        let img = synthetic_bzimage(&with_size(gzip_compress(&elf), elf.len()), VERSION);
        let (fmt, out) = BzImage::parse(&img).unwrap().extract_vmlinux().unwrap();
        assert_eq!((fmt, out == elf), (Compression::Gzip, true));
    }

    #[test]
    fn bzimage_wrong_appended_size_is_corrupt() {
        let elf = fake_elf();
        let img = synthetic_bzimage(&with_size(gzip_compress(&elf), elf.len() + 1), VERSION);
        assert!(matches!(
            BzImage::parse(&img).unwrap().extract_vmlinux(),
            Err(BzImageError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn bzimage_bad_headers_are_named() {
        assert!(matches!(
            BzImage::parse(&[0; 100]),
            Err(BzImageError::TooShort(100))
        ));
        let good = synthetic_bzimage(&with_size(gzip_compress(b"x"), 1), VERSION);

        let mut elf = good.clone();
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[0x1fe] = 0;
        let e = BzImage::parse(&elf).unwrap_err();
        assert!(e.to_string().contains("boot flag"), "{e}");

        let mut no_hdrs = good.clone();
        no_hdrs[0x202] = b'X';
        assert!(matches!(
            BzImage::parse(&no_hdrs),
            Err(BzImageError::NotBzImage(_))
        ));

        let mut old = good.clone();
        old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(
            BzImage::parse(&old),
            Err(BzImageError::OldProtocol { major: 2, minor: 4 })
        ));

        let truncated = &good[..good.len() - 3];
        assert!(matches!(
            BzImage::parse(truncated),
            Err(BzImageError::PayloadOutOfBounds { .. })
        ));
    }

    #[test]
    fn bzimage_unknown_payload_compression_is_an_error() {
        let img = synthetic_bzimage(b"not compressed at all\0\0\0\0", VERSION);
        let bz = BzImage::parse(&img).unwrap();
        assert_eq!(bz.compression(), None);
        assert!(matches!(
            bz.extract_vmlinux(),
            Err(BzImageError::Decompress(DecompressError::Unknown { .. }))
        ));
    }
}
