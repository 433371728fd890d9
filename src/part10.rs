//! DICOM Part-10 objects as the blob store keeps them (PS3.10 §7.1):
//! the node's own deterministic file meta group, a structural check of the
//! received data set, and the attributes the index needs.
//!
//! The data set bytes are kept exactly as the sender encoded them; only the
//! file meta group is ours. It holds nothing that depends on when or from
//! whom the instance arrived (no timestamps, no Source AE), so the same
//! instance sent twice yields the same bytes and so the same BLAKE3 key.

use std::io::{self, BufRead, BufReader, Read, Seek};
use std::path::Path;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_object::file::ReadPreamble;
use thiserror::Error;

use crate::types::Uid;

/// huren's Implementation Class UID (PS3.7 D.3.3.2), a UUID-derived UID
/// (PS3.5 B.2). It never changes across versions so that blobs written by
/// any version hash the same.
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.205785964471210242072891770963914804034";

/// Transfer syntaxes whose data set is encoded in big endian byte order.
const EXPLICIT_VR_BIG_ENDIAN: &str = "1.2.840.10008.1.2.2";
const IMPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2";
/// Deflated transfer syntaxes: the whole data set is a raw deflate stream
/// of explicit VR little endian (PS3.5 A.5).
const DEFLATED: [&str; 3] = [
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.4.95",
    "1.2.840.10008.1.2.4.205",
];

#[derive(Debug, Error)]
pub enum Error {
    #[error("data set is truncated: {0}")]
    Truncated(&'static str),
    #[error("data set is malformed: {0}")]
    Malformed(String),
    #[error("data set cannot be decoded: {0}")]
    Undecodable(String),
    #[error("data set has no {0}")]
    MissingAttribute(&'static str),
    #[error("{attribute} {value:?} is not a valid UID")]
    InvalidUid {
        attribute: &'static str,
        value: String,
    },
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Builds the preamble, "DICM" prefix and file meta group (PS3.10 §7.1) that
/// precede the received data set. Explicit VR little endian as PS3.10 requires.
pub fn file_meta_prefix(
    media_storage_sop_class_uid: &Uid,
    media_storage_sop_instance_uid: &Uid,
    transfer_syntax_uid: &Uid,
) -> Vec<u8> {
    let mut group = Vec::with_capacity(256);
    // (0002,0001) File Meta Information Version, OB, value 00 01.
    group.extend_from_slice(&[0x02, 0x00, 0x01, 0x00, b'O', b'B', 0, 0]);
    group.extend_from_slice(&2u32.to_le_bytes());
    group.extend_from_slice(&[0x00, 0x01]);
    let ui = |group: &mut Vec<u8>, element: u16, value: &str| {
        let padded_len = value.len() + value.len() % 2;
        group.extend_from_slice(&0x0002u16.to_le_bytes());
        group.extend_from_slice(&element.to_le_bytes());
        group.extend_from_slice(b"UI");
        group.extend_from_slice(&(padded_len as u16).to_le_bytes());
        group.extend_from_slice(value.as_bytes());
        if value.len() % 2 == 1 {
            // UI values are padded with a single NUL (PS3.5 §9.1).
            group.push(0);
        }
    };
    ui(&mut group, 0x0002, media_storage_sop_class_uid.as_str());
    ui(&mut group, 0x0003, media_storage_sop_instance_uid.as_str());
    ui(&mut group, 0x0010, transfer_syntax_uid.as_str());
    ui(&mut group, 0x0012, IMPLEMENTATION_CLASS_UID);

    let mut out = Vec::with_capacity(132 + 12 + group.len());
    out.extend_from_slice(&[0u8; 128]);
    out.extend_from_slice(b"DICM");
    // (0002,0000) File Meta Information Group Length, UL.
    out.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
    out.extend_from_slice(&(group.len() as u32).to_le_bytes());
    out.extend_from_slice(&group);
    out
}

/// Length of the preamble, prefix and file meta group at the start of a
/// Part-10 object, found from its group length element.
pub fn file_meta_len(bytes: &[u8]) -> Option<usize> {
    if bytes.len() < 144 || &bytes[128..132] != b"DICM" || bytes[132..136] != [2, 0, 0, 0] {
        return None;
    }
    let group_len = u32::from_le_bytes(bytes[140..144].try_into().ok()?) as usize;
    Some(144 + group_len)
}

#[derive(Clone, Copy)]
struct Encoding {
    explicit_vr: bool,
    big_endian: bool,
}

impl Encoding {
    const IMPLICIT_LE: Encoding = Encoding {
        explicit_vr: false,
        big_endian: false,
    };

    fn u16(&self, b: [u8; 2]) -> u16 {
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32(&self, b: [u8; 4]) -> u32 {
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }
}

const UNDEFINED_LENGTH: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_DELIMITATION: (u16, u16) = (0xFFFE, 0xE00D);
const SEQUENCE_DELIMITATION: (u16, u16) = (0xFFFE, 0xE0DD);
/// Nesting deeper than this is not a real data set but an attack on the stack.
const MAX_DEPTH: usize = 64;

/// A reader that knows how many bytes remain, so that a value is skipped with
/// a seek (a 1 GB Pixel Data element costs nothing) and a length pointing
/// past the end is caught as truncation.
struct Source<R> {
    inner: R,
    remaining: Option<u64>,
}

impl<R: BufRead + Seek> Source<R> {
    /// Reads exactly `N` bytes; `Ok(None)` on a clean end of data before the
    /// first byte.
    fn read_array<const N: usize>(&mut self) -> Result<Option<[u8; N]>, Error> {
        let mut buf = [0u8; N];
        let mut filled = 0;
        while filled < N {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(None),
                Ok(0) => return Err(Error::Truncated("element header cut short")),
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Io(e)),
            }
        }
        if let Some(r) = self.remaining.as_mut() {
            *r = r.saturating_sub(N as u64);
        }
        Ok(Some(buf))
    }

    fn need<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        self.read_array::<N>()?
            .ok_or(Error::Truncated("data set ends inside an element"))
    }

    fn skip(&mut self, len: u32) -> Result<(), Error> {
        match self.remaining.as_mut() {
            Some(remaining) => {
                if u64::from(len) > *remaining {
                    return Err(Error::Truncated("value length runs past the end"));
                }
                *remaining -= u64::from(len);
                self.inner.seek_relative(i64::from(len))?;
            }
            None => {
                let copied =
                    io::copy(&mut (&mut self.inner).take(u64::from(len)), &mut io::sink())?;
                if copied < u64::from(len) {
                    return Err(Error::Truncated("value length runs past the end"));
                }
            }
        }
        Ok(())
    }
}

/// A reader that cannot seek: deflated data sets are read through.
struct NoSeek<R>(R);

impl<R: Read> Read for NoSeek<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: BufRead> BufRead for NoSeek<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.0.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        self.0.consume(amt)
    }
}

