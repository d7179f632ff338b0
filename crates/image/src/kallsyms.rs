//! Kernel symbols from the kallsyms tables inside a `vmlinux`, for a `System.map`.
//!
//! Debian's kernel packages ship a placeholder `System.map` (one line pointing at the `-dbg`
//! package) and the `vmlinux` inside the bzImage has no `.symtab`. But a kernel built with
//! `CONFIG_KALLSYMS` carries its own compressed symbol table — what `/proc/kallsyms` prints —
//! which `scripts/kallsyms` writes into `.rodata` at link time. [`symbols`] decodes it and
//! [`system_map`] writes it out as a `System.map`.
//!
//! The tables, each aligned to 8 bytes on a 64-bit kernel:
//!
//! | table | what |
//! | --- | --- |
//! | `kallsyms_num_syms` | u32: the symbol count N; `kallsyms_names` is the next table |
//! | `kallsyms_names` | N entries: a length (one byte; two when the first has bit 7 set, 7 bits each, low bits first), then that many token numbers |
//! | `kallsyms_markers` | u32 per 256 symbols: where symbol 256·k starts in `kallsyms_names` (u64 in old kernels) |
//! | `kallsyms_token_table` | 256 NUL-terminated tokens; a name is its tokens end to end, and its first character is the `nm` type letter |
//! | `kallsyms_token_index` | 256 u16: where each token starts in the token table (0 first, ascending) |
//! | `kallsyms_offsets`, `kallsyms_relative_base` | N u32, then a u64 base: with `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` a non-negative offset is a per-CPU symbol's own address and a negative one means `base - 1 - offset`; without it every address is `base + offset` |
//!
//! Their order changed in 6.4 (names first, offsets after the token index) and 6.2 added
//! `kallsyms_seqs_of_names` (not needed here), so each table is found by its structure, never
//! by its position: a token index is 256 ascending u16 from 0, the token table is the 256
//! strings it describes, the names are the u32 count and the entries that decode with those
//! tokens and agree with the markers after them, and the offsets are the N u32 before a
//! kernel address that turn into sorted addresses starting at that address. Kernels without
//! `CONFIG_KALLSYMS_BASE_RELATIVE` (a `kallsyms_addresses` table, never on x86-64) are not
//! supported.
//!
//! The file may be damaged: every read is bounded, no count is trusted (names decode only as
//! far as the bytes hold them, and allocations follow what was decoded), and each failure
//! names the table and what to do.

use std::fmt::Write as _;

use crate::elf::{Elf, ElfError};

/// `scripts/kallsyms` aligns every table to 8 bytes on a 64-bit kernel (`ALGN`).
const ALIGN: usize = 8;
const TOKENS: usize = 256;
/// Symbols in one `kallsyms_markers` step.
const MARKER_STEP: usize = 256;
/// Fewer symbols than any kernel has (a tiny one has thousands): with fewer than two
/// markers, the markers could not confirm where the names start.
const MIN_SYMBOLS: u32 = MARKER_STEP as u32 + 1;
/// Far more symbols than any kernel has (Debian's 6.1 cloud kernel: about 100 000).
const MAX_SYMBOLS: u32 = 1 << 22;
/// `KSYM_NAME_LEN` of the newest kernels: no name, with its type letter, is longer.
const MAX_NAME: usize = 512;
/// Bound on all decoded names together (Debian's 6.1 cloud kernel: about 3 MiB).
const MAX_NAME_BYTES: usize = 64 << 20;
/// Names that must decode before a position counts as `kallsyms_names`.
const PROBE_NAMES: usize = 16;
/// Ascending entries from 0 after which a broken token index is reported as damaged rather
/// than as no index at all.
const INDEX_PROBE: usize = 64;
/// A token index of a real kernel has every unused byte value filled with a token; an index of
/// mostly empty tokens is some other table.
const MIN_TOKENS: usize = 128;
/// `nm` type letters a kallsyms table holds (it drops `U`, `u`, `N` and `n`).
const TYPE_LETTERS: &[u8] = b"ABCDGIRSTVWabcdgirstvw";
/// The lowest kernel (upper-half) address on x86-64.
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;

#[derive(Debug, thiserror::Error)]
pub enum KallsymsError {
    #[error("the vmlinux is not a readable kernel ELF")]
    Elf(#[source] ElfError),
    #[error(
        "the vmlinux has no kallsyms tables (a kernel built without CONFIG_KALLSYMS): use the System.map of the kernel's -dbg package, or build the kernel with CONFIG_KALLSYMS=y"
    )]
    NoTables,
    #[error(
        "kallsyms_token_index is not ascending at entry {entry}: the vmlinux is damaged; extract it from the bzImage again"
    )]
    TokenIndexNotAscending { entry: usize },
    #[error(
        "kallsyms_token_index has no kallsyms_token_table of 256 NUL-terminated tokens matching it: the vmlinux is damaged; extract it from the bzImage again"
    )]
    NoTokenTable,
    #[error(
        "kallsyms_token_table found, but no kallsyms_num_syms and kallsyms_names decode with it: the vmlinux is damaged; extract it from the bzImage again"
    )]
    NoNames,
    #[error(
        "symbol count {count} is implausible: kallsyms_names holds {names} names; the vmlinux is damaged"
    )]
    ImplausibleCount { count: u32, names: usize },
    #[error(
        "kallsyms_names runs past its section at symbol {symbol} of {count}: the vmlinux is truncated or kallsyms_num_syms is damaged"
    )]
    NamesPastSection { symbol: usize, count: u32 },
    #[error(
        "kallsyms name {symbol} does not decode to a type letter and a name of at most {} characters: the vmlinux is damaged", MAX_NAME - 1
    )]
    BadName { symbol: usize },
    #[error(
        "kallsyms names decode to more than {MAX_NAME_BYTES} bytes by symbol {symbol}: the vmlinux is damaged"
    )]
    NamesTooLarge { symbol: usize },
    #[error("kallsyms_markers runs past its section: the vmlinux is truncated")]
    MarkersPastSection,
    #[error(
        "kallsyms_markers entry {marker} says {found}, but symbol {symbol} starts at {expected} in kallsyms_names: the vmlinux is damaged"
    )]
    MarkerMismatch {
        marker: usize,
        symbol: usize,
        found: u64,
        expected: usize,
    },
    #[error(
        "no kallsyms_offsets and kallsyms_relative_base give {count} sorted addresses: the vmlinux is damaged, or its kernel was built without CONFIG_KALLSYMS_BASE_RELATIVE (absolute kallsyms_addresses are not supported)"
    )]
    NoAddresses { count: usize },
}

