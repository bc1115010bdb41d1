//! Decoding inputs within limits, tensor conversion, resizing, colour transfer, atomic saving.

use std::path::Path;

use candle_core::{Device, Tensor};
use easel_config::{Limits, OutputFormat};
use image::{ImageReader, Rgb32FImage};

use crate::EngineError;

/// An RGB image with f32 samples in [0, 1].
pub type RgbImage = Rgb32FImage;

fn image_error(path: &Path, reason: impl Into<String>) -> EngineError {
    EngineError::Image { path: path.to_path_buf(), reason: reason.into() }
}

/// Decodes `path` as an RGB image, refusing files and images larger than `limits`.
///
/// The format is taken from the file's content, not its name, and the pixel count is
/// checked from the header before any pixel is decoded.
pub fn load_image(path: &Path, limits: &Limits) -> Result<RgbImage, EngineError> {
    let meta = std::fs::metadata(path).map_err(|e| image_error(path, e.to_string()))?;
    if !meta.is_file() {
        return Err(image_error(path, "not a regular file"));
    }
    if meta.len() > limits.max_bytes {
        return Err(image_error(
            path,
            format!(
                "file is {} bytes, over the limit of {} (limits.max_bytes)",
                meta.len(),
                limits.max_bytes
            ),
        ));
    }
    let open = || -> Result<ImageReader<_>, EngineError> {
        let reader = ImageReader::open(path).map_err(|e| image_error(path, e.to_string()))?;
        reader.with_guessed_format().map_err(|e| image_error(path, e.to_string()))
    };
    let reader = open()?;
    if reader.format().is_none() {
        return Err(image_error(path, "not an image easel can read (PNG or JPEG)"));
    }
    let (w, h) =
        reader.into_dimensions().map_err(|e| image_error(path, format!("cannot decode image: {e}")))?;
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        return Err(image_error(
            path,
            format!(
                "image is {w}x{h} = {pixels} pixels, over the limit of {} (limits.max_pixels)",
                limits.max_pixels
            ),
        ));
    }
    if w == 0 || h == 0 {
        return Err(image_error(path, "image has no pixels"));
    }
    let mut reader = open()?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(w);
    decode_limits.max_image_height = Some(h);
    reader.limits(decode_limits);
    let decoded = reader.decode().map_err(|e| image_error(path, format!("cannot decode image: {e}")))?;
    Ok(decoded.to_rgb32f())
}

/// Resizes so that the longest edge is `longest` pixels (Lanczos3); unchanged if it already is.
pub fn resize_longest(image: &RgbImage, longest: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let scale = longest as f64 / w.max(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    resize_exact(image, nw, nh)
}

/// Resizes to exactly `width` x `height` (Lanczos3); unchanged if it already has that size.
pub fn resize_exact(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    if image.dimensions() == (width, height) {
        return image.clone();
    }
    image::imageops::resize(image, width, height, image::imageops::FilterType::Lanczos3)
}

/// The image as a `[1, 3, H, W]` f32 tensor.
pub fn to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor, EngineError> {
    let (w, h) = image.dimensions();
    let hwc = Tensor::from_slice(image.as_raw(), (h as usize, w as usize, 3), device)?;
    Ok(hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

/// A `[1, 3, H, W]` tensor as an image, clamped to [0, 1].
pub fn from_tensor(tensor: &Tensor) -> Result<RgbImage, EngineError> {
    let (_, _, h, w) = tensor.dims4()?;
    let hwc = tensor.squeeze(0)?.permute((1, 2, 0))?.clamp(0f32, 1f32)?.flatten_all()?.to_vec1::<f32>()?;
    RgbImage::from_raw(w as u32, h as u32, hwc).ok_or_else(|| {
        EngineError::Shape(format!("a {w}x{h} image cannot hold a tensor of shape {:?}", tensor.dims()))
    })
}

/// Keeps the luminance of `styled` and the chrominance of `content` (YIQ), so the result has
/// the photo's colours and the painting's strokes.
pub fn transfer_luminance(styled: &RgbImage, content: &RgbImage) -> RgbImage {
    let (w, h) = styled.dimensions();
    let content = resize_exact(content, w, h);
    let mut out = styled.clone();
    for (o, c) in out.pixels_mut().zip(content.pixels()) {
        let y = 0.299 * o[0] + 0.587 * o[1] + 0.114 * o[2];
        let i = 0.596 * c[0] - 0.274 * c[1] - 0.322 * c[2];
        let q = 0.211 * c[0] - 0.523 * c[1] + 0.312 * c[2];
        let rgb = [y + 0.956 * i + 0.621 * q, y - 0.272 * i - 0.647 * q, y - 1.106 * i + 1.703 * q];
        o.0 = rgb.map(|v| v.clamp(0.0, 1.0));
    }
    out
}

/// The output format for a file name, from its extension.
pub fn format_for(path: &Path) -> Option<OutputFormat> {
    match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
        "png" => Some(OutputFormat::Png),
        "jpg" | "jpeg" => Some(OutputFormat::Jpeg),
        _ => None,
    }
}

fn encode(
    image: &RgbImage,
    format: OutputFormat,
    quality: u8,
    text: &[(&str, String)],
) -> Result<Vec<u8>, String> {
    let (w, h) = image.dimensions();
    let bytes: Vec<u8> = image.as_raw().iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    let mut out = Vec::new();
    match format {
        OutputFormat::Png => {
            let mut encoder = png::Encoder::new(&mut out, w, h);
            encoder.set_color(png::ColorType::Rgb);
            encoder.set_depth(png::BitDepth::Eight);
            for (key, value) in text {
                encoder.add_itxt_chunk(key.to_string(), value.clone()).map_err(|e| e.to_string())?;
            }
            let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
            writer.write_image_data(&bytes).map_err(|e| e.to_string())?;
            writer.finish().map_err(|e| e.to_string())?;
        }
        OutputFormat::Jpeg => {
            let encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            image::ImageEncoder::write_image(encoder, &bytes, w, h, image::ExtendedColorType::Rgb8)
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(out)
}

/// Encodes and writes `image` to a temp file beside `path`, syncs it, then renames it into
/// place, so `path` never holds a partial image. PNG results carry `text` as iTXt chunks.
pub fn save_image(
    image: &RgbImage,
    path: &Path,
    format: OutputFormat,
    jpeg_quality: u8,
    text: &[(&str, String)],
) -> Result<(), EngineError> {
    let fail = |reason: String| EngineError::Output { path: path.to_path_buf(), reason };
    let data = encode(image, format, jpeg_quality, text).map_err(fail)?;
    easel_core::write_atomically(path, &data).map_err(|e| fail(e.to_string()))
}