impl<R> Seek for NoSeek<R> {
    fn seek(&mut self, _: io::SeekFrom) -> io::Result<u64> {
        Err(io::Error::other("deflated data sets are not seekable"))
    }
}

/// Checks that the data set starting at `offset` of the file is complete and
/// well formed at every nesting level: element lengths add up exactly to the
/// end of the file, undefined-length sequences and items are closed, and
/// nothing follows the last element. Values are skipped, not read.
pub fn check_structure(path: &Path, offset: u64, transfer_syntax_uid: &str) -> Result<(), Error> {
    let mut file = std::fs::File::open(path)?;
    let total = file.metadata()?.len();
    if offset > total {
        return Err(Error::Truncated("file shorter than its meta group"));
    }
    file.seek(io::SeekFrom::Start(offset))?;
    let reader = BufReader::with_capacity(64 * 1024, file);
    check_structure_in(reader, total - offset, transfer_syntax_uid)
}

/// [`check_structure`] of a data set held in memory.
pub fn check_structure_bytes(data_set: &[Vec<u8>], transfer_syntax_uid: &str) -> Result<(), Error> {
    let reader = Chunks::new(data_set);
    let len = reader.len;
    check_structure_in(reader, len, transfer_syntax_uid)
}

/// A data set held as the fragments it arrived in, read as one stream:
/// the fragments are kept as received rather than copied together.
pub struct Chunks<'a> {
    chunks: &'a [Vec<u8>],
    /// Index of the current chunk and offset in it.
    chunk: usize,
    offset: usize,
    pos: u64,
    len: u64,
}

