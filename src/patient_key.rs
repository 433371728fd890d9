//! Patient keys: the only patient identity the registry ever sees.
//!
//! A patient key is a keyed BLAKE3 hash of the normalised cross-enterprise
//! identifier, prefixed by its document type (`RID:11010519491231002X`).
//! The key is the region's secret, which every node holds and the registry
//! does not: the registry can group a patient's records across hospitals,
//! but cannot turn a key back into an identity, and nobody without the
//! secret can test a guessed ID number against it.
//!
//! The national cross-domain master patient index keys on the resident ID
//! number (身份证号, GB 11643), with other documents as supplements
//! (recognition-facts.md, "Identity, consent, privacy").

use std::fmt;

/// Kinds of cross-enterprise identifier. The code is part of the hashed
/// string, so the same number under two document types is two patients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IdentifierType {
    /// 居民身份证号码: 18 characters, GB 11643 check digit.
    #[serde(rename = "RID")]
    ResidentId,
    /// 护照.
    #[serde(rename = "PASSPORT")]
    Passport,
    /// 港澳居民来往内地通行证.
    #[serde(rename = "HKMO")]
    HongKongMacaoPermit,
    /// 台湾居民居住证 / 来往大陆通行证.
    #[serde(rename = "TW")]
    TaiwanPermit,
    /// 军官证 and other military documents.
    #[serde(rename = "MILITARY")]
    Military,
}

impl IdentifierType {
    pub fn code(self) -> &'static str {
        match self {
            IdentifierType::ResidentId => "RID",
            IdentifierType::Passport => "PASSPORT",
            IdentifierType::HongKongMacaoPermit => "HKMO",
            IdentifierType::TaiwanPermit => "TW",
            IdentifierType::Military => "MILITARY",
        }
    }

    pub fn parse(code: &str) -> Option<IdentifierType> {
        Some(match code.trim().to_ascii_uppercase().as_str() {
            "RID" => IdentifierType::ResidentId,
            "PASSPORT" => IdentifierType::Passport,
            "HKMO" => IdentifierType::HongKongMacaoPermit,
            "TW" => IdentifierType::TaiwanPermit,
            "MILITARY" => IdentifierType::Military,
            _ => return None,
        })
    }
}

/// Why an identifier cannot key a patient. Shown to the operator (with the
/// study, never the number) so the hospital can fix its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidIdentifier {
    #[error("no cross-enterprise identifier")]
    Missing,
    #[error("resident ID number is not 17 digits and a check character")]
    ResidentIdFormat,
    #[error("resident ID number check digit is wrong (GB 11643)")]
    ResidentIdCheckDigit,
    #[error("document number has characters other than letters, digits and '-'")]
    DocumentFormat,
    /// The study's PatientBirthDate or PatientSex contradicts what the
    /// resident ID number encodes: the mapping (or the header) names
    /// another person, and publishing would put this exam on that person's
    /// record.
    #[error("the study's birth date or sex contradicts the resident ID number")]
    DemographicsMismatch,
}

impl InvalidIdentifier {
    /// The short reason code the node's API reports.
    pub fn code(self) -> &'static str {
        match self {
            InvalidIdentifier::Missing => "no_identifier",
            InvalidIdentifier::ResidentIdFormat => "identifier_format",
            InvalidIdentifier::ResidentIdCheckDigit => "check_digit",
            InvalidIdentifier::DocumentFormat => "identifier_format",
            InvalidIdentifier::DemographicsMismatch => "demographics_mismatch",
        }
    }
}

/// A validated, normalised cross-enterprise identifier.
#[derive(Clone, PartialEq, Eq)]
pub struct Identifier {
    kind: IdentifierType,
    number: String,
}

/// Never print the number: identifiers end up in error messages and logs.
impl fmt::Debug for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identifier({}:…)", self.kind.code())
    }
}

