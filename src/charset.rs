//! Text written with ISO 2022 code extensions (PS3.5 §6.1.2.5, PS3.3
//! C.12.1.1.2): a Specific Character Set of several values, such as
//! `\ISO 2022 IR 58` (GB2312, the form Chinese archives still send, PS3.5
//! Annex K) or `ISO 2022 IR 13\ISO 2022 IR 87` (Japanese), where escape
//! sequences inside a value switch between character sets.
//!
//! dicom-rs decodes a value with the set named by the first value of
//! Specific Character Set alone and keeps the escape sequences as text. For
//! the usual first values (none, ISO 2022 IR 6, ISO 2022 IR 100) that
//! decoding maps each byte to one char, so the bytes after an escape are
//! recovered from the chars and decoded here in the set the escape
//! designates. The index, C-FIND, QIDO-RS and WADO-RS metadata then carry
//! the characters, not the escapes: `王*` finds 王^小东.

use encoding_rs::Encoding;

const ESC: char = '\u{1b}';

/// What a G0 designation (the bytes 0x21-0x7E) reads as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum G0 {
    /// ISO 646 (ASCII), and JIS X 0201 Romaji, whose differences (¥, ‾)
    /// DICOM readers ignore.
    Ascii,
    /// JIS X 0208 (ISO 2022 IR 87): two bytes per character.
    JisX0208,
    /// JIS X 0212 (ISO 2022 IR 159): two bytes per character.
    JisX0212,
}

/// What a G1 designation (the bytes 0xA1-0xFE) reads as: the encoding that
/// decodes ASCII plus those bytes as the set does.
type G1 = Option<&'static Encoding>;

/// The G1 set of a Specific Character Set value (the defined term) in
/// ISO 2022 form; `None` for a G0-only or unknown term.
fn g1_of_term(term: &str) -> G1 {
    let number = term.trim().strip_prefix("ISO 2022 IR ")?;
    Some(match number {
        "100" => encoding_rs::WINDOWS_1252,
        "101" => encoding_rs::ISO_8859_2,
        "109" => encoding_rs::ISO_8859_3,
        "110" => encoding_rs::ISO_8859_4,
        "144" => encoding_rs::ISO_8859_5,
        "127" => encoding_rs::ISO_8859_6,
        "126" => encoding_rs::ISO_8859_7,
        "138" => encoding_rs::ISO_8859_8,
        "148" => encoding_rs::WINDOWS_1254,
        "203" => encoding_rs::ISO_8859_15,
        "166" => encoding_rs::WINDOWS_874,
        // JIS X 0201 Katakana in G1: Shift_JIS reads 0xA1-0xDF so.
        "13" => encoding_rs::SHIFT_JIS,
        "58" => encoding_rs::GBK,
        "149" => encoding_rs::EUC_KR,
        _ => return None,
    })
}

