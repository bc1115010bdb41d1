//! Decoding inputs within limits, tensor conversion, resizing, colour transfer, atomic saving.

use std::fs::File;
use std::io::BufReader;
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

/// Opens `path` for decoding after the checks that need no pixels: a regular file within
/// `limits.max_bytes`, in a format easel reads (from its content, not its name).
fn open_checked(
    path: &Path,
    limits: &Limits,
) -> Result<(ImageReader<BufReader<File>>, image::ImageFormat), EngineError> {
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
    let reader = ImageReader::open(path).map_err(|e| image_error(path, e.to_string()))?;
    let reader = reader.with_guessed_format().map_err(|e| image_error(path, e.to_string()))?;
    match reader.format() {
        Some(format) => Ok((reader, format)),
        None => Err(image_error(path, "not an image easel can read (PNG or JPEG)")),
    }
}

/// Reads `reader`'s size from its header and refuses images over `limits.max_pixels` or empty.
fn checked_dimensions(
    path: &Path,
    reader: ImageReader<BufReader<File>>,
    limits: &Limits,
) -> Result<(u32, u32), EngineError> {
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
    Ok((w, h))
}

/// The `(width, height)` [`load_image`] would decode from `path`, read from the header with the
/// same checks and errors, without decoding a pixel: for planning memory before the decode
/// (the drop-folder daemon's admission). A JPEG cut short after its header passes here and is
/// refused by [`load_image`], which reads the whole file.
pub fn image_dimensions(path: &Path, limits: &Limits) -> Result<(u32, u32), EngineError> {
    let (reader, _) = open_checked(path, limits)?;
    checked_dimensions(path, reader, limits)
}

/// Decodes `path` as an RGB image, refusing files and images larger than `limits`.
///
/// The format is taken from the file's content, not its name, and the pixel count is
/// checked from the header before any pixel is decoded.
pub fn load_image(path: &Path, limits: &Limits) -> Result<RgbImage, EngineError> {
    let (reader, format) = open_checked(path, limits)?;
    if format == image::ImageFormat::Jpeg {
        // The JPEG decoder pads a cut-off scan with grey and reports success, so a file cut
        // short in transit would be painted as if it were whole.
        let bytes = std::fs::read(path).map_err(|e| image_error(path, e.to_string()))?;
        check_jpeg_complete(&bytes)
            .map_err(|reason| image_error(path, format!("cannot decode image: {reason}")))?;
    }
    let (w, h) = checked_dimensions(path, reader, limits)?;
    let (mut reader, _) = open_checked(path, limits)?;
    let mut decode_limits = image::Limits::default();
    decode_limits.max_image_width = Some(w);
    decode_limits.max_image_height = Some(h);
    reader.limits(decode_limits);
    let decoded = reader.decode().map_err(|e| image_error(path, format!("cannot decode image: {e}")))?;
    if decoded.color().has_alpha() {
        tracing::info!(
            path = %path.display(),
            "the image has an alpha channel: transparent parts are painted as white"
        );
        return Ok(over_white(&decoded.to_rgba32f()));
    }
    Ok(decoded.to_rgb32f())
}

/// Composites straight (non-premultiplied) RGBA onto white: a transparent pixel's colour
/// channels are whatever the editor left there, often black or a stale colour, and were
/// never meant to be seen.
fn over_white(rgba: &image::Rgba32FImage) -> RgbImage {
    let (w, h) = rgba.dimensions();
    RgbImage::from_fn(w, h, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = a.clamp(0.0, 1.0);
        image::Rgb([r, g, b].map(|c| c * a + (1.0 - a)))
    })
}

