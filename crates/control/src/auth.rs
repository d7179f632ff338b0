//! Tokens: the operator's (a file in the state directory) and each VM owner's (only its
//! SHA-256 is stored). A request carries one as `Authorization: Bearer <token>`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The operator token's file name in the state directory.
pub const OPERATOR_TOKEN_FILE: &str = "operator.token";
/// Shortest owner token a client may choose.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted.
pub const MAX_TOKEN_LEN: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read or create the operator token {path}")]
    OperatorToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness from the OS: {0}")]
    Random(String),
    #[error("the operator token file {0} is empty or malformed; delete it to get a new one")]
    Malformed(PathBuf),
}

/// `n` random bytes as hex.
pub fn random_hex(n: usize) -> Result<String, AuthError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| AuthError::Random(e.to_string()))?;
    Ok(hex(&buf))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// SHA-256 of a token, hex.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Whether a token has a sane shape (printable ASCII, bounded length).
pub fn token_well_formed(token: &str) -> bool {
    (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len())
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads the operator token, creating it (mode 0600, 32 random bytes as hex) on first start.
/// Returns its hash.
pub fn operator_token_hash(state_dir: &Path) -> Result<String, AuthError> {
    let path = state_dir.join(OPERATOR_TOKEN_FILE);
    let err = |source| AuthError::OperatorToken {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let t = text.trim();
            if !token_well_formed(t) {
                return Err(AuthError::Malformed(path));
            }
            Ok(token_hash(t))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = random_hex(32)?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.write_all(format!("{token}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(err)?;
            Ok(token_hash(&token))
        }
        Err(e) => Err(err(e)),
    }
}

/// The token of an `Authorization: Bearer` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let h = header?.trim();
    let (scheme, token) = h.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_header_parses_and_tokens_hash() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("Bearer ")), None);
        assert_eq!(bearer(None), None);
        assert_eq!(token_hash("abc").len(), 64);
        assert!(!token_well_formed("short"));
        assert!(token_well_formed(&"a".repeat(16)));
        assert!(!token_well_formed(&format!("{} x", "a".repeat(16))));
    }
}
