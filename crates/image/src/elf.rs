//! Just enough ELF64 (little-endian) to check a kernel `vmlinux` (its PVH entry note), read a
//! module's `.modinfo`, and tell whether an executable is statically linked.

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit physical entry point for PVH boot.
pub const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOTE: u32 = 7;
const EM_X86_64: u16 = 62;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    #[error("unsupported ELF: {0}; expected a 64-bit little-endian x86-64 file")]
    Unsupported(&'static str),
    #[error("corrupt ELF: {0}")]
    Corrupt(&'static str),
}

/// A section or segment: file offset and size.
#[derive(Clone, Copy, Debug)]
struct Span {
    offset: usize,
    size: usize,
}

/// An ELF note.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note<'a> {
    pub name: &'a [u8],
    pub kind: u32,
    pub desc: &'a [u8],
}

/// A parsed ELF64 LE file.
#[derive(Debug)]
pub struct Elf<'a> {
    data: &'a [u8],
    /// `e_type`: 1 relocatable (modules), 2 executable, 3 shared/PIE.
    pub file_type: u16,
    pub entry: u64,
    segments: Vec<(u32, Span)>,
    sections: Vec<(String, u32, Span)>,
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if !data.starts_with(b"\x7fELF") {
            return Err(ElfError::NotElf);
        }
        if data.len() < 64 {
            return Err(ElfError::Corrupt("shorter than the ELF header"));
        }
        if data[4] != 2 {
            return Err(ElfError::Unsupported("not 64-bit"));
        }
        if data[5] != 1 {
            return Err(ElfError::Unsupported("not little-endian"));
        }
        let r = Reader(data);
        if r.u16(18)? != EM_X86_64 {
            return Err(ElfError::Unsupported("machine is not x86-64"));
        }
        let file_type = r.u16(16)?;
        let entry = r.u64(24)?;
        let phoff = r.u64(32)? as usize;
        let shoff = r.u64(40)? as usize;
        let phentsize = r.u16(54)? as usize;
        let phnum = r.u16(56)? as usize;
        let shentsize = r.u16(58)? as usize;
        let shnum = r.u16(60)? as usize;
        let shstrndx = r.u16(62)? as usize;

        let mut segments = Vec::with_capacity(phnum);
        if phnum > 0 && phentsize < 56 {
            return Err(ElfError::Corrupt("program header entries too small"));
        }
        for i in 0..phnum {
            let h = phoff.saturating_add(i * phentsize);
            let span = Span {
                offset: r.u64(h + 8)? as usize,
                size: r.u64(h + 32)? as usize,
            };
            segments.push((r.u32(h)?, span));
        }

        let mut raw = Vec::with_capacity(shnum);
        if shnum > 0 && shentsize < 64 {
            return Err(ElfError::Corrupt("section header entries too small"));
        }
        for i in 0..shnum {
            let h = shoff.saturating_add(i * shentsize);
            let span = Span {
                offset: r.u64(h + 24)? as usize,
                size: r.u64(h + 32)? as usize,
            };
            raw.push((r.u32(h)?, r.u32(h + 4)?, span));
        }
        let strtab = match raw.get(shstrndx) {
            Some(&(_, _, span)) if shnum > 0 => Some(slice(data, span)?),
            _ => None,
        };
        let mut sections = Vec::with_capacity(raw.len());
        for (name_off, kind, span) in raw {
            let name = strtab
                .and_then(|t| t.get(name_off as usize..))
                .and_then(|t| t.split(|&b| b == 0).next())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .unwrap_or_default();
            sections.push((name, kind, span));
        }
        Ok(Self {
            data,
            file_type,
            entry,
            segments,
            sections,
        })
    }

    /// The contents of the first section called `name`.
    pub fn section(&self, name: &str) -> Result<Option<&'a [u8]>, ElfError> {
        match self.sections.iter().find(|(n, _, _)| n == name) {
            Some(&(_, _, span)) => slice(self.data, span).map(Some),
            None => Ok(None),
        }
    }

    /// Whether the file asks for a dynamic loader (has `PT_INTERP`).
    pub fn is_dynamic(&self) -> bool {
        self.segments.iter().any(|&(t, _)| t == PT_INTERP)
    }

    /// All notes, from `PT_NOTE` segments, or from `SHT_NOTE` sections when there are none.
    pub fn notes(&self) -> Result<Vec<Note<'a>>, ElfError> {
        let mut spans: Vec<Span> = self
            .segments
            .iter()
            .filter(|(t, _)| *t == PT_NOTE)
            .map(|&(_, s)| s)
            .collect();
        if spans.is_empty() {
            spans = self
                .sections
                .iter()
                .filter(|(_, k, _)| *k == SHT_NOTE)
                .map(|&(_, _, s)| s)
                .collect();
        }
        let mut notes = Vec::new();
        for span in spans {
            parse_notes(slice(self.data, span)?, &mut notes)?;
        }
        Ok(notes)
    }

    /// The PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY` in a "Xen" note), if the kernel has one.
    pub fn pvh_entry(&self) -> Result<Option<u64>, ElfError> {
        Ok(self.notes()?.into_iter().find_map(|n| {
            if n.name != b"Xen" || n.kind != XEN_ELFNOTE_PHYS32_ENTRY {
                return None;
            }
            match n.desc.len() {
                4 => Some(u32::from_le_bytes(n.desc.try_into().ok()?) as u64),
                8 => Some(u64::from_le_bytes(n.desc.try_into().ok()?)),
                _ => None,
            }
        }))
    }
}