/// One kernel symbol at its link-time address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub addr: u64,
    /// The `nm` type letter (`T` global text, `d` local data, `A` a per-CPU symbol, ...).
    pub kind: char,
    pub name: String,
}

/// Every symbol of the kallsyms tables in `vmlinux` (an ELF kernel), sorted by address
/// (symbols at one address keep the kernel's order).
pub fn symbols(vmlinux: &[u8]) -> Result<Vec<Symbol>, KallsymsError> {
    let elf = Elf::parse(vmlinux).map_err(KallsymsError::Elf)?;
    // `scripts/kallsyms` puts the tables in .rodata; a file without section headers is
    // searched whole.
    let data = elf
        .section(".rodata")
        .map_err(KallsymsError::Elf)?
        .unwrap_or(vmlinux);
    let tokens = find_tokens(data)?;
    let names = find_names(data, &tokens)?;
    let addrs = find_addresses(data, names.len())?;
    let mut symbols: Vec<Symbol> = names
        .into_iter()
        .zip(addrs)
        .map(|((kind, name), addr)| Symbol { addr, kind, name })
        .collect();
    symbols.sort_by_key(|s| s.addr);
    Ok(symbols)
}

/// `symbols` as a `System.map`: `%016x %c %s` per line, sorted by address.
pub fn system_map(symbols: &[Symbol]) -> String {
    let mut sorted: Vec<&Symbol> = symbols.iter().collect();
    sorted.sort_by_key(|s| s.addr);
    let mut out = String::with_capacity(symbols.len().saturating_mul(40));
    for s in sorted {
        let _ = writeln!(out, "{:016x} {} {}", s.addr, s.kind, s.name);
    }
    out
}

/// Whether `map` (a `System.map`, or its first part) names at least one real symbol. Debian's
/// kernel packages ship a placeholder that does not: the single line
/// `ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package`.
pub fn map_has_symbols(map: &[u8]) -> bool {
    map.split(|&b| b == b'\n').any(|line| {
        let line = String::from_utf8_lossy(line);
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next(), fields.next(), fields.next()) {
            (Some(addr), Some(kind), Some(_), None) => {
                kind.len() == 1 && u64::from_str_radix(addr, 16).is_ok_and(|a| a != u64::MAX)
            }
            _ => false,
        }
    })
}

/// The failure of the candidate that got furthest, reported when no candidate fits.
#[derive(Default)]
struct Furthest(Option<(usize, KallsymsError)>);

impl Furthest {
    fn note(&mut self, progress: usize, error: KallsymsError) {
        if self.0.as_ref().is_none_or(|(p, _)| progress > *p) {
            self.0 = Some((progress, error));
        }
    }

    fn or(self, none_found: KallsymsError) -> KallsymsError {
        self.0.map_or(none_found, |(_, e)| e)
    }
}

/// The 256 tokens of `kallsyms_token_table`.
struct Tokens<'a>([&'a [u8]; TOKENS]);

fn find_tokens(data: &[u8]) -> Result<Tokens<'_>, KallsymsError> {
    let mut furthest = Furthest::default();
    for at in (0..data.len()).step_by(ALIGN) {
        let index = match token_index(data, at) {
            Ok(index) => index,
            Err(Some(entry)) => {
                furthest.note(entry, KallsymsError::TokenIndexNotAscending { entry });
                continue;
            }
            Err(None) => continue,
        };
        let table = (0..data.len())
            .step_by(ALIGN)
            .find_map(|t| token_table(data, t, &index));
        match table {
            Some(tokens) => return Ok(tokens),
            None => furthest.note(TOKENS, KallsymsError::NoTokenTable),
        }
    }
    Err(furthest.or(KallsymsError::NoTables))
}

/// The 256 u16 at `at` if they can be a `kallsyms_token_index`: 0, then strictly ascending
/// (every token ends in a NUL), mostly in steps of two or more (few empty tokens). The error
/// is the entry that breaks the order when at least [`INDEX_PROBE`] entries ascended before it
/// (a damaged index), `None` when this is no index at all.
fn token_index(data: &[u8], at: usize) -> Result<[u16; TOKENS], Option<usize>> {
    if u16_at(data, at) != Some(0) {
        return Err(None);
    }
    let mut index = [0u16; TOKENS];
    let mut non_empty = 0;
    for i in 1..TOKENS {
        let Some(entry) = at.checked_add(2 * i).and_then(|p| u16_at(data, p)) else {
            return Err(None);
        };
        if entry <= index[i - 1] {
            return Err((i >= INDEX_PROBE).then_some(i));
        }
        if entry - index[i - 1] >= 2 {
            non_empty += 1;
        }
        index[i] = entry;
    }
    // The last token's length is not in the index; count it as non-empty.
    if non_empty + 1 < MIN_TOKENS {
        return Err(None);
    }
    Ok(index)
}

