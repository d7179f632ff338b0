//! The compressions Linux uses for its kernel payload and its modules, decoded in pure Rust.
//!
//! Supported: gzip (`flate2` on `miniz_oxide`), xz with the x86 BCJ filter the kernel build adds
//! (`lzma-rust2`), zstd (`ruzstd`) and LZ4 in the *legacy* frame format that the kernel's `lz4c
//! -l` produces (`lz4_flex` block API). bzip2, lzma and lzo are recognised and refused by name.
//! Every decoder stops at a size limit, so a corrupt or hostile input cannot exhaust memory.

use std::io::Read;

/// LZ4 legacy frame: `[magic][u32 LE csize][block]...`, every block decompressing to ≤ 8 MiB.
const LZ4_LEGACY_MAGIC: u32 = 0x184C_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    Lz4Legacy,
    Bzip2,
    Lzma,
    Lzo,
}

impl Compression {
    /// Recognises the format by its magic bytes.
    pub fn detect(data: &[u8]) -> Option<Self> {
        let starts = |m: &[u8]| data.starts_with(m);
        Some(if starts(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if starts(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            Self::Xz
        } else if starts(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else if starts(&LZ4_LEGACY_MAGIC.to_le_bytes()) {
            Self::Lz4Legacy
        } else if starts(b"BZh") {
            Self::Bzip2
        } else if starts(&[0x5d, 0, 0]) {
            Self::Lzma
        } else if starts(&[0x89, b'L', b'Z', b'O']) {
            Self::Lzo
        } else {
            return None;
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Xz => "xz",
            Self::Zstd => "zstd",
            Self::Lz4Legacy => "lz4 (legacy frame)",
            Self::Bzip2 => "bzip2",
            Self::Lzma => "lzma",
            Self::Lzo => "lzo",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecompressError {
    #[error("unknown compression (magic {magic:02x?}): expected gzip, xz, zstd or legacy lz4")]
    Unknown { magic: Vec<u8> },
    #[error(
        "{0} is not supported by bulwark: use a kernel built with gzip, xz, zstd or lz4 (Debian's are)"
    )]
    Unsupported(Compression),
    #[error("corrupt {format} data: {detail}")]
    Corrupt { format: Compression, detail: String },
    #[error(
        "{format} data decompresses to more than {limit} bytes; refusing (corrupt or not a kernel)"
    )]
    TooLarge { format: Compression, limit: usize },
}

/// Decompresses `data`, whose format is detected from its magic, to at most `limit` bytes.
pub fn decompress(data: &[u8], limit: usize) -> Result<(Compression, Vec<u8>), DecompressError> {
    let format = Compression::detect(data).ok_or_else(|| DecompressError::Unknown {
        magic: data.iter().take(6).copied().collect(),
    })?;
    decompress_as(format, data, limit).map(|out| (format, out))
}

/// Decompresses `data` as `format` to at most `limit` bytes.
pub fn decompress_as(
    format: Compression,
    data: &[u8],
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let corrupt = |detail: String| DecompressError::Corrupt { format, detail };
    match format {
        Compression::Gzip => read_limited(format, flate2::read::GzDecoder::new(data), limit),
        Compression::Xz => read_limited(format, lzma_rust2::XzReader::new(data, true), limit),
        Compression::Zstd => {
            let dec = ruzstd::decoding::StreamingDecoder::new(data)
                .map_err(|e| corrupt(e.to_string()))?;
            read_limited(format, dec, limit)
        }
        Compression::Lz4Legacy => lz4_legacy(data, limit),
        Compression::Bzip2 | Compression::Lzma | Compression::Lzo => {
            Err(DecompressError::Unsupported(format))
        }
    }
}

fn read_limited(
    format: Compression,
    reader: impl Read,
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::new();
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| DecompressError::Corrupt {
            format,
            detail: e.to_string(),
        })?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { format, limit });
    }
    Ok(out)
}