/// The designation an escape sequence (the bytes after ESC) makes.
enum Designation {
    G0(G0),
    G1(&'static Encoding),
    Unknown,
}

fn designation(sequence: &str) -> Designation {
    match sequence {
        "(B" | "(J" => Designation::G0(G0::Ascii),
        "$B" | "$@" => Designation::G0(G0::JisX0208),
        "$(D" => Designation::G0(G0::JisX0212),
        ")I" => Designation::G1(encoding_rs::SHIFT_JIS),
        "$)A" => Designation::G1(encoding_rs::GBK),
        "$)C" => Designation::G1(encoding_rs::EUC_KR),
        "-A" => Designation::G1(encoding_rs::WINDOWS_1252),
        "-B" => Designation::G1(encoding_rs::ISO_8859_2),
        "-C" => Designation::G1(encoding_rs::ISO_8859_3),
        "-D" => Designation::G1(encoding_rs::ISO_8859_4),
        "-L" => Designation::G1(encoding_rs::ISO_8859_5),
        "-G" => Designation::G1(encoding_rs::ISO_8859_6),
        "-F" => Designation::G1(encoding_rs::ISO_8859_7),
        "-H" => Designation::G1(encoding_rs::ISO_8859_8),
        "-M" => Designation::G1(encoding_rs::WINDOWS_1254),
        "-b" => Designation::G1(encoding_rs::ISO_8859_15),
        "-T" => Designation::G1(encoding_rs::WINDOWS_874),
        _ => Designation::Unknown,
    }
}

/// Whether dicom-rs decoded a value of this Specific Character Set one
/// byte to one char (its default set and ISO 8859-1), so that the bytes
/// are the chars.
fn decoded_byte_for_byte(first_term: &str) -> bool {
    matches!(
        first_term.trim(),
        "" | "ISO 2022 IR 6" | "ISO_IR 6" | "ISO 2022 IR 100" | "ISO_IR 100"
    ) || dicom_encoding::text::SpecificCharacterSet::from_code(first_term.trim()).is_none()
}

/// The text of a value dicom-rs decoded under `specific_character_set` (the
/// attribute's values), with what follows each ISO 2022 escape sequence
/// decoded in the set it designates and the escapes removed. Text without
/// an escape is returned as it is.
pub fn decode_code_extensions(text: &str, specific_character_set: &[&str]) -> String {
    if !text.contains(ESC) {
        return text.to_string();
    }
    let first = specific_character_set.first().copied().unwrap_or("");
    let byte_for_byte = decoded_byte_for_byte(first);
    let mut g0 = G0::Ascii;
    let mut g1 = g1_of_term(first);
    let mut segments = text.split(ESC);
    // Before the first escape the first value's set is in force, as
    // dicom-rs read it.
    let mut out = segments.next().unwrap_or("").to_string();
    for segment in segments {
        // An escape sequence: intermediates 0x20-0x2F, then one final
        // byte 0x30-0x7E (ISO 2022).
        let end = segment
            .char_indices()
            .find(|&(_, c)| ('\u{30}'..='\u{7e}').contains(&c))
            .map(|(i, c)| i + c.len_utf8());
        let Some(end) = end else {
            out.push_str(segment);
            continue;
        };
        match designation(&segment[..end]) {
            Designation::G0(set) => g0 = set,
            Designation::G1(set) => g1 = Some(set),
            Designation::Unknown => {}
        }
        let rest = &segment[end..];
        // The chars are the bytes when dicom-rs read byte for byte, or
        // when all are ASCII (which every set dicom-rs knows reads alike).
        // Otherwise dicom-rs decoded them with a multi-byte set of its own
        // (a lone `ISO 2022 IR 58` as GBK): they stand as read.
        if (byte_for_byte && rest.chars().all(|c| (c as u32) <= 0xFF)) || rest.is_ascii() {
            let bytes: Vec<u8> = rest.chars().map(|c| c as u32 as u8).collect();
            out.push_str(&decode_bytes(&bytes, g0, g1));
        } else {
            out.push_str(rest);
        }
    }
    out
}

/// Bytes read with G0 and G1 designated as given.
fn decode_bytes(bytes: &[u8], g0: G0, g1: G1) -> String {
    let euc_jp: Vec<u8>;
    let (bytes, encoding) = match g0 {
        // EUC-JP carries JIS X 0208 as its bytes with the high bit set,
        // and JIS X 0212 so after 0x8F.
        G0::JisX0208 | G0::JisX0212 => {
            let mut v = Vec::with_capacity(bytes.len() * 3 / 2);
            let mut pair = 0;
            for &b in bytes {
                if (0x21..=0x7E).contains(&b) {
                    if g0 == G0::JisX0212 && pair % 2 == 0 {
                        v.push(0x8F);
                    }
                    pair += 1;
                    v.push(b | 0x80);
                } else {
                    v.push(b);
                }
            }
            euc_jp = v;
            (&euc_jp[..], encoding_rs::EUC_JP)
        }
        G0::Ascii => match g1 {
            Some(encoding) => (bytes, encoding),
            // Bytes above 0x7F with no G1 set: read as ISO 8859-1, as
            // dicom-rs did.
            None => return bytes.iter().map(|&b| b as char).collect(),
        },
    };
    encoding.decode_without_bom_handling(bytes).0.into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes as dicom-rs hands them over under its default set: one char
    /// per byte.
    fn latin1(bytes: &[u8]) -> String {
        bytes.iter().map(|&b| b as char).collect()
    }

    #[test]
    fn gb2312_after_its_escape_is_read_as_chinese() {
        // PS3.5 K.2: Wang^XiaoDong=王^小东= under "\ISO 2022 IR 58".
        let raw = [
            b"Wang^XiaoDong=".as_slice(),
            b"\x1b$)A\xcd\xf5^\x1b$)A\xd0\xa1\xb6\xab=",
        ]
        .concat();
        assert_eq!(
            decode_code_extensions(&latin1(&raw), &["", "ISO 2022 IR 58"]),
            "Wang^XiaoDong=王^小东="
        );
        // A lone "ISO 2022 IR 58", which dicom-rs decodes as GBK itself.
        let gbk_read = "Wang^XiaoDong=\u{1b}$)A王^\u{1b}$)A小东=";
        assert_eq!(
            decode_code_extensions(gbk_read, &["ISO 2022 IR 58"]),
            "Wang^XiaoDong=王^小东="
        );
    }

    #[test]
    fn japanese_in_jis_x_0208_and_katakana_is_read() {
        // PS3.5 H.3.1: Yamada^Tarou=山田^太郎=やまだ^たろう under
        // "\ISO 2022 IR 87".
        let raw = [
            b"Yamada^Tarou=".as_slice(),
            b"\x1b$B;3ED\x1b(B^\x1b$BB@O:\x1b(B=",
            b"\x1b$B$d$^$@\x1b(B^\x1b$B$?$m$&\x1b(B",
        ]
        .concat();
        assert_eq!(
            decode_code_extensions(&latin1(&raw), &["", "ISO 2022 IR 87"]),
            "Yamada^Tarou=山田^太郎=やまだ^たろう"
        );
        // PS3.5 H.3.2: half-width katakana in G1 under
        // "ISO 2022 IR 13\ISO 2022 IR 87": ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎.
        let sjis_read = "ﾔﾏﾀﾞ^ﾀﾛｳ=\u{1b}$B;3ED\u{1b}(J^\u{1b}$BB@O:\u{1b}(J";
        assert_eq!(
            decode_code_extensions(sjis_read, &["ISO 2022 IR 13", "ISO 2022 IR 87"]),
            "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"
        );
    }

    #[test]
    fn korean_and_single_byte_sets_after_their_escapes() {
        // PS3.5 I.2: Hong^Gildong=洪^吉洞=홍^길동 under "\ISO 2022 IR 149".
        let raw = [
            b"Hong^Gildong=".as_slice(),
            b"\x1b$)C\xfb\xf3^\x1b$)C\xd1\xce\xd4\xd7=",
            b"\x1b$)C\xc8\xab^\x1b$)C\xb1\xe6\xb5\xbf",
        ]
        .concat();
        assert_eq!(
            decode_code_extensions(&latin1(&raw), &["", "ISO 2022 IR 149"]),
            "Hong^Gildong=洪^吉洞=홍^길동"
        );
        // Greek after Latin-1: "ISO 2022 IR 100\ISO 2022 IR 126".
        let raw = b"M\xfcller \x1b-F\xc1\xe8\xe7\xed\xdc";
        assert_eq!(
            decode_code_extensions(&latin1(raw), &["ISO 2022 IR 100", "ISO 2022 IR 126"]),
            "Müller Αθηνά"
        );
    }

    #[test]
    fn text_without_escapes_is_left_alone() {
        assert_eq!(decode_code_extensions("张^三", &["GB18030"]), "张^三");
        assert_eq!(decode_code_extensions("Müller", &["ISO_IR 100"]), "Müller");
    }
}