/// Walks a JPEG's marker segments from SOI and succeeds only if it reaches the EOI marker
/// (FF D9) after the image data. Data without the SOI marker is left to the decoder to refuse.
///
/// Segments are skipped by their lengths, so an EXIF thumbnail's own EOI inside APP1 does not
/// count, and whatever follows the EOI (the video of a "motion photo", padding) is allowed.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), String> {
    const TRUNCATED: &str = "truncated JPEG: the data ends before its end-of-image marker (FF D9)";
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(());
    }
    let mut pos = 2;
    loop {
        // Decoders skip stray bytes before a marker (libjpeg warns of "extraneous bytes").
        while pos < bytes.len() && bytes[pos] != 0xFF {
            pos += 1;
        }
        // Any number of FF fill bytes may precede the marker code.
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else { return Err(TRUNCATED.to_string()) };
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            // Markers without a length: TEM, RST0-7, and a repeated SOI.
            0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = bytes.get(pos..pos + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
            return Err(TRUNCATED.to_string());
        };
        if len < 2 {
            return Err(format!("corrupt JPEG: segment FF {marker:02X} has length {len}"));
        }
        pos += len;
        if pos > bytes.len() {
            return Err(TRUNCATED.to_string());
        }
        if marker == 0xDA {
            // Entropy-coded data follows a start-of-scan header; inside it FF is followed by
            // 00 (a stuffed byte) or a restart marker, and anything else ends the scan.
            loop {
                match bytes.get(pos..pos + 2) {
                    None => return Err(TRUNCATED.to_string()),
                    Some([0xFF, next]) if *next != 0x00 && !(0xD0..=0xD7).contains(next) => break,
                    Some(_) => pos += 1,
                }
            }
        }
    }
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
    easel_core::write_atomically(path, &data)
        .map_err(|source| EngineError::Write { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { max_pixels: 50_000_000, max_bytes: 1 << 28, memory_mb: 0 }
    }

    /// A 400x300 baseline JPEG of a smooth gradient, as the image crate encodes it.
    fn jpeg_bytes() -> Vec<u8> {
        let image = image::RgbImage::from_fn(400, 300, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Jpeg).expect("encode");
        out.into_inner()
    }

    fn written(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path
    }

    #[test]
    fn a_jpeg_cut_short_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tmp");
        let jpeg = jpeg_bytes();
        // The image crate alone would decode the cut-off file, grey-filled, without an error.
        let half = &jpeg[..jpeg.len() / 2];
        assert!(image::load_from_memory(half).is_ok(), "the decoder is lenient");
        for cut in [jpeg.len() / 2, jpeg.len() - 2, jpeg.len() - 1, 700] {
            let path = written(dir.path(), "cut.jpg", &jpeg[..cut]);
            let err = load_image(&path, &limits()).expect_err("a cut JPEG fails").to_string();
            assert!(err.contains("cut.jpg: cannot decode image: truncated JPEG"), "cut at {cut}: {err}");
            assert!(err.contains("FF D9"), "{err}");
        }
    }

    #[test]
    fn a_whole_jpeg_loads_even_with_data_after_its_end() {
        let dir = tempfile::tempdir().expect("tmp");
        let jpeg = jpeg_bytes();
        let whole = load_image(&written(dir.path(), "whole.jpg", &jpeg), &limits()).expect("whole");
        assert_eq!(whole.dimensions(), (400, 300));
        // Motion photos append a video after the EOI; padding is also seen in the wild.
        let mut trailing = jpeg.clone();
        trailing.extend_from_slice(b"\0\0\0\x18ftypmp42 and more bytes \xFF\xD8\xFF");
        let loaded = load_image(&written(dir.path(), "motion.jpg", &trailing), &limits()).expect("trailing");
        assert_eq!(loaded.as_raw(), whole.as_raw());
    }

    #[test]
    fn the_header_gives_the_size_load_image_decodes_with_its_checks_and_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let jpeg = written(dir.path(), "photo.jpg", &jpeg_bytes());
        assert_eq!(image_dimensions(&jpeg, &limits()).expect("size"), (400, 300));
        assert_eq!(load_image(&jpeg, &limits()).expect("decodes").dimensions(), (400, 300));
        let small = Limits { max_pixels: 400 * 300 - 1, ..limits() };
        let (header, decode) = (image_dimensions(&jpeg, &small), load_image(&jpeg, &small));
        let header = header.expect_err("over max_pixels").to_string();
        assert_eq!(header, decode.expect_err("over max_pixels").to_string());
        assert!(header.contains("limits.max_pixels"), "{header}");
        let text = written(dir.path(), "notes.png", b"not an image");
        let (header, decode) = (image_dimensions(&text, &limits()), load_image(&text, &limits()));
        assert_eq!(header.expect_err("no image").to_string(), decode.expect_err("no image").to_string());
    }

    #[test]
    fn transparent_pixels_are_white_whatever_colour_they_hide() {
        let dir = tempfile::tempdir().expect("tmp");
        // Left half opaque red; right half fully transparent but hiding pure green; one
        // half-transparent blue pixel.
        let mut rgba = image::RgbaImage::from_fn(8, 4, |x, _| {
            if x < 4 {
                image::Rgba([255, 0, 0, 255])
            } else {
                image::Rgba([0, 255, 0, 0])
            }
        });
        rgba.put_pixel(0, 3, image::Rgba([0, 0, 255, 128]));
        let path = dir.path().join("alpha.png");
        rgba.save(&path).expect("save");
        let loaded = load_image(&path, &limits()).expect("loads");
        assert_eq!(loaded.get_pixel(1, 1).0, [1.0, 0.0, 0.0]);
        for x in 4..8 {
            for y in 0..4 {
                assert_eq!(loaded.get_pixel(x, y).0, [1.0, 1.0, 1.0], "({x}, {y})");
            }
        }
        let half = loaded.get_pixel(0, 3).0;
        let a = 128.0 / 255.0;
        assert!((half[0] - (1.0 - a)).abs() < 1e-6 && (half[2] - 1.0).abs() < 1e-6, "{half:?}");
    }
}