/// The legacy LZ4 frame as the kernel's `unlz4` reads it: the magic, then blocks each preceded by
/// its compressed size; the magic may repeat between blocks (concatenated frames), and 4 or fewer
/// trailing bytes end the stream (x86 bzImages append the decompressed size there).
fn lz4_legacy(data: &[u8], limit: usize) -> Result<Vec<u8>, DecompressError> {
    let format = Compression::Lz4Legacy;
    let corrupt = |detail: String| DecompressError::Corrupt { format, detail };
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    let mut pos = 0usize;
    while data.len() - pos > 4 {
        let word = u32::from_le_bytes(read4(data, pos));
        pos += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        let csize = word as usize;
        let src = data.get(pos..pos + csize).ok_or_else(|| {
            corrupt(format!(
                "block at byte {} says {csize} bytes but only {} remain",
                pos - 4,
                data.len() - pos
            ))
        })?;
        let n = lz4_flex::block::decompress_into(src, &mut block)
            .map_err(|e| corrupt(format!("block at byte {}: {e}", pos - 4)))?;
        if out.len() + n > limit {
            return Err(DecompressError::TooLarge { format, limit });
        }
        out.extend_from_slice(&block[..n]);
        pos += csize;
    }
    if out.is_empty() {
        return Err(corrupt("no blocks".into()));
    }
    Ok(out)
}

fn read4(data: &[u8], pos: usize) -> [u8; 4] {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[pos..pos + 4]);
    b
}

/// Test helper: compresses like `lz4c -l` (legacy frame, 8 MiB blocks).
#[cfg(test)]
pub(crate) fn lz4_legacy_compress(data: &[u8]) -> Vec<u8> {
    let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
        let c = lz4_flex::block::compress(chunk);
        out.extend_from_slice(&(c.len() as u32).to_le_bytes());
        out.extend_from_slice(&c);
    }
    out
}

#[cfg(test)]
pub(crate) fn gzip_compress(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i * 7 % 251) as u8 ^ (i >> 12) as u8)
            .collect()
    }

    #[test]
    fn decompress_lz4_legacy_multi_block_with_trailing_size() {
        let data = sample(LZ4_LEGACY_BLOCK + 12345);
        let mut c = lz4_legacy_compress(&data);
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let (fmt, out) = decompress(&c, 64 << 20).unwrap();
        assert_eq!(fmt, Compression::Lz4Legacy);
        assert_eq!(out, data);
    }

    #[test]
    fn decompress_lz4_legacy_truncated_block_is_corrupt() {
        let c = lz4_legacy_compress(&sample(100_000));
        let r = decompress(&c[..c.len() - 10], 1 << 20);
        assert!(matches!(r, Err(DecompressError::Corrupt { .. })), "{r:?}");
    }

    #[test]
    fn decompress_gzip_xz_zstd_round_trip() {
        let data = sample(300_000);
        let (f, out) = decompress(&gzip_compress(&data), 1 << 20).unwrap();
        assert_eq!((f, out == data), (Compression::Gzip, true));

        let mut xz = Vec::new();
        {
            use std::io::Write;
            let mut opts = lzma_rust2::XzOptions::with_preset(1);
            opts.filters
                .insert(0, lzma_rust2::FilterConfig::new_bcj_x86(0));
            let mut w = lzma_rust2::XzWriter::new(&mut xz, opts).unwrap();
            w.write_all(&data).unwrap();
            w.finish().unwrap();
        }
        let (f, out) = decompress(&xz, 1 << 20).unwrap();
        assert_eq!((f, out == data), (Compression::Xz, true));

        let zst = ruzstd::encoding::compress_to_vec(
            &data[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let (f, out) = decompress(&zst, 1 << 20).unwrap();
        assert_eq!((f, out == data), (Compression::Zstd, true));
    }

    #[test]
    fn decompress_over_limit_is_refused() {
        let data = sample(10_000);
        assert!(matches!(
            decompress(&gzip_compress(&data), 9_999),
            Err(DecompressError::TooLarge { .. })
        ));
        assert!(matches!(
            decompress(&lz4_legacy_compress(&data), 9_999),
            Err(DecompressError::TooLarge { .. })
        ));
    }

    #[test]
    fn decompress_unknown_and_unsupported_formats_are_named() {
        assert!(matches!(
            decompress(b"hello world", 100),
            Err(DecompressError::Unknown { .. })
        ));
        let e = decompress(b"BZh91AY&SY", 100).unwrap_err();
        assert!(e.to_string().contains("bzip2"), "{e}");
    }
}
