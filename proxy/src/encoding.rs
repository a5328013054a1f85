//! Content codings: `Accept-Encoding` negotiation (with q-values), the compressors, and which
//! media types are worth compressing. Static files use them for their stored variants, the
//! gateway for large backend responses, the metrics for their `encoding` label.

use std::io::Write;

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
}

impl Encoding {
    pub fn index(self) -> usize {
        self as usize
    }

    /// The `Content-Encoding` token, and the suffix that keeps each variant's ETag distinct.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
        }
    }

    /// The precompressed file that may sit beside the original (nginx `gzip_static`).
    pub fn sidecar_extension(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gz"),
            Encoding::Brotli => Some("br"),
        }
    }

    pub fn compress(self, data: &[u8]) -> Option<Bytes> {
        let mut out = Vec::with_capacity(data.len() / 3);
        match self {
            Encoding::Identity => return None,
            Encoding::Gzip => {
                let mut encoder =
                    flate2::write::GzEncoder::new(&mut out, flate2::Compression::best());
                encoder.write_all(data).ok()?;
                encoder.finish().ok()?;
            }
            Encoding::Brotli => {
                let params = brotli::enc::BrotliEncoderParams {
                    quality: 11,
                    lgwin: 22,
                    ..Default::default()
                };
                brotli::BrotliCompress(&mut &data[..], &mut out, &params).ok()?;
            }
        }
        Some(Bytes::from(out))
    }
}

/// The best coding the client accepts among those we can make, by q-value, preferring
/// brotli on ties. Identity when nothing else is acceptable.
pub fn negotiate(accept_encoding: Option<&[u8]>) -> Encoding {
    let Some(header) = accept_encoding.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Encoding::Identity;
    };
    let (mut gzip, mut brotli, mut star) = (None, None, None);
    for item in header.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim();
        let q = parts
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .or_else(|| p.trim().strip_prefix("Q="))
            })
            .map_or(Some(1.0), |q| {
                q.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))
            });
        let Some(q) = q else { continue };
        if coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip") {
            gzip = Some(q);
        } else if coding.eq_ignore_ascii_case("br") {
            brotli = Some(q);
        } else if coding == "*" {
            star = Some(q);
        }
    }
    let brotli = brotli.or(star).unwrap_or(0.0);
    let gzip = gzip.or(star).unwrap_or(0.0);
    if brotli > 0.0 && brotli >= gzip {
        Encoding::Brotli
    } else if gzip > 0.0 {
        Encoding::Gzip
    } else {
        Encoding::Identity
    }
}

/// Types worth compressing: text and the structured text formats; never images, archives or
/// media, which are compressed already.
pub fn compressible(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(
            mime.split(';').next().unwrap_or(""),
            "application/javascript"
                | "application/json"
                | "application/xml"
                | "application/manifest+json"
                | "application/wasm"
                | "image/svg+xml"
                | "font/ttf"
                | "font/otf"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(header: &str) -> Encoding {
        negotiate(Some(header.as_bytes()))
    }

    #[test]
    fn negotiation_follows_q_values() {
        assert_eq!(negotiate(None), Encoding::Identity);
        assert_eq!(n("gzip"), Encoding::Gzip);
        assert_eq!(n("gzip, deflate, br"), Encoding::Brotli);
        assert_eq!(n("br;q=0.5, gzip"), Encoding::Gzip);
        assert_eq!(n("br;q=0, gzip;q=0"), Encoding::Identity);
        assert_eq!(n("identity"), Encoding::Identity);
        assert_eq!(n("*"), Encoding::Brotli);
        assert_eq!(n("*;q=0.1, br;q=0"), Encoding::Gzip);
        assert_eq!(n("gzip;q=nonsense"), Encoding::Identity);
        assert_eq!(n("zstd, deflate"), Encoding::Identity);
    }

    #[test]
    fn compression_round_trips() {
        let data = b"hello hello hello hello hello hello hello".repeat(20);
        let gz = Encoding::Gzip.compress(&data).unwrap();
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut plain).unwrap();
        assert_eq!(plain, data);
        let br = Encoding::Brotli.compress(&data).unwrap();
        let mut plain = Vec::new();
        brotli::BrotliDecompress(&mut &br[..], &mut plain).unwrap();
        assert_eq!(plain, data);
        assert!(compressible("text/html; charset=utf-8") && !compressible("image/png"));
    }
}
