//! Image readings: JPEG and PNG decoded, resized and normalised into an input tensor as the
//! bundle's signed `image` preprocessing says (SPEC §4.4).
//!
//! An image is decoded to 8-bit RGB (alpha dropped, grey expanded), checked against
//! `inputs.max_image_pixels` before any pixel is decoded, resized to the input's height and
//! width with bilinear interpolation (pixel centres aligned, as OpenCV's `INTER_LINEAR` and
//! PyTorch's `align_corners=False`), turned to grey when the input is `gray`
//! (`0.299 R + 0.587 G + 0.114 B`), and each value becomes `(pixel / 255 - mean[c]) / std[c]`,
//! in the input's channel order and layout.

use protocol::bundle::{Channels, ImagePlan};

/// An image file's kind, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Jpeg,
    Png,
}

/// The kind of image `bytes` hold, if they start like a JPEG or PNG file.
pub fn kind(bytes: &[u8]) -> Option<Kind> {
    if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some(Kind::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Kind::Png)
    } else {
        None
    }
}

/// A decoded image: `width * height` RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// Decode a JPEG or PNG image of at most `max_pixels` pixels to RGB.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<Rgb, String> {
    let fits = |w: usize, h: usize| -> Result<(), String> {
        if w == 0 || h == 0 {
            return Err("the image is empty".into());
        }
        if (w as u64).saturating_mul(h as u64) > max_pixels {
            return Err(format!(
                "the image is {w}x{h} pixels; inputs.max_image_pixels is {max_pixels}"
            ));
        }
        Ok(())
    };
    match kind(bytes) {
        Some(Kind::Jpeg) => {
            use zune_core::colorspace::ColorSpace;
            use zune_core::options::DecoderOptions;
            let side = max_pixels.min(1 << 16) as usize;
            // Strict: a truncated or corrupt file is refused, not filled in.
            let options = DecoderOptions::default()
                .set_strict_mode(true)
                .jpeg_set_out_colorspace(ColorSpace::RGB)
                .set_max_width(side)
                .set_max_height(side);
            let mut d = zune_jpeg::JpegDecoder::new_with_options(std::io::Cursor::new(bytes), options);
            d.decode_headers().map_err(|e| format!("not a readable JPEG: {e:?}"))?;
            let (w, h) = d.dimensions().ok_or("not a readable JPEG: no dimensions")?;
            fits(w, h)?;
            let pixels = d.decode().map_err(|e| format!("not a readable JPEG: {e:?}"))?;
            if pixels.len() != w * h * 3 {
                return Err(format!(
                    "not a readable JPEG: {} bytes decoded for {w}x{h} RGB",
                    pixels.len()
                ));
            }
            Ok(Rgb {
                width: w,
                height: h,
                pixels,
            })
        }
        Some(Kind::Png) => {
            let limits = png::Limits {
                bytes: usize::try_from(max_pixels.saturating_mul(8)).unwrap_or(usize::MAX),
            };
            let mut d = png::Decoder::new_with_limits(std::io::Cursor::new(bytes), limits);
            d.set_transformations(png::Transformations::normalize_to_color8());
            let mut reader = d.read_info().map_err(|e| format!("not a readable PNG: {e}"))?;
            let (w, h) = {
                let info = reader.info();
                (info.width as usize, info.height as usize)
            };
            fits(w, h)?;
            let size = reader.output_buffer_size().ok_or("not a readable PNG: too large")?;
            let mut buf = vec![0u8; size];
            let frame = reader
                .next_frame(&mut buf)
                .map_err(|e| format!("not a readable PNG: {e}"))?;
            buf.truncate(frame.buffer_size());
            let step = match frame.color_type {
                png::ColorType::Grayscale => 1,
                png::ColorType::GrayscaleAlpha => 2,
                png::ColorType::Rgb => 3,
                png::ColorType::Rgba => 4,
                png::ColorType::Indexed => return Err("not a readable PNG: palette not expanded".into()),
            };
            let mut pixels = Vec::with_capacity(w * h * 3);
            for row in buf.chunks_exact(frame.line_size).take(h) {
                for px in row[..w * step].chunks_exact(step) {
                    if step < 3 {
                        pixels.extend_from_slice(&[px[0], px[0], px[0]]);
                    } else {
                        pixels.extend_from_slice(&px[..3]);
                    }
                }
            }
            if pixels.len() != w * h * 3 {
                return Err("not a readable PNG: the image data is short".into());
            }
            Ok(Rgb {
                width: w,
                height: h,
                pixels,
            })
        }
        None => Err("not a JPEG or PNG image".into()),
    }
}

/// Resize, convert and normalise `img` into `out` (the input's values, `plan.height *
/// plan.width * channels` of them), in the plan's layout.
pub fn to_tensor(img: &Rgb, plan: &ImagePlan, out: &mut [f32]) {
    let (h, w, c) = (plan.height, plan.width, plan.channels.count());
    debug_assert_eq!(out.len(), h * w * c);
    let xs = axis(img.width, w);
    let ys = axis(img.height, h);
    let at = |y: usize, x: usize| -> [f32; 3] {
        let p = &img.pixels[(y * img.width + x) * 3..][..3];
        [f32::from(p[0]), f32::from(p[1]), f32::from(p[2])]
    };
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            let (a, b, cc, d) = (at(y0, x0), at(y0, x1), at(y1, x0), at(y1, x1));
            let mut rgb = [0f32; 3];
            for k in 0..3 {
                let top = a[k] + (b[k] - a[k]) * fx;
                let bottom = cc[k] + (d[k] - cc[k]) * fx;
                rgb[k] = top + (bottom - top) * fy;
            }
            let values: [f32; 3] = match plan.channels {
                Channels::Rgb => rgb,
                Channels::Bgr => [rgb[2], rgb[1], rgb[0]],
                Channels::Gray => [0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2], 0.0, 0.0],
            };
            for (ch, v) in values.iter().take(c).enumerate() {
                let x = (v / 255.0 - plan.mean[ch]) / plan.std[ch];
                let i = if plan.planar {
                    ch * h * w + oy * w + ox
                } else {
                    (oy * w + ox) * c + ch
                };
                out[i] = x;
            }
        }
    }
}