impl Identifier {
    /// Validates and normalises: surrounding blanks dropped, letters upper
    /// case (a lower-case `x` check character is common in hospital
    /// systems), full-width digits and letters folded to ASCII.
    pub fn parse(kind: IdentifierType, raw: &str) -> Result<Identifier, InvalidIdentifier> {
        let number: String = raw
            .trim()
            .chars()
            .map(|c| match c {
                // Full-width forms (U+FF10..) from Chinese input methods.
                '０'..='９' | 'Ａ'..='Ｚ' | 'ａ'..='ｚ' => {
                    char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)
                }
                c => c,
            })
            .collect::<String>()
            .to_ascii_uppercase();
        if number.is_empty() {
            return Err(InvalidIdentifier::Missing);
        }
        match kind {
            IdentifierType::ResidentId => check_resident_id(&number)?,
            _ => {
                if !number
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    || number.len() > 64
                {
                    return Err(InvalidIdentifier::DocumentFormat);
                }
            }
        }
        Ok(Identifier { kind, number })
    }

    pub fn kind(&self) -> IdentifierType {
        self.kind
    }

    /// Whether a study's PatientBirthDate (DA, YYYYMMDD) and PatientSex
    /// (M/F) can be this identifier's person: a resident ID number encodes
    /// both (GB 11643: the birth date in digits 7-14, the sex in digit 17,
    /// odd for male). Empty or unreadable values, other sexes (O) and other
    /// documents say nothing against it.
    pub fn agrees_with(&self, birth_date: &str, sex: &str) -> bool {
        if self.kind != IdentifierType::ResidentId {
            return true;
        }
        let n = self.number.as_bytes();
        let birth = birth_date.trim();
        let birth_ok = birth.len() != 8
            || !birth.bytes().all(|b| b.is_ascii_digit())
            || birth.as_bytes() == &n[6..14];
        let sex_ok = match sex.trim().to_ascii_uppercase().as_str() {
            "M" => !(n[16] - b'0').is_multiple_of(2),
            "F" => (n[16] - b'0').is_multiple_of(2),
            _ => true,
        };
        birth_ok && sex_ok
    }

    /// The normalised number, for the node's own storage (never for the
    /// registry).
    pub fn number(&self) -> &str {
        &self.number
    }
}

/// GB 11643-1999: 17 digits, then a check character: the digits weighted
/// by 2^(17-i) mod 11, summed mod 11, mapped through "10X98765432".
fn check_resident_id(number: &str) -> Result<(), InvalidIdentifier> {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let bytes = number.as_bytes();
    if bytes.len() != 18 || !bytes[..17].iter().all(u8::is_ascii_digit) {
        return Err(InvalidIdentifier::ResidentIdFormat);
    }
    let sum: u32 = bytes[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    if CHECK[(sum % 11) as usize] == bytes[17] {
        Ok(())
    } else {
        Err(InvalidIdentifier::ResidentIdCheckDigit)
    }
}

/// The region's secret, turned into a BLAKE3 key. Kept out of `Debug`.
#[derive(Clone)]
pub struct RegionSecret([u8; 32]);

impl fmt::Debug for RegionSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegionSecret(…)")
    }
}

impl RegionSecret {
    /// Any secret string (a file's content, an environment variable) is
    /// stretched into a key with BLAKE3's key derivation, under a context
    /// that names this use; surrounding blanks (a file's final newline) do
    /// not count. A secret shorter than 16 bytes is refused: it could be
    /// guessed, and with it every patient key tested against ID numbers.
    pub fn from_secret(secret: &str) -> Result<RegionSecret, String> {
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err("the region secret must be at least 16 characters".into());
        }
        Ok(RegionSecret(blake3::derive_key(
            "huren 2026-11 patient key v1",
            secret.as_bytes(),
        )))
    }

    /// The patient key: lower-case hex of keyed BLAKE3 over `TYPE:NUMBER`.
    pub fn patient_key(&self, identifier: &Identifier) -> String {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(identifier.kind.code().as_bytes());
        hasher.update(b":");
        hasher.update(identifier.number.as_bytes());
        hasher.finalize().to_hex().to_string()
    }
}

/// The federation's secret (docs/federation.md): the nodes of the pilot
/// hospitals of every member province hold it, no registry does. Kept out
/// of `Debug`.
#[derive(Clone)]
pub struct FederationSecret([u8; 32]);

impl fmt::Debug for FederationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FederationSecret(…)")
    }
}

impl FederationSecret {
    /// As [`RegionSecret::from_secret`], under its own context string: the
    /// same text as a region secret gives an unrelated key, so a pseudonym
    /// never equals a province's patient key.
    pub fn from_secret(secret: &str) -> Result<FederationSecret, String> {
        let secret = secret.trim();
        if secret.len() < 16 {
            return Err("the federation secret must be at least 16 characters".into());
        }
        Ok(FederationSecret(blake3::derive_key(
            "huren 2026-12 federation pseudonym v1",
            secret.as_bytes(),
        )))
    }

    /// The federation pseudonym: keyed BLAKE3 over `TYPE:NUMBER`, as the
    /// patient key, with the federation's key.
    pub fn pseudonym(&self, identifier: &Identifier) -> String {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(identifier.kind.code().as_bytes());
        hasher.update(b":");
        hasher.update(identifier.number.as_bytes());
        hasher.finalize().to_hex().to_string()
    }
}

