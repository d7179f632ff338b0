//! Payload files: flat binaries and static ELF64 executables.
//!
//! A payload is user input, not guest input, but it is still parsed defensively: every offset
//! and size is checked against the file and against the memory the layout gives the payload,
//! and each refusal says what to change.

use super::layout::PAYLOAD_ADDR;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PF_X: u32 = 1;
const MAX_PHDRS: u16 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("payload file is empty; give a flat binary or a static ELF executable")]
    Empty,
    #[error("payload ELF is malformed: {0}")]
    Malformed(&'static str),
    #[error("payload ELF is not a 64-bit little-endian x86-64 executable: {0}")]
    WrongArch(&'static str),
    #[error(
        "payload ELF is position-independent (ET_DYN); link it with -static -no-pie at a fixed address such as {PAYLOAD_ADDR:#x}"
    )]
    PositionIndependent,
    #[error("payload ELF is dynamically linked (has PT_INTERP); link it with -static")]
    Dynamic,
    #[error("payload ELF has no loadable segment")]
    NoSegments,
    #[error(
        "payload segment {index} at {start:#x}..{end:#x} lies outside payload memory {min:#x}..{max:#x}; link it at {PAYLOAD_ADDR:#x} or raise --memory"
    )]
    SegmentOutside {
        index: usize,
        start: u64,
        end: u64,
        min: u64,
        max: u64,
    },
    #[error("payload segments {0} and {1} overlap")]
    SegmentsOverlap(usize, usize),
    #[error("payload entry point {0:#x} is not inside an executable segment")]
    EntryOutside(u64),
    #[error(
        "flat payload is {size} bytes but only {available} bytes fit at {PAYLOAD_ADDR:#x}; raise --memory"
    )]
    TooLarge { size: u64, available: u64 },
}

/// One piece of the payload to copy into guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    /// File bytes; the rest up to `mem_size` is zero (guest memory starts zeroed).
    pub data: std::ops::Range<usize>,
    pub mem_size: u64,
    pub exec: bool,
}

/// A parsed payload, ready to load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadImage {
    pub entry: u64,
    pub segments: Vec<Segment>,
    pub is_elf: bool,
}

impl PayloadImage {
    /// First address above the image (page-aligned): where the heap starts.
    pub fn end(&self) -> u64 {
        let end = self
            .segments
            .iter()
            .map(|s| s.addr + s.mem_size)
            .max()
            .unwrap_or(PAYLOAD_ADDR);
        end.div_ceil(0x1000) * 0x1000
    }
}