/// The tokens at `at` if they are the 256 NUL-terminated strings `index` describes, each made
/// of printable ASCII.
fn token_table<'a>(data: &'a [u8], at: usize, index: &[u16; TOKENS]) -> Option<Tokens<'a>> {
    let table = data.get(at..)?;
    let mut tokens = [&[][..]; TOKENS];
    for (i, token) in tokens.iter_mut().enumerate() {
        let start = usize::from(index[i]);
        let end = match index.get(i + 1) {
            Some(&next) => usize::from(next) - 1,
            None => {
                let rest = table.get(start..)?;
                start + rest.iter().take(MAX_NAME).position(|&b| b == 0)?
            }
        };
        if table.get(end) != Some(&0) {
            return None;
        }
        let t = table.get(start..end)?;
        if !t.iter().all(u8::is_ascii_graphic) {
            return None;
        }
        *token = t;
    }
    Some(Tokens(tokens))
}

/// Finds `kallsyms_names`, checks `kallsyms_num_syms` before it and `kallsyms_markers` after
/// it, and decodes every name into its type letter and name.
///
/// The names are found without trusting the count: a candidate is a position, 8 bytes after a
/// u32, where names decode; its run is every name that decodes from there (the table ends at
/// the zero of the padding or the first marker after it), and the markers after the run must
/// say where every 256th name of it starts. A position before the table can decode a bogus
/// name or two and run on into the real ones, but then its names start elsewhere.
fn find_names(data: &[u8], tokens: &Tokens) -> Result<Vec<(char, String)>, KallsymsError> {
    let mut runs = Runs::new(data, tokens);
    let mut failures = Vec::new();
    for at in (0..data.len()).step_by(ALIGN) {
        let (Some(count), Some(start)) = (u32_at(data, at), at.checked_add(ALIGN)) else {
            break;
        };
        if !probe_names(data.get(start..).unwrap_or_default(), tokens, count) {
            continue;
        }
        let run = runs.from(start);
        let markers = check_markers(data, tokens, start, run);
        if markers.is_ok() && count >= MIN_SYMBOLS && usize::try_from(count) == Ok(run.names) {
            return decode_names(data, tokens, start, run.names);
        }
        failures.push(NamesFailure {
            count,
            start,
            run,
            markers,
        });
    }
    // Nothing fits: report what is wrong with the candidate most likely the real table.
    let mut longest: std::collections::HashMap<usize, usize> = std::collections::HashMap::new();
    for f in &failures {
        let l = longest.entry(f.run.end).or_default();
        *l = (*l).max(f.run.names);
    }
    failures
        .into_iter()
        .max_by_key(|f| f.rank(&longest))
        .map_or(Err(KallsymsError::NoNames), |f| Err(f.error(data)))
}

/// A run of names: how many decode from a position, and where the first that does not (or the
/// end of the data) is.
#[derive(Clone, Copy, Debug)]
struct Run {
    names: usize,
    end: usize,
}

/// Runs of names from many positions. Runs from positions in one table meet, so each entry is
/// decoded once (a memo by position), which keeps trying every candidate linear.
struct Runs<'a> {
    data: &'a [u8],
    tokens: &'a Tokens<'a>,
    memo: std::collections::HashMap<usize, Run>,
    buf: Vec<u8>,
}

impl<'a> Runs<'a> {
    fn new(data: &'a [u8], tokens: &'a Tokens<'a>) -> Self {
        Self {
            data,
            tokens,
            memo: std::collections::HashMap::new(),
            buf: Vec::new(),
        }
    }

    fn from(&mut self, start: usize) -> Run {
        let mut path = Vec::new();
        let mut at = start;
        let mut run = loop {
            if let Some(&run) = self.memo.get(&at) {
                break run;
            }
            match valid_entry(self.data, at, self.tokens, &mut self.buf) {
                Some(next) if path.len() < MAX_SYMBOLS as usize => {
                    path.push(at);
                    at = next;
                }
                _ => break Run { names: 0, end: at },
            }
        };
        for &p in path.iter().rev() {
            run.names += 1;
            self.memo.insert(p, run);
        }
        run
    }
}

/// Where the entry after the one at `at` starts, if the one at `at` decodes into a type letter
/// and a name.
fn valid_entry(data: &[u8], at: usize, tokens: &Tokens, buf: &mut Vec<u8>) -> Option<usize> {
    let (codes, next) = entry(data, at)?;
    (expand(codes, tokens, buf) && buf[0].is_ascii_alphabetic()).then_some(next)
}

/// A candidate for `kallsyms_names` that did not fit.
struct NamesFailure {
    /// Its `kallsyms_num_syms`.
    count: u32,
    start: usize,
    run: Run,
    /// Whether the markers after its run agree with it.
    markers: Result<(), KallsymsError>,
}

impl NamesFailure {
    /// Markers that agree with more than one step of names: this is the table.
    fn confirmed(&self) -> bool {
        self.markers.is_ok() && self.run.names >= MIN_SYMBOLS as usize
    }

