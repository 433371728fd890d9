//! Transfer syntax conversion on the way out, shared by C-MOVE/C-GET
//! sub-operations and WADO-RS: uncompressed (and deflated) data sets are
//! re-encoded; JPEG baseline, JPEG lossless and RLE pixel data are decoded
//! with dicom-pixeldata. Stored blobs are never changed; conversion works on
//! a copy in memory.

use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Explicit VR Little Endian: the default of PS3.18 for application/dicom
/// and the syntax every DICOM peer accepts after implicit VR.
pub const EXPLICIT_VR_LITTLE_ENDIAN: &str = "1.2.840.10008.1.2.1";

/// The uncompressed transfer syntaxes (deflate included: its data set
/// codec is built in), in the order the node prefers to convert to.
pub const NATIVE: &[&str] = &[
    EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2",
    // Explicit VR Big Endian (retired, still sent by old modalities).
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
];

pub fn is_native(ts: &str) -> bool {
    NATIVE.contains(&ts)
}

/// Whether dicom-pixeldata can decode this encapsulated syntax with the
/// codecs built in (JPEG baseline and lossless, RLE; not JPEG extended
/// 12-bit, JPEG-LS, JPEG 2000).
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
pub fn convert_data_set(part10: &[u8], from: &str, to: &str) -> Result<Vec<u8>, String> {
    use dicom_pixeldata::Transcode;
    let to_ts = TransferSyntaxRegistry
        .get(to)
        .ok_or_else(|| format!("unknown transfer syntax {to}"))?;
    let mut obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(part10)
        .map_err(|e| format!("cannot read the stored object: {e}"))?;
    if !is_native(from) {
        obj.transcode(to_ts)
            .map_err(|e| format!("cannot decompress {from} to {to}: {e}"))?;
    }
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, to_ts)
        .map_err(|e| format!("cannot convert to {to}: {e}"))?;
    Ok(out)
}

/// [`convert_data_set`] as a whole Part-10 object, with the node's file
/// meta naming the new transfer syntax.
pub fn convert_part10(
    part10: &[u8],
    sop_class_uid: &str,
    sop_instance_uid: &str,
    from: &str,
    to: &str,
) -> Result<Vec<u8>, String> {
    let parse = |s: &str| crate::types::Uid::parse(s).map_err(|e| e.to_string());
    let data_set = convert_data_set(part10, from, to)?;
    let mut out = crate::part10::file_meta_prefix(
        &parse(sop_class_uid)?,
        &parse(sop_instance_uid)?,
        &parse(to)?,
    );
    out.extend_from_slice(&data_set);
    Ok(out)
}
