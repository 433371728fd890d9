//! Rendered and thumbnail resources (PS3.18 §10.4.1.1.3 and §8.3.5.1):
//! a frame decoded by dicom-pixeldata (native, JPEG and RLE transfer
//! syntaxes), the VOI window applied (the `window` parameter, else the
//! instance's own first window, else min-max), scaled to `viewport`, and
//! encoded as JPEG (default) or PNG.

use std::sync::Arc;

use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use dicom_pixeldata::image::{DynamicImage, ImageFormat, codecs::jpeg::JpegEncoder};
use dicom_pixeldata::{ConvertOptions, PixelDecoder, VoiLutFunction, VoiLutOption, WindowLevel};

use super::wado::{locate, locate_in, native_frames, open_object, open_object_full};
use super::{DicomwebState, media};
use crate::http::error::Error;

type Params = UrlQuery<Vec<(String, String)>>;

/// Thumbnails fit in this square unless `viewport` says otherwise.
const THUMBNAIL_SIZE: u32 = 128;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Jpeg,
    Png,
}

#[derive(Debug, Clone, PartialEq)]
struct Options {
    format: Format,
    quality: u8,
    window: Option<(WindowLevel, VoiLutFunction)>,
    viewport: Option<(u32, u32)>,
}

fn options(
    headers: &HeaderMap,
    params: &[(String, String)],
    thumbnail: bool,
) -> Result<Options, Error> {
    let bad = |m: String| Error::BadRequest(m);
    let format = media::accept(headers)
        .iter()
        .find_map(|r| {
            if r.admits("image/jpeg") {
                Some(Format::Jpeg)
            } else if r.admits("image/png") {
                Some(Format::Png)
            } else {
                None
            }
        })
        .ok_or_else(|| Error::NotAcceptable("rendered as image/jpeg or image/png only".into()))?;
    let mut out = Options {
        format,
        quality: 90,
        window: None,
        viewport: thumbnail.then_some((THUMBNAIL_SIZE, THUMBNAIL_SIZE)),
    };
    for (name, value) in params {
        match name.as_str() {
            "quality" => {
                out.quality = value
                    .parse::<u8>()
                    .ok()
                    .filter(|q| (1..=100).contains(q))
                    .ok_or_else(|| bad(format!("quality={value}: 1 to 100")))?
            }
            "window" => {
                let parts: Vec<&str> = value.split(',').map(str::trim).collect();
                // Finite numbers only: "nan" and "inf" parse as f64.
                let number = |s: &str| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite())
                        .ok_or_else(|| bad(format!("window={value}: center,width,function")))
                };
                if parts.len() < 2 || parts.len() > 3 {
                    return Err(bad(format!("window={value}: center,width,function")));
                }
                let center = number(parts[0])?;
                let width = number(parts[1])?;
                let function = match parts.get(2).map(|f| f.to_ascii_uppercase()) {
                    None => VoiLutFunction::Linear,
                    Some(f) if f == "LINEAR" => VoiLutFunction::Linear,
                    Some(f) if f == "LINEAR_EXACT" => VoiLutFunction::LinearExact,
                    Some(f) if f == "SIGMOID" => VoiLutFunction::Sigmoid,
                    Some(f) => {
                        return Err(bad(format!(
                            "window function {f}: LINEAR, LINEAR_EXACT or SIGMOID"
                        )));
                    }
                };
                // PS3.3 C.11.2.1.2.1 and C.11.2.1.3.2: at least 1 for
                // LINEAR and SIGMOID, above 0 for LINEAR_EXACT.
                let least_ok = match function {
                    VoiLutFunction::LinearExact => width > 0.0,
                    _ => width >= 1.0,
                };
                if !least_ok {
                    return Err(bad(format!(
                        "window={value}: width must be at least 1 (above 0 for LINEAR_EXACT)"
                    )));
                }
                out.window = Some((WindowLevel { center, width }, function));
            }
            "viewport" => {
                let dims: Vec<u32> = value
                    .split(',')
                    .map(|s| s.trim().parse::<u32>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad(format!("viewport={value}: width,height")))?;
                match dims.as_slice() {
                    [w, h] if *w > 0 && *h > 0 && *w <= 8192 && *h <= 8192 => {
                        out.viewport = Some((*w, *h))
                    }
                    _ => return Err(bad(format!("viewport={value}: width,height in 1..=8192"))),
                }
            }
            // Recognised by PS3.18 but not applied.
            "annotation" | "charset" | "accept" => {}
            other => return Err(bad(format!("{other}: not a rendering parameter"))),
        }
    }
    Ok(out)
}