fn u16_at(b: &[u8], off: usize) -> Result<u16, ImageError> {
    b.get(off..off + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or(ImageError::Malformed("header truncated"))
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, ImageError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or(ImageError::Malformed("header truncated"))
}

fn u64_at(b: &[u8], off: usize) -> Result<u64, ImageError> {
    let mut v = [0u8; 8];
    v.copy_from_slice(
        b.get(off..off + 8)
            .ok_or(ImageError::Malformed("header truncated"))?,
    );
    Ok(u64::from_le_bytes(v))
}

/// Parses `file` as a payload that must fit in `[PAYLOAD_ADDR, limit)`.
pub fn parse(file: &[u8], limit: u64) -> Result<PayloadImage, ImageError> {
    if file.is_empty() {
        return Err(ImageError::Empty);
    }
    if file.starts_with(ELF_MAGIC) {
        return parse_elf(file, limit);
    }
    let size = file.len() as u64;
    let available = limit.saturating_sub(PAYLOAD_ADDR);
    if size > available {
        return Err(ImageError::TooLarge { size, available });
    }
    Ok(PayloadImage {
        entry: PAYLOAD_ADDR,
        segments: vec![Segment {
            addr: PAYLOAD_ADDR,
            data: 0..file.len(),
            mem_size: size,
            exec: true,
        }],
        is_elf: false,
    })
}

fn parse_elf(f: &[u8], limit: u64) -> Result<PayloadImage, ImageError> {
    if f.len() < 64 {
        return Err(ImageError::Malformed("shorter than the ELF header"));
    }
    if f[4] != 2 {
        return Err(ImageError::WrongArch("not ELFCLASS64"));
    }
    if f[5] != 1 {
        return Err(ImageError::WrongArch("not little-endian"));
    }
    if u16_at(f, 18)? != 62 {
        return Err(ImageError::WrongArch("e_machine is not EM_X86_64"));
    }
    match u16_at(f, 16)? {
        2 => {}
        3 => return Err(ImageError::PositionIndependent),
        _ => return Err(ImageError::Malformed("e_type is not ET_EXEC")),
    }
    let entry = u64_at(f, 24)?;
    let phoff = u64_at(f, 32)?;
    let phentsize = u16_at(f, 54)?;
    let phnum = u16_at(f, 56)?;
    if phentsize != 56 {
        return Err(ImageError::Malformed("e_phentsize is not 56"));
    }
    if phnum > MAX_PHDRS {
        return Err(ImageError::Malformed("more than 64 program headers"));
    }
    if phoff
        .checked_add(u64::from(phnum) * 56)
        .is_none_or(|end| end > f.len() as u64)
    {
        return Err(ImageError::Malformed(
            "program headers lie past the end of the file",
        ));
    }
    let phoff = phoff as usize;

    let mut segments = Vec::new();
    for i in 0..usize::from(phnum) {
        let ph = phoff + i * 56;
        let p_type = u32_at(f, ph)?;
        if p_type == PT_INTERP {
            return Err(ImageError::Dynamic);
        }
        if p_type != PT_LOAD {
            continue;
        }
        let flags = u32_at(f, ph + 4)?;
        let offset = u64_at(f, ph + 8)?;
        let vaddr = u64_at(f, ph + 16)?;
        let filesz = u64_at(f, ph + 32)?;
        let memsz = u64_at(f, ph + 40)?;
        if filesz > memsz {
            return Err(ImageError::Malformed("segment p_filesz exceeds p_memsz"));
        }
        if memsz == 0 {
            continue;
        }
        let file_end = offset
            .checked_add(filesz)
            .filter(|&e| e <= f.len() as u64)
            .ok_or(ImageError::Malformed(
                "segment data lies past the end of the file",
            ))?;
        let end = vaddr.checked_add(memsz);
        if vaddr < PAYLOAD_ADDR || end.is_none_or(|e| e > limit) {
            return Err(ImageError::SegmentOutside {
                index: i,
                start: vaddr,
                end: end.unwrap_or(u64::MAX),
                min: PAYLOAD_ADDR,
                max: limit,
            });
        }
        segments.push((
            i,
            Segment {
                addr: vaddr,
                data: offset as usize..file_end as usize,
                mem_size: memsz,
                exec: flags & PF_X != 0,
            },
        ));
    }
    if segments.is_empty() {
        return Err(ImageError::NoSegments);
    }
    for (a, (ia, sa)) in segments.iter().enumerate() {
        for (ib, sb) in segments.iter().skip(a + 1) {
            if sa.addr < sb.addr + sb.mem_size && sb.addr < sa.addr + sa.mem_size {
                return Err(ImageError::SegmentsOverlap(*ia, *ib));
            }
        }
    }
    let segments: Vec<Segment> = segments.into_iter().map(|(_, s)| s).collect();
    if !segments
        .iter()
        .any(|s| s.exec && entry >= s.addr && entry < s.addr + s.mem_size)
    {
        return Err(ImageError::EntryOutside(entry));
    }
    Ok(PayloadImage {
        entry,
        segments,
        is_elf: true,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal static ELF with the given (vaddr, flags, data, memsz) segments.
    pub(crate) fn elf(entry: u64, segs: &[(u64, u32, &[u8], u64)]) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
        let mut data_off = 64 + 56 * segs.len();
        let mut blobs = Vec::new();
        for (vaddr, flags, data, memsz) in segs {
            let mut ph = vec![0u8; 56];
            ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
            ph[4..8].copy_from_slice(&flags.to_le_bytes());
            ph[8..16].copy_from_slice(&(data_off as u64).to_le_bytes());
            ph[16..24].copy_from_slice(&vaddr.to_le_bytes());
            ph[24..32].copy_from_slice(&vaddr.to_le_bytes());
            ph[32..40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            ph[40..48].copy_from_slice(&memsz.to_le_bytes());
            f.extend_from_slice(&ph);
            blobs.extend_from_slice(data);
            data_off += data.len();
        }
        f.extend_from_slice(&blobs);
        f
    }

    const LIMIT: u64 = 0x40_0000;

    #[test]
    fn image_flat_binary_loads_at_payload_addr() {
        let img = parse(&[0x90, 0xf4], LIMIT).unwrap();
        assert_eq!(img.entry, PAYLOAD_ADDR);
        assert_eq!(img.segments[0].data, 0..2);
        assert_eq!(img.end(), PAYLOAD_ADDR + 0x1000);
    }

    #[test]
    fn image_empty_and_oversized_rejected() {
        assert_eq!(parse(&[], LIMIT), Err(ImageError::Empty));
        let big = vec![0u8; (LIMIT - PAYLOAD_ADDR + 1) as usize];
        assert!(matches!(
            parse(&big, LIMIT),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn image_elf_segments_and_bss() {
        let f = elf(
            0x10_0010,
            &[
                (0x10_0000, 5, &[1, 2, 3], 0x20),
                (0x20_0000, 6, &[4], 0x3000),
            ],
        );
        let img = parse(&f, LIMIT).unwrap();
        assert!(img.is_elf);
        assert_eq!(img.segments.len(), 2);
        assert_eq!(&f[img.segments[0].data.clone()], &[1, 2, 3]);
        assert_eq!(img.segments[1].mem_size, 0x3000);
        assert_eq!(img.end(), 0x20_3000);
    }

    #[test]
    fn image_elf_outside_memory_rejected() {
        let low = elf(0x1000, &[(0x1000, 5, &[0xf4], 1)]);
        assert!(matches!(
            parse(&low, LIMIT),
            Err(ImageError::SegmentOutside { start: 0x1000, .. })
        ));
        let high = elf(LIMIT - 1, &[(LIMIT - 1, 5, &[0xf4], 2)]);
        assert!(matches!(
            parse(&high, LIMIT),
            Err(ImageError::SegmentOutside { .. })
        ));
        let wrap = elf(0x10_0000, &[(0x10_0000, 5, &[0xf4], u64::MAX)]);
        assert!(matches!(
            parse(&wrap, LIMIT),
            Err(ImageError::SegmentOutside { .. })
        ));
    }

    #[test]
    fn image_elf_bad_headers_rejected() {
        let good = elf(0x10_0000, &[(0x10_0000, 5, &[0xf4], 1)]);
        let mut f = good.clone();
        f[4] = 1;
        assert_eq!(
            parse(&f, LIMIT),
            Err(ImageError::WrongArch("not ELFCLASS64"))
        );
        let mut f = good.clone();
        f[16] = 3;
        assert_eq!(parse(&f, LIMIT), Err(ImageError::PositionIndependent));
        let mut f = good.clone();
        f[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(parse(&f, LIMIT), Err(ImageError::Malformed(_))));
        let mut f = good.clone();
        f.truncate(f.len() - 1); // segment data cut off
        assert!(matches!(parse(&f, LIMIT), Err(ImageError::Malformed(_))));
        let mut f = good.clone();
        f[64..68].copy_from_slice(&PT_INTERP.to_le_bytes());
        assert_eq!(parse(&f, LIMIT), Err(ImageError::Dynamic));
        assert!(matches!(
            parse(&good[..40], LIMIT),
            Err(ImageError::Malformed(_))
        ));
    }

    #[test]
    fn image_elf_entry_and_overlap_checked() {
        let f = elf(0x30_0000, &[(0x10_0000, 5, &[0xf4], 1)]);
        assert_eq!(parse(&f, LIMIT), Err(ImageError::EntryOutside(0x30_0000)));
        let nx = elf(0x10_0000, &[(0x10_0000, 6, &[0xf4], 1)]);
        assert_eq!(parse(&nx, LIMIT), Err(ImageError::EntryOutside(0x10_0000)));
        let f = elf(
            0x10_0000,
            &[(0x10_0000, 5, &[0xf4], 0x2000), (0x10_1000, 6, &[0], 1)],
        );
        assert_eq!(parse(&f, LIMIT), Err(ImageError::SegmentsOverlap(0, 1)));
    }
}