impl<'a> Chunks<'a> {
    pub fn new(chunks: &'a [Vec<u8>]) -> Chunks<'a> {
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Chunks {
            chunks,
            chunk: 0,
            offset: 0,
            pos: 0,
            len,
        }
    }
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Chunks<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunk < self.chunks.len() && self.offset >= self.chunks[self.chunk].len() {
            self.chunk += 1;
            self.offset = 0;
        }
        Ok(self
            .chunks
            .get(self.chunk)
            .map_or(&[][..], |c| &c[self.offset..]))
    }

    fn consume(&mut self, amt: usize) {
        self.offset += amt;
        self.pos += amt as u64;
    }
}

impl Seek for Chunks<'_> {
    fn seek(&mut self, to: io::SeekFrom) -> io::Result<u64> {
        let target = match to {
            io::SeekFrom::Start(p) => p as i128,
            io::SeekFrom::Current(d) => self.pos as i128 + d as i128,
            io::SeekFrom::End(d) => self.len as i128 + d as i128,
        };
        if target < 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        let target = (target as u64).min(self.len);
        let (mut chunk, mut start) = (0, 0u64);
        while chunk < self.chunks.len() && start + self.chunks[chunk].len() as u64 <= target {
            start += self.chunks[chunk].len() as u64;
            chunk += 1;
        }
        self.chunk = chunk;
        self.offset = (target - start) as usize;
        self.pos = target;
        Ok(target)
    }
}

fn check_structure_in<R: BufRead + Seek>(
    reader: R,
    len: u64,
    transfer_syntax_uid: &str,
) -> Result<(), Error> {
    let ts = transfer_syntax_uid.trim_end_matches('\0');
    if DEFLATED.contains(&ts) {
        let inflated = BufReader::new(flate2::bufread::DeflateDecoder::new(reader));
        let mut source = Source {
            inner: NoSeek(inflated),
            remaining: None,
        };
        let enc = Encoding {
            explicit_vr: true,
            big_endian: false,
        };
        return elements(&mut source, enc, false, 0);
    }
    let enc = Encoding {
        explicit_vr: ts != IMPLICIT_VR_LITTLE_ENDIAN,
        big_endian: ts == EXPLICIT_VR_BIG_ENDIAN,
    };
    let mut source = Source {
        inner: reader,
        remaining: Some(len),
    };
    elements(&mut source, enc, false, 0)
}

/// Reads data elements until the end of data (`in_item == false`) or until
/// an Item Delimitation Item (`in_item == true`).
fn elements<R: BufRead + Seek>(
    src: &mut Source<R>,
    enc: Encoding,
    in_item: bool,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::Malformed("sequences nested too deeply".into()));
    }
    loop {
        let Some(tag) = src.read_array::<4>()? else {
            return if in_item {
                Err(Error::Truncated(
                    "item not closed by an Item Delimitation Item",
                ))
            } else {
                Ok(())
            };
        };
        let tag = (enc.u16([tag[0], tag[1]]), enc.u16([tag[2], tag[3]]));
        if tag == ITEM_DELIMITATION {
            src.need::<4>()?;
            return if in_item {
                Ok(())
            } else {
                Err(Error::Malformed(
                    "Item Delimitation Item outside an item".into(),
                ))
            };
        }
        if tag == ITEM || tag == SEQUENCE_DELIMITATION {
            return Err(Error::Malformed(format!(
                "({:04X},{:04X}) where a data element was expected",
                tag.0, tag.1
            )));
        }
        let (vr, len) = if enc.explicit_vr {
            let vr = src.need::<2>()?;
            if !vr.iter().all(u8::is_ascii_uppercase) {
                return Err(Error::Malformed(format!(
                    "element ({:04X},{:04X}) has no valid VR",
                    tag.0, tag.1
                )));
            }
            let long = matches!(
                &vr,
                b"OB"
                    | b"OD"
                    | b"OF"
                    | b"OL"
                    | b"OV"
                    | b"OW"
                    | b"SQ"
                    | b"SV"
                    | b"UC"
                    | b"UN"
                    | b"UR"
                    | b"UT"
                    | b"UV"
            );
            let len = if long {
                src.need::<2>()?;
                enc.u32(src.need::<4>()?)
            } else {
                u32::from(enc.u16(src.need::<2>()?))
            };
            (Some(vr), len)
        } else {
            (None, enc.u32(src.need::<4>()?))
        };
        if len != UNDEFINED_LENGTH {
            src.skip(len)?;
            continue;
        }
        match vr.as_ref() {
            // An undefined-length UN holds implicit VR little endian
            // (PS3.5 §6.2.2, CP-246).
            Some(b"UN") => items(src, Encoding::IMPLICIT_LE, depth + 1)?,
            // Sequences, and encapsulated Pixel Data whose fragments are
            // items of defined length (PS3.5 A.4).
            Some(b"SQ") | Some(b"OB") | Some(b"OW") | None => items(src, enc, depth + 1)?,
            Some(other) => {
                return Err(Error::Malformed(format!(
                    "element ({:04X},{:04X}) with VR {} has undefined length",
                    tag.0,
                    tag.1,
                    String::from_utf8_lossy(other)
                )));
            }
        }
    }
}

