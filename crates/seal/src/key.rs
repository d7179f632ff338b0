//! [`OwnerKey`]: the VM owner's 32-byte key, which wraps every sealed file's data key.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::SealError;

/// Length of an owner key in bytes.
pub const OWNER_KEY_LEN: usize = 32;
/// Length of an owner key in hex text.
const HEX_LEN: usize = 2 * OWNER_KEY_LEN;

/// The VM owner's key. Zeroized on drop; `Debug` does not show it.
pub struct OwnerKey(Zeroizing<[u8; OWNER_KEY_LEN]>);

impl OwnerKey {
    /// Uses `bytes` as the key.
    pub fn from_bytes(bytes: [u8; OWNER_KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// A new random key from the operating system's generator.
    pub fn generate() -> Result<Self, SealError> {
        let mut key = Self(Zeroizing::new([0; OWNER_KEY_LEN]));
        getrandom::fill(key.0.as_mut_slice()).map_err(SealError::Random)?;
        Ok(key)
    }

    /// Parses exactly 64 hex characters (either case, nothing else).
    pub fn from_hex(text: &str) -> Result<Self, SealError> {
        parse_hex(text.as_bytes()).map_err(|reason| SealError::BadKeyText { reason })
    }

    /// The key as 64 lowercase hex characters, zeroized when dropped.
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(HEX_LEN));
        for byte in self.0.iter() {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
        text
    }

    /// Reads a key file: 64 hex characters, optionally followed by one `\n`.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        let content =
            Zeroizing::new(
                std::fs::read(path).map_err(|source| SealError::KeyFileRead {
                    path: path.to_path_buf(),
                    source,
                })?,
            );
        let text = content.strip_suffix(b"\n").unwrap_or(&content);
        parse_hex(text).map_err(|reason| SealError::KeyFileText {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Writes the key to a new file (64 hex characters and a newline) readable only by its
    /// owner (mode 0600). Refuses to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let write_error = |source| SealError::KeyFileWrite {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(write_error)?;
        let mut text = self.to_hex();
        text.push('\n');
        file.write_all(text.as_bytes()).map_err(write_error)?;
        file.sync_all().map_err(write_error)
    }

    /// The raw key bytes, for the key wrap.
    pub(crate) fn bytes(&self) -> &[u8; OWNER_KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OwnerKey(<redacted>)")
    }
}

/// Parses 64 hex digits; the error says what is wrong without echoing the text.
fn parse_hex(text: &[u8]) -> Result<OwnerKey, String> {
    if text.len() != HEX_LEN {
        return Err(format!(
            "expected {HEX_LEN} hex characters, found {}",
            text.len()
        ));
    }
    let digit = |at: usize| match text[at] {
        c @ b'0'..=b'9' => Ok(c - b'0'),
        c @ b'a'..=b'f' => Ok(c - b'a' + 10),
        c @ b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err(format!("character {} is not a hex digit", at + 1)),
    };
    let mut key = OwnerKey(Zeroizing::new([0; OWNER_KEY_LEN]));
    for (i, byte) in key.0.iter_mut().enumerate() {
        *byte = digit(2 * i)? << 4 | digit(2 * i + 1)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn from_hex_valid_text_round_trips() {
        let key = OwnerKey::from_hex(HEX).unwrap();
        let expected: [u8; 32] = std::array::from_fn(|i| i as u8);
        assert_eq!(key.bytes(), &expected);
        assert_eq!(*key.to_hex(), HEX);
        let upper = OwnerKey::from_hex(&HEX.to_uppercase()).unwrap();
        assert_eq!(upper.bytes(), &expected);
    }

    #[test]
    fn from_hex_wrong_length_is_refused() {
        for text in [&HEX[..63], &format!("{HEX}0"), "", &format!("{HEX}\n")] {
            match OwnerKey::from_hex(text) {
                Err(SealError::BadKeyText { reason }) => assert!(reason.contains("found")),
                other => panic!("{text:?}: expected BadKeyText, got {other:?}"),
            }
        }
    }

    #[test]
    fn from_hex_non_hex_character_is_refused_without_echoing_it() {
        let mut text = HEX.to_string();
        text.replace_range(10..11, "g");
        let error = OwnerKey::from_hex(&text).unwrap_err().to_string();
        assert!(error.contains("character 11"), "{error}");
        assert!(!error.contains(&text), "{error}");
        assert!(OwnerKey::from_hex(&HEX.replace('0', "+")).is_err());
        assert!(OwnerKey::from_hex(&format!(" {}", &HEX[1..])).is_err());
    }

    #[test]
    fn generate_gives_distinct_keys() {
        let a = OwnerKey::generate().unwrap();
        let b = OwnerKey::generate().unwrap();
        assert_ne!(a.bytes(), b.bytes());
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let key = OwnerKey::from_hex(HEX).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "OwnerKey(<redacted>)");
    }
}
