//! Values parsed once at the edge, so that the rest of the node never sees
//! an invalid AE title, UID or blob hash.

use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error(
        "AE title {0:?} is empty, longer than 16 characters, or has a backslash or control character"
    )]
    AeTitle(String),
    /// The value is kept for the caller, never shown: a UID names a
    /// patient's study, and error messages reach clients and logs.
    #[error("a UID must be 1 to 64 characters of digits and dots")]
    Uid(String),
    #[error("blob hash {0:?} is not 64 lowercase hexadecimal digits")]
    BlobHash(String),
}

/// An application entity title (PS3.5 Table 6.2-1, VR AE): up to 16
/// characters of the default repertoire, no backslash, no control characters.
/// Leading and trailing spaces are not significant and are removed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AeTitle(String);

impl AeTitle {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let trimmed = raw.trim_matches(|c: char| c == ' ' || c == '\0');
        let valid = !trimmed.is_empty()
            && trimmed.len() <= 16
            && trimmed
                .chars()
                .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '\\');
        if valid {
            Ok(AeTitle(trimmed.to_string()))
        } else {
            Err(ParseError::AeTitle(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AeTitle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DICOM UID (PS3.5 §9.1): digits and dots, at most 64 characters.
/// Trailing NUL padding from the wire is removed.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Uid(String);

impl Uid {
    pub fn parse(raw: &str) -> Result<Self, ParseError> {
        let trimmed = raw.trim_end_matches(['\0', ' ']).trim_start_matches(' ');
        let valid = !trimmed.is_empty()
            && trimmed.len() <= 64
            && trimmed.chars().all(|c| c.is_ascii_digit() || c == '.')
            && !trimmed.starts_with('.')
            && !trimmed.ends_with('.')
            && !trimmed.contains("..");
        if valid {
            Ok(Uid(trimmed.to_string()))
        } else {
            Err(ParseError::Uid(raw.to_string()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The BLAKE3 hash of a stored Part-10 object: the object's key in the blob
/// store. It is always computed by the node, never taken from the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobHash([u8; 32]);

impl BlobHash {
    pub fn from_hash(hash: blake3::Hash) -> Self {
        BlobHash(*hash.as_bytes())
    }

    pub fn parse(hex_str: &str) -> Result<Self, ParseError> {
        if hex_str.len() != 64 || hex_str.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(ParseError::BlobHash(hex_str.to_string()));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_str, &mut bytes)
            .map_err(|_| ParseError::BlobHash(hex_str.to_string()))?;
        Ok(BlobHash(bytes))
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ae_titles() {
        let cases: &[(&str, Option<&str>)] = &[
            ("HUREN", Some("HUREN")),
            ("  STORESCU  ", Some("STORESCU")),
            ("ANY-SCP\0\0", Some("ANY-SCP")),
            ("SIXTEEN_CHARS_AE", Some("SIXTEEN_CHARS_AE")),
            ("SEVENTEEN_CHARS_A", None),
            ("", None),
            ("    ", None),
            ("BACK\\SLASH", None),
            ("TAB\tAE", None),
            ("医院", None),
        ];
        for (raw, expected) in cases {
            let parsed = AeTitle::parse(raw).ok();
            assert_eq!(parsed.as_ref().map(AeTitle::as_str), *expected, "{raw:?}");
        }
    }

    #[test]
    fn uids() {
        let cases: &[(&str, Option<&str>)] = &[
            ("1.2.840.10008.1.1", Some("1.2.840.10008.1.1")),
            ("1.2.840.10008.1.2\0", Some("1.2.840.10008.1.2")),
            ("1.2.3 ", Some("1.2.3")),
            ("", None),
            ("1..2", None),
            (".1.2", None),
            ("1.2.", None),
            ("1.2.a", None),
            ("../../etc/passwd", None),
            (
                "1.2.3456789012345678901234567890123456789012345678901234567890123",
                None,
            ),
        ];
        for (raw, expected) in cases {
            let parsed = Uid::parse(raw).ok();
            assert_eq!(parsed.as_ref().map(Uid::as_str), *expected, "{raw:?}");
        }
    }

    #[test]
    fn blob_hash_round_trip() {
        let hash = BlobHash::from_hash(blake3::hash(b"huren"));
        assert_eq!(BlobHash::parse(&hash.to_hex()), Ok(hash));
        assert!(BlobHash::parse("abc").is_err());
        assert!(BlobHash::parse(&hash.to_hex().to_uppercase()).is_err());
        assert!(BlobHash::parse(&"zz".repeat(32)).is_err());
    }
}