pub async fn instance_rendered(
    s: State<Arc<DicomwebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    render(s, h, p, study, series, instance, 1, false).await
}

pub async fn instance_thumbnail(
    s: State<Arc<DicomwebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    render(s, h, p, study, series, instance, 1, true).await
}

fn single_frame(frames: &str) -> Result<u32, Error> {
    frames
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| Error::BadRequest(format!("frame {frames:?}: one 1-based frame number")))
}

pub async fn frame_rendered(
    s: State<Arc<DicomwebState>>,
    Path((study, series, instance, frames)): Path<(String, String, String, String)>,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    let frame = single_frame(&frames)?;
    render(s, h, p, study, series, instance, frame, false).await
}

pub async fn frame_thumbnail(
    s: State<Arc<DicomwebState>>,
    Path((study, series, instance, frames)): Path<(String, String, String, String)>,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    let frame = single_frame(&frames)?;
    render(s, h, p, study, series, instance, frame, true).await
}

/// For native pixel data, the instance's header with only the one frame
/// to render as its pixel data: a large multi-frame instance is not read
/// whole. `None` for other transfer syntaxes.
async fn single_native_frame(
    store: &crate::storage::BlobStore,
    loc: &crate::query::InstanceLocation,
    frame: u32,
) -> Result<Option<dicom_object::DefaultDicomObject>, Error> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    let Some(mut frames) = native_frames(store, loc, vec![frame as usize]).await? else {
        return Ok(None);
    };
    let mut obj = open_object(store, loc, Some(tags::PIXEL_DATA)).await?;
    let bits = obj
        .get(tags::BITS_ALLOCATED)
        .and_then(|e| e.to_int::<u16>().ok())
        .unwrap_or(8);
    let pixels = frames.remove(0);
    let value = if bits > 8 {
        let words = pixels
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect::<Vec<u16>>();
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into()))
    } else {
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::from(pixels))
    };
    obj.put(value);
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    Ok(Some(obj))
}