    fn plausible_count(&self) -> bool {
        (MIN_SYMBOLS..=MAX_SYMBOLS).contains(&self.count)
    }

    /// How likely this is the real table, damaged: confirmed by its markers (only the count is
    /// wrong); then a plausible count; then the most names in its chain (`longest` by where
    /// runs end: runs from one table end together); then the last start in that chain (a bogus
    /// name or two before the table can lead into it; positions inside it have no plausible
    /// count before them, since they follow name bytes).
    fn rank(
        &self,
        longest: &std::collections::HashMap<usize, usize>,
    ) -> (bool, bool, usize, usize) {
        let chain = longest.get(&self.run.end).copied().unwrap_or_default();
        (self.confirmed(), self.plausible_count(), chain, self.start)
    }

    /// What is wrong with it, as the real table.
    fn error(self, data: &[u8]) -> KallsymsError {
        let (count, run) = (self.count, self.run.names);
        let bad_count = KallsymsError::ImplausibleCount { count, names: run };
        if self.confirmed() {
            return bad_count;
        }
        if entry(data, self.run.end).is_none() {
            return KallsymsError::NamesPastSection { symbol: run, count };
        }
        if !self.plausible_count() {
            return bad_count;
        }
        match (count as usize).cmp(&run) {
            // The table stops early, at a name that does not decode (a zero length too).
            std::cmp::Ordering::Greater => KallsymsError::BadName { symbol: run },
            std::cmp::Ordering::Equal => self.markers.err().unwrap_or(bad_count),
            std::cmp::Ordering::Less => bad_count,
        }
    }
}

/// Whether `names` starts with entries that decode into a type letter and a name: the first
/// [`PROBE_NAMES`] of them, or all `count` when there are fewer. (Every position of `.rodata`
/// is probed, so this only adds up token lengths.)
fn probe_names(names: &[u8], tokens: &Tokens, count: u32) -> bool {
    let probe = usize::try_from(count).map_or(PROBE_NAMES, |c| c.clamp(1, PROBE_NAMES));
    let mut at = 0;
    for _ in 0..probe {
        let Some((codes, next)) = entry(names, at) else {
            return false;
        };
        let mut len = 0;
        let mut kind = None;
        for &code in codes {
            let token = tokens.0[usize::from(code)];
            kind = kind.or(token.first().copied());
            len += token.len();
            if len > MAX_NAME {
                return false;
            }
        }
        if len < 2 || !kind.is_some_and(|k| TYPE_LETTERS.contains(&k)) {
            return false;
        }
        at = next;
    }
    true
}

/// Decodes the `n` names at `start` (a run checked by [`Runs`]).
fn decode_names(
    data: &[u8],
    tokens: &Tokens,
    start: usize,
    n: usize,
) -> Result<Vec<(char, String)>, KallsymsError> {
    // Allocations follow what was decoded, never a count.
    let mut decoded = Vec::new();
    let mut total = 0usize;
    let mut buf = Vec::new();
    let mut at = start;
    for symbol in 0..n {
        let Some(next) = valid_entry(data, at, tokens, &mut buf) else {
            return Err(KallsymsError::BadName { symbol });
        };
        total += buf.len();
        if total > MAX_NAME_BYTES {
            return Err(KallsymsError::NamesTooLarge { symbol });
        }
        let name = buf[1..].iter().map(|&b| char::from(b)).collect();
        decoded.push((char::from(buf[0]), name));
        at = next;
    }
    Ok(decoded)
}

/// The token numbers of the `kallsyms_names` entry at `at`, and where the next entry starts;
/// `None` when the entry runs past the end.
fn entry(names: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let first = *names.get(at)?;
    let (len, body) = if first & 0x80 == 0 {
        (usize::from(first), at.checked_add(1)?)
    } else {
        let second = *names.get(at.checked_add(1)?)?;
        (
            usize::from(first & 0x7f) | (usize::from(second) << 7),
            at.checked_add(2)?,
        )
    };
    let end = body.checked_add(len)?;
    Some((names.get(body..end)?, end))
}

/// Expands token numbers into `out`: false unless it makes a type and a name (at least two
/// characters) of at most [`MAX_NAME`].
fn expand(codes: &[u8], tokens: &Tokens, out: &mut Vec<u8>) -> bool {
    out.clear();
    for &code in codes {
        let token = tokens.0[usize::from(code)];
        if out.len() + token.len() > MAX_NAME {
            return false;
        }
        out.extend_from_slice(token);
    }
    out.len() >= 2
}

/// Checks the `kallsyms_markers` after `run` (the names from `start`): entry k must say where
/// name 256·k starts, as u32 and, failing that, as the u64 entries of old kernels. A run of at
/// most 256 names has one marker, 0, which says nothing: [`find_names`] wants more names.
fn check_markers(
    data: &[u8],
    tokens: &Tokens,
    start: usize,
    run: Run,
) -> Result<(), KallsymsError> {
    let at = align_up(run.end).ok_or(KallsymsError::MarkersPastSection)?;
    let mut first_failure = None;
    let mut buf = Vec::new();
    for width in [4, 8] {
        let marker = |k: usize| {
            let p = k.checked_mul(width)?.checked_add(at)?;
            match width {
                4 => u32_at(data, p).map(u64::from),
                _ => u64_at(data, p),
            }
        };
        let mut name_at = start;
        let mut failure = None;
        for symbol in 0..run.names {
            if symbol % MARKER_STEP == 0 {
                let k = symbol / MARKER_STEP;
                let expected = name_at - start;
                match marker(k) {
                    None => failure = Some(KallsymsError::MarkersPastSection),
                    Some(found) if found != expected as u64 => {
                        failure = Some(KallsymsError::MarkerMismatch {
                            marker: k,
                            symbol,
                            found,
                            expected,
                        });
                    }
                    Some(_) => {}
                }
                if failure.is_some() {
                    break;
                }
            }
            match valid_entry(data, name_at, tokens, &mut buf) {
                Some(next) => name_at = next,
                None => break,
            }
        }
        match failure {
            None => return Ok(()),
            Some(f) => {
                first_failure.get_or_insert(f);
            }
        }
    }
    Err(first_failure.unwrap_or(KallsymsError::MarkersPastSection))
}