/// Reads items until a Sequence Delimitation Item.
fn items<R: BufRead + Seek>(src: &mut Source<R>, enc: Encoding, depth: usize) -> Result<(), Error> {
    loop {
        let tag = src.need::<4>()?;
        let tag = (enc.u16([tag[0], tag[1]]), enc.u16([tag[2], tag[3]]));
        let len = enc.u32(src.need::<4>()?);
        match tag {
            SEQUENCE_DELIMITATION => return Ok(()),
            ITEM if len == UNDEFINED_LENGTH => elements(src, enc, true, depth)?,
            ITEM => src.skip(len)?,
            other => {
                return Err(Error::Malformed(format!(
                    "({:04X},{:04X}) inside a sequence where an item was expected",
                    other.0, other.1
                )));
            }
        }
    }
}

/// The attributes of one instance that the index keeps: those C-FIND and
/// QIDO-RS match on, and those the recognition logic will classify by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceAttributes {
    pub patient_id: String,
    pub issuer_of_patient_id: String,
    pub patient_name: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_instance_uid: String,
    pub study_date: String,
    pub study_time: String,
    pub accession_number: String,
    pub study_id: String,
    pub referring_physician_name: String,
    pub study_description: String,
    pub series_instance_uid: String,
    pub modality: String,
    pub series_number: Option<i64>,
    pub series_description: String,
    pub body_part_examined: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub instance_number: Option<i64>,
    pub transfer_syntax_uid: String,
}

/// Everything the index needs lies before group 0x0041; stopping there
/// keeps Pixel Data, Encapsulated Document (0042,0011), waveforms and
/// overlays out of memory whatever their size.
const READ_UNTIL: Tag = Tag(0x0041, 0x0000);

/// Parses the Part-10 object at `path` up to [`READ_UNTIL`] and extracts the
/// indexed attributes. The data set must carry its SOP Class, SOP Instance,
/// Study Instance and Series Instance UIDs.
pub fn read_attributes(path: &Path) -> Result<InstanceAttributes, Error> {
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .read_until(READ_UNTIL)
        .open_file(path)
        .map_err(|e| Error::Undecodable(e.to_string()))?;
    extract(&obj)
}

/// [`read_attributes`] of a Part-10 object held in memory as its file
/// meta prefix (preamble included) and its data set.
pub fn read_attributes_bytes(
    prefix: &[u8],
    data_set: &[Vec<u8>],
) -> Result<InstanceAttributes, Error> {
    let after_preamble = prefix.get(128..).ok_or(Error::Truncated("no preamble"))?;
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(READ_UNTIL)
        .from_reader(io::Read::chain(after_preamble, Chunks::new(data_set)))
        .map_err(|e| Error::Undecodable(e.to_string()))?;
    extract(&obj)
}

