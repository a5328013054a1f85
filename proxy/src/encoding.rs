//! Content codings (gzip, brotli, zstd): `Accept-Encoding` negotiation (with q-values), the
//! compressors, and which media types are worth compressing. Static files use them for their stored variants, the
//! gateway for large backend responses, the metrics for their `encoding` label.

use std::io::Write;

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Identity,
    Gzip,
    Brotli,
    Zstd,
}

impl Encoding {
    /// Every coding, in the order of [`Encoding::index`].
    pub const ALL: [Encoding; 4] = [
        Encoding::Identity,
        Encoding::Gzip,
        Encoding::Brotli,
        Encoding::Zstd,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// The `Content-Encoding` token, and the suffix that keeps each variant's ETag distinct.
    pub fn token(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    /// The precompressed file that may sit beside the original (nginx `gzip_static`).
    pub fn sidecar_extension(self) -> Option<&'static str> {
        match self {
            Encoding::Identity => None,
            Encoding::Gzip => Some("gz"),
            Encoding::Brotli => Some("br"),
            Encoding::Zstd => Some("zst"),
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
                    lgwin: brotli_window_bits(data.len()),
                    ..Default::default()
                };
                brotli::BrotliCompress(&mut &data[..], &mut out, &params).ok()?;
            }
            // The highest level without the "ultra" window, whose decoding needs more memory
            // than browsers grant (Chrome decodes windows up to 8 MiB).
            Encoding::Zstd => out = zstd::bulk::compress(data, 19).ok()?,
        }
        Some(Bytes::from(out))
    }
}

/// The best coding the client accepts among those we can make, by q-value, preferring
/// brotli, then zstd, then gzip on ties (brotli at its highest level makes the smallest text,
/// zstd the next). Identity when nothing else is acceptable.
pub fn negotiate(accept_encoding: Option<&[u8]>) -> Encoding {
    let Some(header) = accept_encoding.and_then(|h| std::str::from_utf8(h).ok()) else {
        return Encoding::Identity;
    };
    let (mut gzip, mut brotli, mut zstd, mut star) = (None, None, None, None);
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
        } else if coding.eq_ignore_ascii_case("zstd") {
            zstd = Some(q);
        } else if coding == "*" {
            star = Some(q);
        }
    }
    // In order of preference; the first with the highest q wins.
    let ranked = [
        (Encoding::Brotli, brotli.or(star).unwrap_or(0.0)),
        (Encoding::Zstd, zstd.or(star).unwrap_or(0.0)),
        (Encoding::Gzip, gzip.or(star).unwrap_or(0.0)),
    ];
    let mut best = (Encoding::Identity, 0.0);
    for (encoding, q) in ranked {
        if q > best.1 {
            best = (encoding, q);
        }
    }
    best.0
}

/// The smallest brotli window (`lgwin`) that holds all of `len` bytes, as the `brotli` tool
/// picks for a file, from 10 bits up to the 22 this proxy always used (the tool goes to 24).
/// At quality 11 the encoder's match finder takes eight bytes per window position, and an
/// allocator that hands out reused memory must zero all of it: with the full 4 MiB window,
/// compressing one 21 kB page raised the proxy's resident memory (on mimalloc) by about 60 MB.
/// A window larger than the input finds no match a fitting one misses.
fn brotli_window_bits(len: usize) -> i32 {
    // The encoder keeps 16 bytes of a window for itself (RFC 7932 section 9.1).
    (10..22)
        .find(|bits| (1usize << bits) - 16 >= len)
        .unwrap_or(22)
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
        assert_eq!(n("*;q=0.1, br;q=0"), Encoding::Zstd);
        assert_eq!(n("*;q=0.1, br;q=0, zstd;q=0"), Encoding::Gzip);
        assert_eq!(n("gzip;q=nonsense"), Encoding::Identity);
        assert_eq!(n("zstd, deflate"), Encoding::Zstd);
        assert_eq!(n("gzip, deflate, br, zstd"), Encoding::Brotli);
        assert_eq!(n("br;q=0.5, zstd;q=0.8, gzip;q=0.8"), Encoding::Zstd);
        assert_eq!(n("zstd;q=0.4, gzip;q=0.5"), Encoding::Gzip);
        assert_eq!(n("deflate"), Encoding::Identity);
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
        let zst = Encoding::Zstd.compress(&data).unwrap();
        assert!(zst.len() < data.len() / 4);
        assert_eq!(zstd::stream::decode_all(&zst[..]).unwrap(), data);
        assert!(compressible("text/html; charset=utf-8") && !compressible("image/png"));
    }

    #[test]
    fn brotli_windows_fit_the_file() {
        assert_eq!(brotli_window_bits(0), 10);
        assert_eq!(brotli_window_bits(1008), 10);
        assert_eq!(brotli_window_bits(1009), 11);
        assert_eq!(brotli_window_bits(21_367), 15);
        assert_eq!(brotli_window_bits((1 << 21) - 16), 21);
        assert_eq!(brotli_window_bits(100 << 20), 22);

        // The page shipped, across a window boundary, and text over several windows.
        let page = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../static/main/index.html"
        ))
        .unwrap();
        let lines: Vec<u8> = (0..8_000u32)
            .flat_map(|i| format!("line {} of {}\n", i % 9973, i % 7).into_bytes())
            .collect();
        for data in [&page[..], &page[..1009], &lines[..]] {
            let br = Encoding::Brotli.compress(data).unwrap();
            let mut plain = Vec::new();
            brotli::BrotliDecompress(&mut &br[..], &mut plain).unwrap();
            assert_eq!(plain, data);
        }

        // The fitted window compresses the page no worse than the largest one, but for the
        // stream header, which takes up to 3 bits more to name a smaller window.
        let mut widest = Vec::new();
        let params = brotli::enc::BrotliEncoderParams {
            quality: 11,
            lgwin: 22,
            ..Default::default()
        };
        brotli::BrotliCompress(&mut &page[..], &mut widest, &params).unwrap();
        let fitted = Encoding::Brotli.compress(&page).unwrap();
        assert!(
            fitted.len() <= widest.len() + 1,
            "{} > {}",
            fitted.len(),
            widest.len()
        );
    }
}