/// For each output position along an axis of `to` pixels, the two source pixels and the
/// weight of the second: half-pixel centres, clamped at the edges.
fn axis(from: usize, to: usize) -> Vec<(usize, usize, f32)> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(from - 1);
            let i1 = (i0 + 1).min(from - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

/// Decode `bytes` and write the input's values into `out`.
pub fn preprocess(bytes: &[u8], plan: &ImagePlan, max_pixels: u64, out: &mut [f32]) -> Result<(), String> {
    let img = decode(bytes, max_pixels)?;
    to_tensor(&img, plan, out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(channels: Channels, planar: bool, h: usize, w: usize) -> ImagePlan {
        let c = channels.count();
        ImagePlan {
            height: h,
            width: w,
            channels,
            planar,
            mean: vec![0.0; c],
            std: vec![1.0 / 255.0; c],
        }
    }

    fn png(w: u32, h: u32, color: png::ColorType, data: &[u8]) -> Vec<u8> {
        let mut out = vec![];
        {
            let mut e = png::Encoder::new(&mut out, w, h);
            e.set_color(color);
            e.set_depth(png::BitDepth::Eight);
            let mut writer = e.write_header().expect("header");
            writer.write_image_data(data).expect("data");
        }
        out
    }

    fn same(got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-3),
            "{got:?} vs {want:?}"
        );
    }

    #[test]
    fn png_pixels_come_out_exactly_in_each_layout_and_order() {
        // 2x1: a red pixel, then a blue one.
        let bytes = png(2, 1, png::ColorType::Rgb, &[255, 0, 0, 0, 0, 255]);
        assert_eq!(kind(&bytes), Some(Kind::Png));
        let mut out = vec![0.0; 6];
        preprocess(&bytes, &plan(Channels::Rgb, true, 1, 2), 100, &mut out).expect("decodes");
        same(&out, &[255.0, 0.0, 0.0, 0.0, 0.0, 255.0]);
        preprocess(&bytes, &plan(Channels::Bgr, false, 1, 2), 100, &mut out).expect("decodes");
        same(&out, &[0.0, 0.0, 255.0, 255.0, 0.0, 0.0]);
        let mut grey = vec![0.0; 2];
        preprocess(&bytes, &plan(Channels::Gray, true, 1, 2), 100, &mut grey).expect("decodes");
        assert!((grey[0] - 0.299 * 255.0).abs() < 1e-3 && (grey[1] - 0.114 * 255.0).abs() < 1e-3);
        // Grey and alpha PNGs expand to RGB.
        let ga = png(1, 1, png::ColorType::GrayscaleAlpha, &[7, 0]);
        assert_eq!(decode(&ga, 1).expect("decodes").pixels, [7, 7, 7]);
    }

    #[test]
    fn normalisation_uses_mean_and_std_per_channel() {
        let bytes = png(1, 1, png::ColorType::Rgb, &[255, 51, 0]);
        let p = ImagePlan {
            mean: vec![0.5, 0.0, 1.0],
            std: vec![0.5, 0.1, 2.0],
            ..plan(Channels::Rgb, true, 1, 1)
        };
        let mut out = vec![0.0; 3];
        preprocess(&bytes, &p, 1, &mut out).expect("decodes");
        let want = [1.0, 2.0, -0.5];
        for (o, w) in out.iter().zip(want) {
            assert!((o - w).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn resizing_is_bilinear_with_centred_pixels() {
        // A 4x1 ramp 0, 100, 200, 240 halved: each output pixel is the mean of two.
        let bytes = png(4, 1, png::ColorType::Grayscale, &[0, 100, 200, 240]);
        let mut out = vec![0.0; 2];
        preprocess(&bytes, &plan(Channels::Gray, true, 1, 2), 100, &mut out).expect("decodes");
        assert!((out[0] - 50.0).abs() < 1e-3 && (out[1] - 220.0).abs() < 1e-3, "{out:?}");
        // A uniform image stays uniform at any size.
        let flat = png(3, 5, png::ColorType::Rgb, &[9u8; 45]);
        let mut out = vec![0.0; 7 * 4 * 3];
        preprocess(&flat, &plan(Channels::Rgb, false, 7, 4), 100, &mut out).expect("decodes");
        assert!(out.iter().all(|v| (v - 9.0).abs() < 1e-4), "{out:?}");
    }

    #[test]
    fn oversized_and_broken_images_are_refused_before_decoding() {
        let bytes = png(100, 100, png::ColorType::Grayscale, &[0u8; 10_000]);
        let e = decode(&bytes, 9_999).expect_err("too many pixels");
        assert!(e.contains("100x100") && e.contains("max_image_pixels"), "{e}");
        assert!(decode(&bytes[..bytes.len() / 2], 10_000).is_err());
        let jpeg = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/images/part-0.jpg")).expect("jpeg");
        assert!(decode(&jpeg, 10_000).is_ok());
        let e = decode(&jpeg[..jpeg.len() / 2], 10_000).expect_err("a truncated JPEG");
        assert!(e.contains("not a readable JPEG"), "{e}");
        assert!(decode(b"\xff\xd8\xff\xe0 not really", 10_000)
            .expect_err("broken JPEG")
            .contains("JPEG"));
        assert_eq!(decode(b"GIF89a", 10).expect_err("gif"), "not a JPEG or PNG image");
    }
}