/// Finds `kallsyms_offsets` (`count` u32) and the `kallsyms_relative_base` after it, and
/// returns every symbol's address in table order.
fn find_addresses(data: &[u8], count: usize) -> Result<Vec<u64>, KallsymsError> {
    let not_found = KallsymsError::NoAddresses { count };
    let Some(table_len) = count.checked_mul(4).and_then(align_up) else {
        return Err(not_found);
    };
    for base_at in (table_len..data.len()).step_by(ALIGN) {
        let Some(base) = u64_at(data, base_at) else {
            break;
        };
        if base < KERNEL_HALF {
            continue;
        }
        let offsets_at = base_at - table_len;
        let Some(offsets) = data.get(offsets_at..offsets_at + 4 * count) else {
            continue;
        };
        let offsets = Offsets { raw: offsets, base };
        if let Some(encoding) = offsets.check() {
            return Ok((0..count).map(|i| offsets.addr(encoding, i)).collect());
        }
    }
    Err(not_found)
}

/// How `kallsyms_offsets` encode addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encoding {
    /// Every address is `base + offset`.
    Relative,
    /// `CONFIG_KALLSYMS_ABSOLUTE_PERCPU`: a non-negative offset is a per-CPU symbol's own
    /// address; a negative one means `base - 1 - offset`.
    AbsolutePercpu,
}

/// A candidate `kallsyms_offsets` table and the relative base after it.
struct Offsets<'a> {
    raw: &'a [u8],
    base: u64,
}

impl Offsets<'_> {
    fn len(&self) -> usize {
        self.raw.len() / 4
    }

    fn offset(&self, i: usize) -> u32 {
        u32_at(self.raw, 4 * i).unwrap_or_default()
    }

    fn addr(&self, encoding: Encoding, i: usize) -> u64 {
        let offset = self.offset(i);
        match encoding {
            Encoding::Relative => self.base.wrapping_add(u64::from(offset)),
            Encoding::AbsolutePercpu => match i32::from_ne_bytes(offset.to_ne_bytes()) {
                o if o >= 0 => u64::from(offset),
                // base - 1 - o, with o negative: base - 1 + |o|.
                o => self
                    .base
                    .wrapping_sub(1)
                    .wrapping_add(u64::from(o.unsigned_abs())),
            },
        }
    }

    /// The encoding under which these offsets are a kallsyms table: the first non-per-CPU
    /// symbol sits at the base (`scripts/kallsyms` takes the lowest such address), addresses
    /// never decrease, and at least a quarter of them are distinct (runs of zeros are not a
    /// table).
    fn check(&self) -> Option<Encoding> {
        let n = self.len();
        let last = self.offset(n.checked_sub(1)?);
        // With absolute per-CPU symbols, the highest symbol is a relative one: negative.
        let encoding = if last >= 0x8000_0000 {
            Encoding::AbsolutePercpu
        } else {
            Encoding::Relative
        };
        if encoding == Encoding::Relative && (self.offset(0) != 0 || (n > 1 && last == 0)) {
            return None;
        }
        let mut at_base = encoding == Encoding::Relative;
        let mut repeats = 0;
        let mut prev = self.addr(encoding, 0);
        for i in 0..n {
            let offset = self.offset(i);
            if encoding == Encoding::AbsolutePercpu && !at_base && offset >= 0x8000_0000 {
                // The first relative symbol: offset -1, at the base itself.
                if offset != u32::MAX {
                    return None;
                }
                at_base = true;
            }
            let addr = self.addr(encoding, i);
            if i > 0 {
                if addr < prev {
                    return None;
                }
                if addr == prev {
                    repeats += 1;
                    if repeats > n - n.div_ceil(4) {
                        return None;
                    }
                }
            }
            prev = addr;
        }
        Some(encoding)
    }
}

fn align_up(n: usize) -> Option<usize> {
    Some(n.checked_add(ALIGN - 1)? & !(ALIGN - 1))
}

fn bytes_at<const N: usize>(data: &[u8], at: usize) -> Option<[u8; N]> {
    data.get(at..at.checked_add(N)?)?.try_into().ok()
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    bytes_at(data, at).map(u16::from_le_bytes)
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    bytes_at(data, at).map(u32::from_le_bytes)
}

fn u64_at(data: &[u8], at: usize) -> Option<u64> {
    bytes_at(data, at).map(u64::from_le_bytes)
}

/// Test helper: kallsyms tables as `scripts/kallsyms` lays them out, inside some unrelated
/// `.rodata`, with where each table starts (for damaging them).
#[cfg(test)]
pub(crate) mod synthetic {
    use super::{ALIGN, MARKER_STEP, TOKENS};