fn extract(obj: &dicom_object::DefaultDicomObject) -> Result<InstanceAttributes, Error> {
    // Read only for a value with an ISO 2022 escape in it, which few have.
    let specific_character_set = std::cell::OnceCell::<Vec<String>>::new();
    let decoded = |s: &str| -> String {
        if !s.contains('\u{1b}') {
            return clean(s);
        }
        let terms = specific_character_set.get_or_init(|| {
            obj.get(tags::SPECIFIC_CHARACTER_SET)
                .and_then(|e| e.to_multi_str().ok())
                .map(|v| v.to_vec())
                .unwrap_or_default()
        });
        let terms: Vec<&str> = terms.iter().map(String::as_str).collect();
        clean(&crate::charset::decode_code_extensions(s, &terms))
    };
    let text = |tag: Tag| -> String {
        let Some(element) = obj.get(tag) else {
            return String::new();
        };
        // Some writers encode text attributes as UN or OB (pydicom's
        // rtdose_rle.dcm has its SOP Class UID so): read those bytes as text.
        if matches!(element.vr(), VR::UN | VR::OB) {
            return element
                .to_bytes()
                .map(|b| clean(&String::from_utf8_lossy(&b)))
                .unwrap_or_default();
        }
        element.to_str().map(|s| decoded(&s)).unwrap_or_default()
    };
    let int = |tag: Tag| -> Option<i64> {
        let s = text(tag);
        s.trim().parse::<i64>().ok()
    };
    let uid = |tag: Tag, attribute: &'static str| -> Result<String, Error> {
        let raw = text(tag);
        if raw.is_empty() {
            return Err(Error::MissingAttribute(attribute));
        }
        Uid::parse(&raw)
            .map(|u| u.as_str().to_string())
            .map_err(|_| Error::InvalidUid {
                attribute,
                value: raw,
            })
    };
    let sop_instance_uid = uid(tags::SOP_INSTANCE_UID, "SOP Instance UID")?;
    // Study and Series Instance UID are Type 1 in every IOD, yet real
    // archives (and pydicom's JPEG-LS test files) hold instances without
    // them. Refusing would lose images the sender has no other home for, so
    // the index files such an instance under a UID derived from its SOP
    // Instance UID; the stored bytes stay as received.
    let study_instance_uid =
        optional_uid(&text(tags::STUDY_INSTANCE_UID), "study", &sop_instance_uid).map_err(
            |value| Error::InvalidUid {
                attribute: "Study Instance UID",
                value,
            },
        )?;
    let series_instance_uid = optional_uid(
        &text(tags::SERIES_INSTANCE_UID),
        "series",
        &sop_instance_uid,
    )
    .map_err(|value| Error::InvalidUid {
        attribute: "Series Instance UID",
        value,
    })?;
    Ok(InstanceAttributes {
        sop_class_uid: uid(tags::SOP_CLASS_UID, "SOP Class UID")?,
        sop_instance_uid,
        study_instance_uid,
        series_instance_uid,
        patient_id: text(tags::PATIENT_ID),
        issuer_of_patient_id: text(tags::ISSUER_OF_PATIENT_ID),
        patient_name: text(tags::PATIENT_NAME),
        patient_birth_date: text(tags::PATIENT_BIRTH_DATE),
        patient_sex: text(tags::PATIENT_SEX),
        study_date: text(tags::STUDY_DATE),
        study_time: text(tags::STUDY_TIME),
        accession_number: text(tags::ACCESSION_NUMBER),
        study_id: text(tags::STUDY_ID),
        referring_physician_name: text(tags::REFERRING_PHYSICIAN_NAME),
        study_description: text(tags::STUDY_DESCRIPTION),
        modality: text(tags::MODALITY),
        series_number: int(tags::SERIES_NUMBER),
        series_description: text(tags::SERIES_DESCRIPTION),
        body_part_examined: text(tags::BODY_PART_EXAMINED),
        instance_number: int(tags::INSTANCE_NUMBER),
        transfer_syntax_uid: obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string(),
    })
}

/// The UID as given, or, when absent, a UUID-derived UID (PS3.5 B.2) made
/// from the SOP Instance UID, so the same instance always lands in the same
/// place. `Err` carries an invalid value.
fn optional_uid(raw: &str, level: &str, sop_instance_uid: &str) -> Result<String, String> {
    if raw.is_empty() {
        let hash = blake3::hash(format!("huren:{level}:{sop_instance_uid}").as_bytes());
        let first: [u8; 16] = hash.as_bytes()[..16].try_into().expect("16 bytes");
        return Ok(format!("2.25.{}", u128::from_be_bytes(first)));
    }
    Uid::parse(raw)
        .map(|u| u.as_str().to_string())
        .map_err(|_| raw.to_string())
}

