//! Transfer syntax conversion on the way out, shared by C-MOVE/C-GET
//! sub-operations and WADO-RS: uncompressed (and deflated) data sets are
//! re-encoded; JPEG baseline, JPEG lossless and RLE pixel data (and JPEG-LS
//! with the `jpeg-ls` feature) are decoded
//! with dicom-pixeldata. Stored blobs are never changed; conversion works on
//! a copy in memory.

use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Explicit VR Little Endian: the default of PS3.18 for application/dicom
/// and the syntax every DICOM peer accepts after implicit VR.
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// Deflated Explicit VR Little Endian (PS3.5 A.5): the data set after the
/// file meta group is one raw deflate stream (RFC 1951, no zlib header).
pub const DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1.99";

/// The uncompressed transfer syntaxes (deflate included: its data set
/// codec is built in), in the order the node prefers to convert to.
pub const NATIVE: &[&str] = &[
    EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2",
    // Explicit VR Big Endian (retired, still sent by old modalities).
    "1.2.840.10008.1.2.2",
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
];

pub fn is_native(ts: &str) -> bool {
    NATIVE.contains(&ts)
}

/// Whether dicom-pixeldata can decode this encapsulated syntax with the
/// codecs built in (JPEG baseline and lossless, RLE, and JPEG-LS with the
/// `jpeg-ls` feature; not JPEG extended 12-bit, JPEG 2000).
pub fn is_decodable(ts: &str) -> bool {
    // JPEG Extended is almost always 12-bit, which jpeg-decoder (behind
    // dicom-pixeldata's `jpeg` feature) does not read although the registry
    // lists a decoder for it.
    const JPEG_EXTENDED: &str = "1.2.840.10008.1.2.4.51";
    ts != JPEG_EXTENDED
        && TransferSyntaxRegistry
            .get(ts)
            .is_some_and(|t| t.is_encapsulated_pixel_data() && t.can_decode_all())
}

/// Whether an instance stored in `from` can be served in `to`.
pub fn can_convert(from: &str, to: &str) -> bool {
    from == to || (is_native(to) && (is_native(from) || is_decodable(from)))
}

/// Re-encodes a Part-10 object's data set in another (uncompressed)
/// transfer syntax, decoding encapsulated pixel data with dicom-pixeldata.
/// Returns the data set only (no file meta).
pub fn convert_data_set(part10: Vec<u8>, from: &str, to: &str) -> Result<Vec<u8>, String> {
    convert_into(part10, from, to, Vec::new())
}

/// The data set of `part10` re-encoded in `to`, appended to `out`. The
/// stored bytes are let go once parsed, and `out` is sized for the result
/// up front: at most about twice the instance is held at once (the stored
/// bytes and the parsed object, then the object and the result), where a
/// growing result and the stored bytes kept to the end held about four
/// times (a 314 MB instance took 1.2 GB; second probe, B1).
fn convert_into(
    part10: Vec<u8>,
    from: &str,
    to: &str,
    mut out: Vec<u8>,
) -> Result<Vec<u8>, String> {
    use dicom_pixeldata::Transcode;
    let to_ts = TransferSyntaxRegistry
        .get(to)
        .ok_or_else(|| format!("unknown transfer syntax {to}"))?;
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(part10.as_slice())
        .map_err(|e| format!("cannot read the stored object: {e}"))?;
    // Native to native keeps the size; a decoded image is bigger, and its
    // vector grows once more past this.
    let size_hint = part10.len();
    drop(part10);
    if !is_native(from) {
        obj.transcode(to_ts)
            .map_err(|e| format!("cannot decompress {from} to {to}: {e}"))?;
    }
    byte_samples_as_ob(&mut obj)?;
    out.reserve(size_hint);
    let start = out.len();
    obj.write_dataset_with_ts(&mut out, to_ts)
        .map_err(|e| format!("cannot convert to {to}: {e}"))?;
    drop(obj);
    // A deflate stream ends on any byte, but a data set (and every P-DATA
    // fragment of one) must have an even length: dcmtk's DIMSE layer aborts
    // on an odd one ("DIMSE: Odd Fragment Length"), and dcmtk's own zlib
    // filter pads its deflated output with one zero byte, which an inflater
    // ignores because it comes after the final block.
    if to == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN && (out.len() - start) % 2 == 1 {
        out.push(0);
    }
    Ok(out)
}