    /// The table order of one kernel generation.
    #[derive(Clone, Copy, Debug)]
    pub enum Order {
        /// 6.1: offsets, relative base, count, names, markers, token table, token index.
        V6_1,
        /// 6.4+: count, names, markers, token table, token index, offsets, relative base,
        /// `kallsyms_seqs_of_names`.
        V6_4,
        /// No kernel's: the token tables and the addresses before the names, which end the
        /// section (to show that nothing depends on the order).
        TokensFirst,
    }

    /// Where the tables start in [`Tables::rodata`].
    #[derive(Debug, Default)]
    pub struct Tables {
        pub rodata: Vec<u8>,
        pub num_syms: usize,
        pub names: usize,
        pub markers: usize,
        pub token_table: usize,
        pub token_index: usize,
        pub offsets: usize,
        pub relative_base: usize,
        /// The end of the last table [`super::symbols`] needs.
        pub end: usize,
    }

    /// Pairs of characters that become tokens (the rest of the unused byte values get
    /// fillers, as a real kernel's table has every slot full).
    const PAIRS: &[&str] = &[
        "__", "_s", "in", "er", "t_", "ta", "st", "sy", "nc", "ex", "ys",
    ];

    fn pad(v: &mut Vec<u8>) {
        v.resize(v.len().next_multiple_of(ALIGN), 0);
    }

    /// Tables for `symbols` (address, type, name; sorted by address). With `percpu`, symbols
    /// below 4 GiB are per-CPU (absolute); otherwise every address is relative to the first.
    pub fn tables(symbols: &[(u64, char, String)], percpu: bool, order: Order) -> Tables {
        // Token table: used characters stand for themselves, pairs and fillers elsewhere.
        let mut slots: Vec<Vec<u8>> = vec![Vec::new(); TOKENS];
        for (_, kind, name) in symbols {
            for b in std::iter::once(*kind as u8).chain(name.bytes()) {
                slots[usize::from(b)] = vec![b];
            }
        }
        let mut pairs = PAIRS.iter();
        let mut filler = 0u8;
        let mut pair_code = Vec::new();
        for code in (0..TOKENS).rev() {
            if slots[code].is_empty() {
                if let Some(p) = pairs.next() {
                    slots[code] = p.as_bytes().to_vec();
                    pair_code.push((p.as_bytes(), code as u8));
                } else {
                    slots[code] = vec![b'~', b'0' + filler % 64];
                    filler += 1;
                }
            }
        }
        let encode = |s: &[u8]| {
            let mut out = Vec::new();
            let mut i = 0;
            while i < s.len() {
                match pair_code.iter().find(|(p, _)| s[i..].starts_with(p)) {
                    Some((p, code)) => {
                        out.push(*code);
                        i += p.len();
                    }
                    None => {
                        out.push(s[i]);
                        i += 1;
                    }
                }
            }
            out
        };
        let mut token_table = Vec::new();
        let mut token_index = Vec::new();
        for slot in &slots {
            token_index.extend_from_slice(&(token_table.len() as u16).to_le_bytes());
            token_table.extend_from_slice(slot);
            token_table.push(0);
        }

        let mut names = Vec::new();
        let mut markers = Vec::new();
        for (i, (_, kind, name)) in symbols.iter().enumerate() {
            if i % MARKER_STEP == 0 {
                markers.extend_from_slice(&(names.len() as u32).to_le_bytes());
            }
            let mut full = vec![*kind as u8];
            full.extend_from_slice(name.as_bytes());
            let codes = encode(&full);
            if codes.len() <= 0x7f {
                names.push(codes.len() as u8);
            } else {
                names.push((codes.len() & 0x7f) as u8 | 0x80);
                names.push((codes.len() >> 7) as u8);
            }
            names.extend_from_slice(&codes);
        }

        let is_percpu = |a: u64| percpu && a < 1 << 32;
        let base = symbols
            .iter()
            .map(|s| s.0)
            .find(|&a| !is_percpu(a))
            .unwrap();
        let mut offsets = Vec::new();
        for &(addr, _, _) in symbols {
            let o = if is_percpu(addr) {
                addr as u32
            } else if percpu {
                (base as i64 - addr as i64 - 1) as i32 as u32
            } else {
                (addr - base) as u32
            };
            offsets.extend_from_slice(&o.to_le_bytes());
        }

        // Unrelated .rodata around the tables: zeros, pointers, text.
        let mut t = Tables::default();
        let v = &mut t.rodata;
        v.extend_from_slice(&[0; 40]);
        for p in [0xffff_ffff_8100_0000u64, 0xffff_ffff_8200_1234, 0] {
            v.extend_from_slice(&p.to_le_bytes());
        }
        v.extend_from_slice(b"some string\0");
        pad(v);
        let put = |v: &mut Vec<u8>, what: &[u8]| {
            pad(v);
            let at = v.len();
            v.extend_from_slice(what);
            at
        };
        let count = (symbols.len() as u32).to_le_bytes();
        let seqs = vec![0x5a; 3 * symbols.len()];
        match order {
            Order::V6_1 => {
                t.offsets = put(v, &offsets);
                t.relative_base = put(v, &base.to_le_bytes());
                t.num_syms = put(v, &count);
                t.names = put(v, &names);
                t.markers = put(v, &markers);
                t.token_table = put(v, &token_table);
                t.token_index = put(v, &token_index);
                t.end = v.len();
            }
            Order::V6_4 => {
                t.num_syms = put(v, &count);
                t.names = put(v, &names);
                t.markers = put(v, &markers);
                t.token_table = put(v, &token_table);
                t.token_index = put(v, &token_index);
                t.offsets = put(v, &offsets);
                t.relative_base = put(v, &base.to_le_bytes());
                t.end = v.len();
                put(v, &seqs);
            }
            Order::TokensFirst => {
                t.token_index = put(v, &token_index);
                t.token_table = put(v, &token_table);
                t.offsets = put(v, &offsets);
                t.relative_base = put(v, &base.to_le_bytes());
                t.num_syms = put(v, &count);
                t.names = put(v, &names);
                t.markers = put(v, &markers);
                t.end = v.len();
                return t;
            }
        }
        v.extend_from_slice(&[0xff; 24]);
        t
    }