fn parse_notes<'a>(mut data: &'a [u8], out: &mut Vec<Note<'a>>) -> Result<(), ElfError> {
    let align = |n: usize| (n + 3) & !3;
    while data.len() >= 12 {
        let r = Reader(data);
        let namesz = r.u32(0)? as usize;
        let descsz = r.u32(4)? as usize;
        let kind = r.u32(8)?;
        let name_end = 12 + namesz;
        let desc_start = align(name_end);
        let desc_end = desc_start + descsz;
        if desc_end > data.len() {
            return Err(ElfError::Corrupt("note runs past its section"));
        }
        let name = &data[12..name_end];
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        out.push(Note {
            name,
            kind,
            desc: &data[desc_start..desc_end],
        });
        data = &data[align(desc_end).min(data.len())..];
    }
    Ok(())
}

fn slice(data: &[u8], span: Span) -> Result<&[u8], ElfError> {
    span.offset
        .checked_add(span.size)
        .and_then(|end| data.get(span.offset..end))
        .ok_or(ElfError::Corrupt("section or segment outside the file"))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&self, at: usize) -> Result<[u8; N], ElfError> {
        at.checked_add(N)
            .and_then(|end| self.0.get(at..end))
            .and_then(|s| s.try_into().ok())
            .ok_or(ElfError::Corrupt("header field outside the file"))
    }
    fn u16(&self, at: usize) -> Result<u16, ElfError> {
        self.bytes(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: usize) -> Result<u32, ElfError> {
        self.bytes(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: usize) -> Result<u64, ElfError> {
        self.bytes(at).map(u64::from_le_bytes)
    }
}

/// Test helper: builds a small ELF64 with the given sections (name, type, contents) and, when
/// `note_segment` is set, one `PT_NOTE` segment covering the first section.
#[cfg(test)]
pub(crate) fn synthetic_elf(
    file_type: u16,
    sections: &[(&str, u32, Vec<u8>)],
    note_segment: bool,
) -> Vec<u8> {
    let mut shstrtab = vec![0u8];
    let mut names = Vec::new();
    for (n, _, _) in sections.iter().chain([&(".shstrtab", 3, Vec::new())]) {
        names.push(shstrtab.len() as u32);
        shstrtab.extend_from_slice(n.as_bytes());
        shstrtab.push(0);
    }
    let phnum = usize::from(note_segment);
    let mut data = vec![0u8; 64 + 56 * phnum];
    let mut spans = Vec::new();
    for (_, _, body) in sections {
        spans.push((data.len(), body.len()));
        data.extend_from_slice(body);
        data.resize((data.len() + 7) & !7, 0);
    }
    spans.push((data.len(), shstrtab.len()));
    data.extend_from_slice(&shstrtab);
    data.resize((data.len() + 7) & !7, 0);
    let shoff = data.len();
    let kinds: Vec<u32> = sections.iter().map(|s| s.1).chain([3]).collect();
    data.extend_from_slice(&[0u8; 64]); // section 0: SHN_UNDEF
    for (i, &(off, size)) in spans.iter().enumerate() {
        let mut sh = [0u8; 64];
        sh[0..4].copy_from_slice(&names[i].to_le_bytes());
        sh[4..8].copy_from_slice(&kinds[i].to_le_bytes());
        sh[24..32].copy_from_slice(&(off as u64).to_le_bytes());
        sh[32..40].copy_from_slice(&(size as u64).to_le_bytes());
        data.extend_from_slice(&sh);
    }
    data[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    data[16..18].copy_from_slice(&file_type.to_le_bytes());
    data[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
    data[32..40].copy_from_slice(&64u64.to_le_bytes());
    data[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
    data[54..56].copy_from_slice(&56u16.to_le_bytes());
    data[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
    data[58..60].copy_from_slice(&64u16.to_le_bytes());
    data[60..62].copy_from_slice(&(spans.len() as u16 + 1).to_le_bytes());
    data[62..64].copy_from_slice(&(spans.len() as u16).to_le_bytes());
    if note_segment {
        let (off, size) = spans[0];
        data[64..68].copy_from_slice(&PT_NOTE.to_le_bytes());
        data[72..80].copy_from_slice(&(off as u64).to_le_bytes());
        data[96..104].copy_from_slice(&(size as u64).to_le_bytes());
    }
    data
}

/// Test helper: an ELF note.
#[cfg(test)]
pub(crate) fn note(name: &str, kind: u32, desc: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32 + 1).to_le_bytes());
    v.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    v.extend_from_slice(&kind.to_le_bytes());
    v.extend_from_slice(name.as_bytes());
    v.push(0);
    v.resize((v.len() + 3) & !3, 0);
    v.extend_from_slice(desc);
    v.resize((v.len() + 3) & !3, 0);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_pvh_note_found_in_note_segment() {
        let mut notes = note("GNU", 3, &[1, 2, 3, 4]);
        notes.extend(note(
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0abcu64.to_le_bytes(),
        ));
        let data = synthetic_elf(2, &[(".notes", SHT_NOTE, notes)], true);
        let elf = Elf::parse(&data).unwrap();
        assert_eq!(elf.notes().unwrap().len(), 2);
        assert_eq!(elf.pvh_entry().unwrap(), Some(0x0100_0abc));
        assert!(!elf.is_dynamic());
    }

    #[test]
    fn elf_pvh_note_found_in_sections_without_segments() {
        let n = note(
            "Xen",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0200_0000u32.to_le_bytes(),
        );
        let data = synthetic_elf(2, &[(".note.Xen", SHT_NOTE, n)], false);
        assert_eq!(
            Elf::parse(&data).unwrap().pvh_entry().unwrap(),
            Some(0x0200_0000)
        );
    }

    #[test]
    fn elf_without_pvh_note_reports_none() {
        let data = synthetic_elf(2, &[(".notes", SHT_NOTE, note("GNU", 3, &[0; 4]))], true);
        assert_eq!(Elf::parse(&data).unwrap().pvh_entry().unwrap(), None);
    }

    #[test]
    fn elf_section_by_name() {
        let data = synthetic_elf(1, &[(".modinfo", 1, b"name=x\0".to_vec())], false);
        let elf = Elf::parse(&data).unwrap();
        assert_eq!(elf.section(".modinfo").unwrap(), Some(&b"name=x\0"[..]));
        assert_eq!(elf.section(".nope").unwrap(), None);
        assert_eq!(elf.file_type, 1);
    }

    #[test]
    fn elf_garbage_is_rejected_without_panicking() {
        assert!(matches!(Elf::parse(b"MZ\x90\0"), Err(ElfError::NotElf)));
        assert!(matches!(
            Elf::parse(b"\x7fELF\x02"),
            Err(ElfError::Corrupt(_))
        ));
        let mut data = synthetic_elf(2, &[(".a", 1, vec![1; 8])], false);
        data[4] = 1;
        assert!(matches!(Elf::parse(&data), Err(ElfError::Unsupported(_))));
        // Every truncation either parses or fails cleanly.
        let data = synthetic_elf(2, &[(".notes", SHT_NOTE, note("Xen", 18, &[0; 8]))], true);
        for len in 0..data.len() {
            if let Ok(elf) = Elf::parse(&data[..len]) {
                let _ = elf.notes();
            }
        }
        // Section offsets pointing past the end are corrupt, not a panic.
        let mut data = synthetic_elf(2, &[(".a", 1, vec![1; 8])], false);
        let shoff = u64::from_le_bytes(data[40..48].try_into().unwrap()) as usize;
        data[shoff + 64 + 24..shoff + 64 + 32].copy_from_slice(&u64::MAX.to_le_bytes());
        let r = Elf::parse(&data).and_then(|e| e.section(".a"));
        assert!(r.is_err());
    }
}