/// Whether a string looks like a patient key (64 lower-case hex digits).
pub fn is_patient_key(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_id_numbers() {
        use InvalidIdentifier::*;
        let cases: &[(&str, Result<&str, InvalidIdentifier>)] = &[
            // GB 11643's own example number.
            ("11010519491231002X", Ok("11010519491231002X")),
            ("11010519491231002x", Ok("11010519491231002X")),
            (" 110105194912310021 ", Err(ResidentIdCheckDigit)),
            ("440524188001010014", Ok("440524188001010014")),
            ("440524188001010015", Err(ResidentIdCheckDigit)),
            (
                "４４０５２４１８８００１０１００１４",
                Ok("440524188001010014"),
            ),
            ("44052418800101001", Err(ResidentIdFormat)),
            ("4405241880010100144", Err(ResidentIdFormat)),
            ("44052418800101A014", Err(ResidentIdFormat)),
            ("", Err(Missing)),
            ("   ", Err(Missing)),
        ];
        for (raw, expected) in cases {
            let got = Identifier::parse(IdentifierType::ResidentId, raw);
            match expected {
                Ok(number) => assert_eq!(got.unwrap().number(), *number, "{raw:?}"),
                Err(e) => assert_eq!(got.unwrap_err(), *e, "{raw:?}"),
            }
        }
    }

    #[test]
    fn a_resident_id_names_a_birth_date_and_a_sex() {
        // 1958-04-12, digit 17 odd: a man.
        let id = Identifier::parse(IdentifierType::ResidentId, "110105195804120012").unwrap();
        assert!(id.agrees_with("19580412", "M"));
        assert!(id.agrees_with("", ""), "nothing said, nothing against");
        assert!(id.agrees_with("19580412", "O"));
        assert!(
            id.agrees_with("1958", "m"),
            "an unreadable date says nothing"
        );
        assert!(!id.agrees_with("19920815", "M"), "another birth date");
        assert!(!id.agrees_with("19580412", "F"), "another sex");
        assert!(!id.agrees_with("", "f"));
        // 1985-09-23, digit 17 even: a woman.
        let id = Identifier::parse(IdentifierType::ResidentId, "440524198509230025").unwrap();
        assert!(id.agrees_with("19850923", "F"));
        assert!(!id.agrees_with("19850923", "M"));
        // Other documents carry neither.
        let passport = Identifier::parse(IdentifierType::Passport, "E12345678").unwrap();
        assert!(passport.agrees_with("19920815", "F"));
    }

    #[test]
    fn other_documents() {
        let p = Identifier::parse(IdentifierType::Passport, " e1234567 ").unwrap();
        assert_eq!(p.number(), "E1234567");
        assert_eq!(
            Identifier::parse(IdentifierType::Passport, "E12 34").unwrap_err(),
            InvalidIdentifier::DocumentFormat
        );
    }

    /// The example of docs/registry.md ("The patient key, step by step"),
    /// for integrators who reproduce keys.
    #[test]
    fn the_documented_example() {
        let secret = RegionSecret::from_secret("region-secret-for-the-test-suite-0001\n").unwrap();
        let id = Identifier::parse(IdentifierType::ResidentId, " 11010519491231002x").unwrap();
        assert_eq!(
            secret.patient_key(&id),
            "ddc1715c6147bba27a5d07ccf7c58ece83482a032d41d9f2133ee54d0d739755"
        );
    }

    #[test]
    fn keys_depend_on_secret_type_and_number_only() {
        let a = RegionSecret::from_secret("region-secret-for-tests-0001").unwrap();
        let b = RegionSecret::from_secret("region-secret-for-tests-0002").unwrap();
        let id = Identifier::parse(IdentifierType::ResidentId, "11010519491231002x").unwrap();
        let same = Identifier::parse(IdentifierType::ResidentId, "11010519491231002X").unwrap();
        let key = a.patient_key(&id);
        assert!(is_patient_key(&key));
        assert_eq!(key, a.patient_key(&same));
        assert_ne!(key, b.patient_key(&id));
        let passport = Identifier::parse(IdentifierType::Passport, "11010519491231002X").unwrap();
        assert_ne!(key, a.patient_key(&passport));
        assert!(!key.contains("110105"));
        assert!(RegionSecret::from_secret("short").is_err());
        assert_eq!(format!("{id:?}"), "Identifier(RID:…)");
    }

    /// A pseudonym is not the patient key of any province that happens to
    /// use the same text as its region secret, and depends on the
    /// identifier as the key does.
    #[test]
    fn pseudonyms_are_not_patient_keys() {
        let text = "region-secret-for-the-test-suite-0001";
        let region = RegionSecret::from_secret(text).unwrap();
        let federation = FederationSecret::from_secret(text).unwrap();
        let id = Identifier::parse(IdentifierType::ResidentId, "11010519491231002X").unwrap();
        let pseudonym = federation.pseudonym(&id);
        assert!(is_patient_key(&pseudonym));
        assert_ne!(pseudonym, region.patient_key(&id));
        let other = FederationSecret::from_secret("federation-secret-for-tests-02").unwrap();
        assert_ne!(pseudonym, other.pseudonym(&id));
        assert!(FederationSecret::from_secret("short").is_err());
        assert_eq!(format!("{federation:?}"), "FederationSecret(…)");
    }
}