    /// About 600 symbols (three markers): per-CPU ones at small addresses (type `A`, only
    /// with `percpu`), text, data, aliases at one address, and a name long enough to need a
    /// two-byte length.
    pub fn kernel_symbols(percpu: bool) -> Vec<(u64, char, String)> {
        let mut s = Vec::new();
        if percpu {
            s.push((0, 'A', "fixed_percpu_data".to_owned()));
            s.push((0, 'A', "__per_cpu_start".to_owned()));
            s.push((0x1000, 'A', "cpu_number".to_owned()));
        }
        let text = 0xffff_ffff_8100_0000u64;
        s.push((text, 'T', "_text".to_owned()));
        s.push((text, 'T', "startup_64".to_owned()));
        for i in 0..500u64 {
            let kind = if i % 3 == 0 { 't' } else { 'T' };
            s.push((text + 0x100 + i * 0x40, kind, format!("func_{i}_sync_task")));
        }
        let long = format!("_RNvXs_{}", "Q9".repeat(150));
        s.push((text + 0x10_0000, 'T', long));
        s.push((text + 0x20_0000, 'T', "entry_SYSCALL_64".to_owned()));
        s.push((text + 0x30_0000, 'T', "_etext".to_owned()));
        let data = 0xffff_ffff_8200_0000u64;
        for i in 0..100u64 {
            s.push((data + i * 8, 'd', format!("data_{i}")));
        }
        s.push((data + 0x1000, 'D', "init_task".to_owned()));
        s.push((data + 0x2000, 'R', "sys_call_table".to_owned()));
        s
    }

    /// `rodata` as the `.rodata` of a small ELF.
    pub fn elf(rodata: Vec<u8>) -> Vec<u8> {
        crate::elf::synthetic_elf(2, &[(".rodata", 1, rodata)], false)
    }
}

#[cfg(test)]
mod tests {
    use super::synthetic::{Order, Tables, elf, kernel_symbols, tables};
    use super::*;

    fn expected(percpu: bool) -> Vec<Symbol> {
        kernel_symbols(percpu)
            .into_iter()
            .map(|(addr, kind, name)| Symbol { addr, kind, name })
            .collect()
    }

    fn decode(t: &Tables) -> Result<Vec<Symbol>, KallsymsError> {
        symbols(&elf(t.rodata.clone()))
    }

    /// How many symbols [`kernel_symbols`] makes.
    fn count(percpu: bool) -> u32 {
        kernel_symbols(percpu).len() as u32
    }