/// Native pixel data of at most 8 bits allocated as OB (PS3.5 A.2: OB or
/// OW): decoding JPEG leaves it OW, and an OW value holding bytes is
/// byte-swapped in pairs by every reader of Explicit VR Big Endian, so 8-bit
/// images converted to big endian arrived scrambled (the interop matrix
/// found it: storescp +xb). As OB the bytes are the samples in every
/// syntax.
fn byte_samples_as_ob(obj: &mut dicom_object::DefaultDicomObject) -> Result<(), String> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let bits_allocated = obj
        .get(tags::BITS_ALLOCATED)
        .and_then(|e| e.to_int::<u16>().ok());
    if bits_allocated.is_none_or(|b| b > 8) {
        return Ok(());
    }
    let Some(pixels) = obj.get(tags::PIXEL_DATA) else {
        return Ok(());
    };
    if pixels.vr() != VR::OW || pixels.value().primitive().is_none() {
        return Ok(());
    }
    let bytes = pixels
        .to_bytes()
        .map_err(|e| format!("pixel data: {e}"))?
        .into_owned();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(bytes.into()),
    ));
    Ok(())
}

/// [`convert_data_set`] as a whole Part-10 object, with the node's file
/// meta naming the new transfer syntax.
pub fn convert_part10(
    part10: Vec<u8>,
    sop_class_uid: &str,
    sop_instance_uid: &str,
    from: &str,
    to: &str,
) -> Result<Vec<u8>, String> {
    let parse = |s: &str| crate::types::Uid::parse(s).map_err(|e| e.to_string());
    let meta = crate::part10::file_meta_prefix(
        &parse(sop_class_uid)?,
        &parse(sop_instance_uid)?,
        &parse(to)?,
    );
    convert_into(part10, from, to, meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(rel: &str) -> Vec<u8> {
        std::fs::read(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
    }

    /// Every native target, from a native and from a deflated source: the
    /// result parses back in the target syntax with the same pixel bytes,
    /// and a deflated result is a valid raw deflate stream of even length.
    #[test]
    fn native_conversions_round_trip() {
        let cases = [
            (
                "sample-dicom/p1-ct-chest-2024/1-chest-native/1.dcm",
                EXPLICIT_VR_LITTLE_ENDIAN,
            ),
            (
                "sample-dicom/p3-dx-chest-2023/1-chest-pa/1.dcm",
                DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
            ),
            (
                "sample-dicom/p1-ct-head-2019/2-head-bone/1.dcm",
                "1.2.840.10008.1.2.2",
            ),
        ];
        for (file, from) in cases {
            let part10 = sample(file);
            let reference =
                convert_data_set(part10.clone(), from, EXPLICIT_VR_LITTLE_ENDIAN).unwrap();
            for to in NATIVE {
                let out = convert_data_set(part10.clone(), from, to).unwrap();
                assert_eq!(out.len() % 2, 0, "{file} -> {to}: odd length");
                let parsed = if *to == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN {
                    let mut inflated = Vec::new();
                    flate2::read::DeflateDecoder::new(out.as_slice())
                        .read_to_end(&mut inflated)
                        .unwrap();
                    assert_eq!(
                        inflated, reference,
                        "{file} -> {to}: inflates to explicit VR LE"
                    );
                    inflated
                } else {
                    out
                };
                let ts = if *to == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN {
                    EXPLICIT_VR_LITTLE_ENDIAN
                } else {
                    to
                };
                let back = pixel_bytes(&parsed, ts);
                let want = pixel_bytes(&reference, EXPLICIT_VR_LITTLE_ENDIAN);
                assert_eq!(back, want, "{file} -> {to}: pixel data");
            }
        }
    }

    /// The pixel data of a data set in `ts`, as the machine's bytes (16-bit
    /// words are parsed into numbers, whatever the syntax's byte order).
    fn pixel_bytes(data_set: &[u8], ts: &str) -> Vec<u8> {
        use dicom_dictionary_std::tags;
        let ts = TransferSyntaxRegistry.get(ts).unwrap();
        let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(data_set, ts).unwrap();
        obj.element(tags::PIXEL_DATA)
            .unwrap()
            .to_bytes()
            .unwrap()
            .into_owned()
    }
}