#[allow(clippy::too_many_arguments)]
async fn render(
    State(state): State<Arc<DicomwebState>>,
    headers: HeaderMap,
    UrlQuery(params): Params,
    study: String,
    series: String,
    instance: String,
    frame: u32,
    thumbnail: bool,
) -> Result<Response, Error> {
    let options = options(&headers, &params, thumbnail)?;
    let loc = locate(&state, &study, Some(&series), Some(&instance))
        .await?
        .remove(0);
    let (obj, frame) = match single_native_frame(state.ingest.store(), &loc, frame).await? {
        Some(obj) => (obj, 1),
        None => (open_object_full(state.ingest.store(), &loc).await?, frame),
    };
    let format = options.format;
    let encoded = tokio::task::spawn_blocking(move || encode(&obj, frame, &options))
        .await
        .map_err(|e| Error::Internal(format!("render task: {e}")))??;
    let content_type = match format {
        Format::Jpeg => "image/jpeg",
        Format::Png => "image/png",
    };
    let mut response = encoded.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// A series' thumbnail for the doctor's page (issue 19): its middle
/// instance in instance order (a CT's middle slice says more than its
/// first), rendered as a JPEG that fits `size`×`size`, with the instance's
/// own window. Returns the blob hash it was drawn from (the page caches by
/// it: content-addressed, so a cached thumbnail is never stale) and the
/// JPEG.
pub async fn series_thumbnail(
    ingest: &crate::ingest::Ingest,
    study: &str,
    series: &str,
    size: u32,
    cached: impl FnOnce(&crate::types::BlobHash) -> Option<Arc<Vec<u8>>>,
) -> Result<(crate::types::BlobHash, Arc<Vec<u8>>), Error> {
    // In series and instance order (the matcher's).
    let mut found = locate_in(ingest.index(), study, Some(series), None).await?;
    let loc = found.swap_remove(found.len() / 2);
    if let Some(jpeg) = cached(&loc.blob_hash) {
        return Ok((loc.blob_hash, jpeg));
    }
    let obj = match single_native_frame(ingest.store(), &loc, 1).await? {
        Some(obj) => obj,
        None => open_object_full(ingest.store(), &loc).await?,
    };
    let options = Options {
        format: Format::Jpeg,
        quality: 80,
        window: None,
        viewport: Some((size, size)),
    };
    let jpeg = tokio::task::spawn_blocking(move || encode(&obj, 1, &options))
        .await
        .map_err(|e| Error::Internal(format!("render task: {e}")))??;
    Ok((loc.blob_hash, Arc::new(jpeg)))
}

fn encode(
    obj: &dicom_object::DefaultDicomObject,
    frame: u32,
    options: &Options,
) -> Result<Vec<u8>, Error> {
    let frames = obj
        .get(dicom_dictionary_std::tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1);
    if frame > frames.max(1) {
        return Err(Error::NotFound("frame"));
    }
    let decoded = obj
        .decode_pixel_data_frame(frame - 1)
        .map_err(|e| Error::NotAcceptable(format!("this instance cannot be rendered: {e}")))?;
    let voi = match options.window {
        Some((window, function)) => VoiLutOption::CustomWithFunction(window, function),
        None => VoiLutOption::First,
    };
    let convert = ConvertOptions::new().with_voi_lut(voi).force_8bit();
    let mut image = decoded
        .to_dynamic_image_with_options(0, &convert)
        .map_err(|e| Error::NotAcceptable(format!("this instance cannot be rendered: {e}")))?;
    if let Some((w, h)) = options.viewport
        && (image.width() > w
            || image.height() > h
            || !matches!(options.viewport, Some((THUMBNAIL_SIZE, THUMBNAIL_SIZE))))
    {
        image = image.resize(w, h, dicom_pixeldata::image::imageops::FilterType::Triangle);
    }
    let image = match image {
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageRgb8(_) => image,
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => DynamicImage::ImageLuma8(image.to_luma8()),
        other => DynamicImage::ImageRgb8(other.to_rgb8()),
    };
    let mut out = Vec::new();
    let result = match options.format {
        Format::Jpeg => {
            image.write_with_encoder(JpegEncoder::new_with_quality(&mut out, options.quality))
        }
        Format::Png => image.write_to(&mut std::io::Cursor::new(&mut out), ImageFormat::Png),
    };
    result.map_err(|e| Error::Internal(format!("image encoding: {e}")))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn rendering_parameters() {
        let mut png = HeaderMap::new();
        png.insert(header::ACCEPT, "image/png".parse().unwrap());
        let o = options(
            &png,
            &p(&[("window", "40,400"), ("viewport", "64,64")]),
            false,
        )
        .unwrap();
        assert_eq!(o.format, Format::Png);
        assert_eq!(o.viewport, Some((64, 64)));
        assert_eq!(o.window.unwrap().0.width, 400.0);
        let o = options(&HeaderMap::new(), &[], true).unwrap();
        assert_eq!((o.format, o.viewport), (Format::Jpeg, Some((128, 128))));
        let mut gif = HeaderMap::new();
        gif.insert(header::ACCEPT, "image/gif".parse().unwrap());
        assert_eq!(
            options(&gif, &[], false).unwrap_err().status().as_u16(),
            406
        );
        for bad in [
            ("window", "40"),
            ("window", "40,0"),
            ("window", "nan,400"),
            ("window", "40,nan"),
            ("window", "40,inf"),
            ("window", "40,0.5"),
            ("window", "40,1e-320"),
            ("quality", "0"),
            ("viewport", "0,1"),
            ("bogus", "1"),
        ] {
            assert_eq!(
                options(&HeaderMap::new(), &p(&[bad]), false)
                    .unwrap_err()
                    .status()
                    .as_u16(),
                400,
                "{bad:?}"
            );
        }
    }
}