    fn put_u32(rodata: &mut [u8], at: usize, v: u32) {
        rodata[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn kallsyms_every_layout_and_encoding_decodes_to_the_symbols() {
        for order in [Order::V6_1, Order::V6_4, Order::TokensFirst] {
            for percpu in [true, false] {
                let t = tables(&kernel_symbols(percpu), percpu, order);
                let got = decode(&t).unwrap_or_else(|e| panic!("{order:?} {percpu}: {e}"));
                assert_eq!(got, expected(percpu), "{order:?} percpu={percpu}");
            }
        }
    }

    #[test]
    fn kallsyms_names_with_two_byte_lengths_decode() {
        let t = tables(&kernel_symbols(true), true, Order::V6_1);
        let long = decode(&t)
            .unwrap()
            .into_iter()
            .find(|s| s.name.starts_with("_RNvXs_"))
            .unwrap();
        assert_eq!(long.name.len(), 307);
        assert_eq!(long.kind, 'T');
    }

    #[test]
    fn kallsyms_system_map_is_sorted_nm_format() {
        let syms = vec![
            Symbol {
                addr: 0xffff_ffff_8100_0040,
                kind: 'T',
                name: "b".into(),
            },
            Symbol {
                addr: 0,
                kind: 'A',
                name: "fixed_percpu_data".into(),
            },
            Symbol {
                addr: 0xffff_ffff_8100_0000,
                kind: 't',
                name: "a".into(),
            },
        ];
        assert_eq!(
            system_map(&syms),
            "0000000000000000 A fixed_percpu_data\n\
             ffffffff81000000 t a\n\
             ffffffff81000040 T b\n"
        );
        assert!(map_has_symbols(system_map(&syms).as_bytes()));
    }

    #[test]
    fn kallsyms_debian_placeholder_map_has_no_symbols() {
        let placeholder =
            b"ffffffffffffffff B The real System.map is in the linux-image-<version>-dbg package\n";
        assert!(!map_has_symbols(placeholder));
        assert!(!map_has_symbols(b""));
        assert!(!map_has_symbols(b"\x7fELF\x02\x01"));
        assert!(map_has_symbols(b"ffffffff81000000 T _text\n"));
    }

    #[test]
    fn kallsyms_random_bytes_are_no_tables() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut random = vec![0u8; 64 << 10];
        for b in &mut random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert!(matches!(symbols(&random), Err(KallsymsError::Elf(_))));
        assert!(matches!(
            symbols(&elf(random)),
            Err(KallsymsError::NoTables)
        ));
        assert!(matches!(
            symbols(&elf(vec![0; 4096])),
            Err(KallsymsError::NoTables)
        ));
    }

    #[test]
    fn kallsyms_truncated_tables_fail_cleanly() {
        for order in [Order::V6_1, Order::V6_4, Order::TokensFirst] {
            let t = tables(&kernel_symbols(true), true, order);
            for len in (0..t.end).step_by(97).chain([t.end - 1]) {
                let r = symbols(&elf(t.rodata[..len].to_vec()));
                assert!(r.is_err(), "{order:?} cut at {len} decoded");
            }
        }
        // Cut inside the offsets: the names decode, the addresses are gone.
        let t = tables(&kernel_symbols(true), true, Order::V6_4);
        let cut = t.rodata[..t.offsets + 100].to_vec();
        assert!(matches!(
            symbols(&elf(cut)),
            Err(KallsymsError::NoAddresses { .. })
        ));
        // Names that end the section, cut.
        let t = tables(&kernel_symbols(true), true, Order::TokensFirst);
        let cut = t.rodata[..t.names + 1000].to_vec();
        let e = symbols(&elf(cut)).unwrap_err();
        assert!(
            matches!(e, KallsymsError::NamesPastSection { count: c, .. } if c == count(true)),
            "{e}"
        );
        assert!(e.to_string().contains("runs past its section"), "{e}");
    }

    #[test]
    fn kallsyms_token_index_not_ascending_is_named() {
        let mut t = tables(&kernel_symbols(true), true, Order::V6_1);
        let at = t.token_index + 2 * 100;
        t.rodata.swap(at, at + 2);
        t.rodata.swap(at + 1, at + 3);
        let e = decode(&t).unwrap_err();
        assert!(
            matches!(e, KallsymsError::TokenIndexNotAscending { entry: 101 }),
            "{e}"
        );
    }

    #[test]
    fn kallsyms_token_table_damaged_is_named() {
        let mut t = tables(&kernel_symbols(true), true, Order::V6_4);
        t.rodata[t.token_table + 1] = 0;
        assert!(matches!(decode(&t), Err(KallsymsError::NoTokenTable)));
    }

    #[test]
    fn kallsyms_count_larger_than_the_data_is_implausible() {
        let real = count(true);
        for order in [Order::V6_1, Order::V6_4] {
            for bad in [u32::MAX, 0x00ff_ffff, real * 50, 0, real + 1, real - 1, 1] {
                let mut t = tables(&kernel_symbols(true), true, order);
                put_u32(&mut t.rodata, t.num_syms, bad);
                let e = decode(&t).unwrap_err();
                assert!(
                    matches!(
                        e,
                        KallsymsError::ImplausibleCount { count, names } if count == bad && names == real as usize
                    ),
                    "{order:?} {bad}: {e}"
                );
                assert!(e.to_string().contains("is implausible"), "{e}");
            }
        }
    }

    #[test]
    fn kallsyms_name_with_an_unknown_token_is_a_bad_name() {
        let mut t = tables(&kernel_symbols(true), true, Order::V6_4);
        // A name's first token becomes a filler token ("~0"): no type letter.
        let filler = (0..=255u8)
            .find(|&c| {
                let at = t.token_table
                    + usize::from(u16::from_le_bytes(
                        t.rodata[t.token_index + 2 * usize::from(c)..][..2]
                            .try_into()
                            .unwrap(),
                    ));
                t.rodata[at] == b'~'
            })
            .unwrap();
        // Name 100 (past the first names, which must decode for the table to be recognised).
        let mut at = t.names;
        for _ in 0..100 {
            at += 1 + usize::from(t.rodata[at]);
        }
        t.rodata[at + 1] = filler;
        let e = decode(&t).unwrap_err();
        assert!(matches!(e, KallsymsError::BadName { symbol: 100 }), "{e}");
    }

    #[test]
    fn kallsyms_markers_disagreeing_with_the_names_are_named() {
        let mut t = tables(&kernel_symbols(true), true, Order::V6_4);
        let at = t.markers + 4;
        put_u32(&mut t.rodata, at, 12345);
        let e = decode(&t).unwrap_err();
        assert!(
            matches!(
                e,
                KallsymsError::MarkerMismatch {
                    marker: 1,
                    symbol: 256,
                    found: 12345,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn kallsyms_unsorted_offsets_are_no_addresses() {
        for percpu in [true, false] {
            let mut t = tables(&kernel_symbols(percpu), percpu, Order::V6_1);
            let at = t.offsets + 4 * 200;
            t.rodata.copy_within(at + 4..at + 8, at);
            put_u32(&mut t.rodata, at + 4, 0x0bad_0000);
            assert!(
                matches!(decode(&t), Err(KallsymsError::NoAddresses { count }) if count == kernel_symbols(percpu).len()),
                "percpu={percpu}"
            );
        }
    }

    #[test]
    fn kallsyms_flipped_bytes_never_panic() {
        let t = tables(&kernel_symbols(true), true, Order::V6_4);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let mut rodata = t.rodata.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = (x >> 8) as usize % rodata.len();
                rodata[at] ^= x as u8 | 1;
            }
            let _ = symbols(&elf(rodata));
        }
    }
}
