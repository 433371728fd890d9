//! The DICOM JSON model (PS3.18 Annex F): attributes keyed by 8 hex digits,
//! each with its VR and its values; PN as Alphabetic/Ideographic/Phonetic
//! component groups; numbers as JSON numbers; bulk data as a BulkDataURI.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use dicom_core::value::{PrimitiveValue, Value as DicomValue};
use dicom_core::{Tag, VR, header::Header as _};
use dicom_object::InMemDicomObject;
use serde_json::{Map, Value, json};

pub const DICOM_JSON: &str = "application/dicom+json";

pub fn tag_key(tag: Tag) -> String {
    format!("{:04X}{:04X}", tag.group(), tag.element())
}

/// `{"vr": VR, "Value": [...]}`; an empty value has no "Value".
pub fn attr(vr: &str, values: Vec<Value>) -> Value {
    if values.is_empty() {
        json!({ "vr": vr })
    } else {
        json!({ "vr": vr, "Value": values })
    }
}

pub fn sequence(items: Vec<Value>) -> Value {
    attr("SQ", items)
}

pub fn dicom_json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON));
    response
}

/// One value of a textual element in its JSON form.
pub fn value_json(vr: VR, value: &str) -> Value {
    match vr {
        VR::PN => person_name(value),
        VR::IS | VR::SL | VR::SS | VR::UL | VR::US | VR::SV | VR::UV => value
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(value.trim())),
        VR::DS | VR::FL | VR::FD => value
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
            .unwrap_or_else(|| Value::from(value.trim())),
        _ => Value::from(value),
    }
}

/// PS3.18 F.2.2: a person name's `=`-separated component groups.
pub fn person_name(value: &str) -> Value {
    let mut map = Map::new();
    for (group, name) in value
        .split('=')
        .zip(["Alphabetic", "Ideographic", "Phonetic"])
    {
        if !group.is_empty() {
            map.insert(name.into(), Value::from(group));
        }
    }
    Value::Object(map)
}

/// Values of an element given as strings (QIDO-RS results).
pub fn element_json(vr: VR, values: &[String]) -> Value {
    let values = values
        .iter()
        .map(|v| {
            if v.is_empty() && vr != VR::PN {
                Value::Null
            } else {
                value_json(vr, v)
            }
        })
        .collect();
    attr(vr.to_string(), values)
}

/// Whether an element's value goes out as a BulkDataURI rather than
/// inline: pixel data and any binary value of more than 1 KiB.
fn is_bulk(tag: Tag, vr: VR, len: usize) -> bool {
    tag == dicom_dictionary_std::tags::PIXEL_DATA
        || (matches!(
            vr,
            VR::OB | VR::OD | VR::OF | VR::OL | VR::OV | VR::OW | VR::UN
        ) && len > 1024)
}

/// A whole data set (WADO-RS metadata). `bulk_base` is the instance's URL;
/// top-level bulk data becomes `{bulk_base}/bulkdata/{tag}`, nested bulk
/// data is left out (its element keeps its VR, with no value).
pub fn object_json(obj: &InMemDicomObject, bulk_base: Option<&str>) -> Value {
    object_json_in(obj, bulk_base, &[])
}

/// [`object_json`] of a data set or sequence item; `inherited` is the
/// Specific Character Set in force around it (PS3.5 §7.5.3: an item
/// without its own keeps the enclosing one's).
fn object_json_in(obj: &InMemDicomObject, bulk_base: Option<&str>, inherited: &[String]) -> Value {
    let own: Option<Vec<String>> = obj
        .get(dicom_dictionary_std::tags::SPECIFIC_CHARACTER_SET)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| v.to_vec());
    let specific_character_set = own.as_deref().unwrap_or(inherited);
    let mut map = Map::new();
    for element in obj {
        let tag = element.tag();
        let vr = element.vr();
        let value = match element.value() {
            DicomValue::Sequence(seq) => sequence(
                seq.items()
                    .iter()
                    .map(|item| object_json_in(item, None, specific_character_set))
                    .collect(),
            ),
            DicomValue::PixelSequence(_) => bulk(vr, tag, bulk_base),
            DicomValue::Primitive(PrimitiveValue::Empty) => attr(vr.to_string(), vec![]),
            DicomValue::Primitive(v) if is_bulk(tag, vr, v.calculate_byte_len()) => {
                bulk(vr, tag, bulk_base)
            }
            // dicom-json writes IS and DS as strings; PS3.18 F.2.3 wants
            // JSON numbers.
            DicomValue::Primitive(v) if matches!(vr, VR::IS | VR::DS) => {
                let values: Vec<String> = v.to_multi_str().iter().map(|s| s.to_string()).collect();
                element_json(vr, &values)
            }
            // Text written with ISO 2022 code extensions: the characters,
            // not the escapes (src/charset.rs). JSON is Unicode.
            DicomValue::Primitive(v)
                if matches!(
                    vr,
                    VR::PN | VR::LO | VR::SH | VR::ST | VR::LT | VR::UT | VR::UC
                ) && v.to_multi_str().iter().any(|s| s.contains('\u{1b}')) =>
            {
                let scs: Vec<&str> = specific_character_set.iter().map(String::as_str).collect();
                let values: Vec<String> = v
                    .to_multi_str()
                    .iter()
                    .map(|s| {
                        crate::charset::decode_code_extensions(s, &scs)
                            .trim_end_matches([' ', '\0'])
                            .to_string()
                    })
                    .collect();
                element_json(vr, &values)
            }
            DicomValue::Primitive(_) => {
                let mut value =
                    dicom_json::to_value(element).unwrap_or_else(|_| attr(vr.to_string(), vec![]));
                // PS3.18 F.2.5: an empty value among several is null, not
                // "" (`\ISO 2022 IR 58` has an empty first value).
                if let Some(Value::Array(values)) = value.get_mut("Value")
                    && values.len() > 1
                {
                    for v in values.iter_mut() {
                        if v.as_str() == Some("") {
                            *v = Value::Null;
                        }
                    }
                }
                value
            }
        };
        map.insert(tag_key(tag), value);
    }
    Value::Object(map)
}

fn bulk(vr: VR, tag: Tag, bulk_base: Option<&str>) -> Value {
    match bulk_base {
        Some(base) => json!({
            "vr": vr.to_string(),
            "BulkDataURI": format!("{base}/bulkdata/{}", tag_key(tag)),
        }),
        None => json!({ "vr": vr.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_by_vr() {
        let cases = [
            (VR::PN, "Doe^John", json!({"Alphabetic": "Doe^John"})),
            (
                VR::PN,
                "Yamada^Tarou=山田^太郎=やまだ^たろう",
                json!({"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}),
            ),
            (VR::PN, "=王^小明", json!({"Ideographic": "王^小明"})),
            (VR::IS, " 12", json!(12)),
            (VR::DS, "2.5", json!(2.5)),
            (VR::US, "512", json!(512)),
            (VR::UI, "1.2.3", json!("1.2.3")),
            (VR::DA, "20240101", json!("20240101")),
        ];
        for (vr, input, expected) in cases {
            assert_eq!(value_json(vr, input), expected, "{vr} {input}");
        }
        assert_eq!(
            element_json(VR::CS, &["CT".into(), "".into()]),
            json!({"vr": "CS", "Value": ["CT", null]})
        );
        assert_eq!(element_json(VR::LO, &[]), json!({"vr": "LO"}));
    }
}