/// Text values keep their meaning without the padding PS3.5 §6.2 allows.
fn clean(s: &str) -> String {
    s.trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn uid(s: &str) -> Uid {
        Uid::parse(s).unwrap()
    }

    #[test]
    fn file_meta_is_deterministic_and_well_formed() {
        let a = file_meta_prefix(
            &uid("1.2.840.10008.5.1.4.1.1.2"),
            &uid("1.2.3.4"),
            &uid("1.2.840.10008.1.2.1"),
        );
        let b = file_meta_prefix(
            &uid("1.2.840.10008.5.1.4.1.1.2"),
            &uid("1.2.3.4"),
            &uid("1.2.840.10008.1.2.1"),
        );
        assert_eq!(a, b);
        assert_eq!(file_meta_len(&a), Some(a.len()));
        assert_eq!(a.len() % 2, 0);
        // An odd-length UID gets one NUL of padding.
        assert!(a.windows(8).any(|w| w == b"1.2.3.4\0"));
    }

    /// Explicit VR little endian element bytes.
    fn el(group: u16, element: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(vr);
        if matches!(vr, b"OB" | b"SQ" | b"UN" | b"OW") {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    fn undefined_sq(group: u16, element: u16, item_body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&element.to_le_bytes());
        out.extend_from_slice(b"SQ\0\0");
        out.extend_from_slice(&UNDEFINED_LENGTH.to_le_bytes());
        out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0]);
        out.extend_from_slice(&UNDEFINED_LENGTH.to_le_bytes());
        out.extend_from_slice(item_body);
        out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        out
    }

    #[test]
    fn chunks_read_and_seek_as_one_stream() {
        let chunks = vec![b"abc".to_vec(), Vec::new(), b"defg".to_vec(), b"h".to_vec()];
        let mut all = String::new();
        Chunks::new(&chunks).read_to_string(&mut all).unwrap();
        assert_eq!(all, "abcdefgh");
        let mut r = Chunks::new(&chunks);
        let cases: &[(io::SeekFrom, u64, &str)] = &[
            (io::SeekFrom::Start(2), 2, "cdefgh"),
            (io::SeekFrom::Start(3), 3, "defgh"),
            (io::SeekFrom::End(-1), 7, "h"),
            (io::SeekFrom::Start(8), 8, ""),
        ];
        for (to, pos, rest) in cases {
            assert_eq!(r.seek(*to).unwrap(), *pos);
            let mut out = String::new();
            r.read_to_string(&mut out).unwrap();
            assert_eq!(out, *rest, "{to:?}");
        }
        r.seek(io::SeekFrom::Start(1)).unwrap();
        r.seek(io::SeekFrom::Current(4)).unwrap();
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"f");
    }

    #[test]
    fn structure_check_cases() {
        let ok = [
            el(0x0008, 0x0016, b"UI", b"1.2\0"),
            undefined_sq(0x0008, 0x1115, &el(0x0008, 0x1150, b"UI", b"1.2\0")),
            el(0x7FE0, 0x0010, b"OW", &[0u8; 16]),
        ]
        .concat();
        let mut truncated = ok.clone();
        truncated.truncate(ok.len() - 3);
        let mut unclosed_sq = undefined_sq(0x0008, 0x1115, &[]);
        unclosed_sq.truncate(unclosed_sq.len() - 8);
        let garbage = b"this is not DICOM at all, just text.".to_vec();
        let cases: &[(&str, &[u8], bool)] = &[
            ("complete", &ok, true),
            ("empty", &[], true),
            ("truncated value", &truncated, false),
            ("unclosed sequence", &unclosed_sq, false),
            ("garbage", &garbage, false),
            ("half a tag", &ok[..2], false),
        ];
        for (name, body, expect_ok) in cases {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            file.write_all(b"HEAD").unwrap();
            file.write_all(body).unwrap();
            file.flush().unwrap();
            let result = check_structure(file.path(), 4, "1.2.840.10008.1.2.1");
            assert_eq!(result.is_ok(), *expect_ok, "{name}: {result:?}");
        }
    }
}
