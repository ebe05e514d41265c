//! The four codecs Kafka clients use for record batches: gzip, snappy, lz4
//! and zstd, as Kafka writes them. The codec is the low three bits of a
//! batch's attributes and covers everything after the 61-byte header.
//!
//! - snappy: the Java client writes xerial's framing (a magic header, then
//!   length-prefixed raw blocks); other clients write one raw block. Both
//!   are read; xerial framing is written, as Kafka does.
//! - lz4: the LZ4 frame format.
//! - zstd and gzip: their standard frames.
//!
//! Decompression is bounded: output past `max_bytes` is a
//! [`BatchError::DecompressedTooLarge`], never an allocation that size.

use std::io::Read;

use crate::batch::BatchError;

/// A batch's codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Compression {
    /// Records stored as they are.
    #[default]
    None,
    /// gzip (deflate).
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4 frame.
    Lz4,
    /// Zstandard.
    Zstd,
}

const XERIAL_MAGIC: &[u8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;
const XERIAL_BLOCK: usize = 32 * 1024;

impl Compression {
    /// The codec of a batch's attributes, or `UnknownCompression`.
    pub fn from_attributes(attributes: i16) -> Result<Compression, BatchError> {
        match attributes & 0x7 {
            0 => Ok(Compression::None),
            1 => Ok(Compression::Gzip),
            2 => Ok(Compression::Snappy),
            3 => Ok(Compression::Lz4),
            4 => Ok(Compression::Zstd),
            other => Err(BatchError::UnknownCompression(other as u8)),
        }
    }

    /// The codec's bits in a batch's attributes.
    pub fn attribute_bits(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// Kafka's name: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Compresses `data` (a batch's records).
    pub fn compress(self, data: &[u8]) -> Vec<u8> {
        match self {
            Compression::None => data.to_vec(),
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                std::io::Write::write_all(&mut e, data).expect("writing to a Vec");
                e.finish().expect("writing to a Vec")
            }
            Compression::Snappy => xerial_compress(data),
            Compression::Lz4 => {
                let mut e = lz4_flex::frame::FrameEncoder::new(Vec::new());
                std::io::Write::write_all(&mut e, data).expect("writing to a Vec");
                e.finish().expect("writing to a Vec")
            }
            Compression::Zstd => zstd::bulk::compress(data, 3).expect("zstd compresses any input"),
        }
    }

    /// Decompresses `data`, refusing output longer than `max_bytes`.
    pub fn decompress(self, data: &[u8], max_bytes: usize) -> Result<Vec<u8>, BatchError> {
        let bad = |reason: String| BatchError::Decompression { codec: self.name(), reason };
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Gzip => read_bounded(flate2::read::GzDecoder::new(data), max_bytes, self),
            Compression::Lz4 => match lz4_independent_blocks(data, max_bytes) {
                Some(out) => out,
                // Linked blocks or a dictionary: the general decoder.
                None => read_bounded(lz4_flex::frame::FrameDecoder::new(data), max_bytes, self),
            },
            Compression::Zstd => {
                let decoder = zstd::stream::read::Decoder::new(data).map_err(|e| bad(e.to_string()))?;
                read_bounded(decoder, max_bytes, self)
            }
            Compression::Snappy if data.starts_with(XERIAL_MAGIC) => xerial_decompress(data, max_bytes),
            Compression::Snappy => snappy_block(data, max_bytes),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(format!("`{other}` is not a codec: none, gzip, snappy, lz4 or zstd")),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Reads all of `reader`, refusing more than `max_bytes`.
fn read_bounded(reader: impl Read, max_bytes: usize, codec: Compression) -> Result<Vec<u8>, BatchError> {
    let mut out = Vec::new();
    let limit = u64::try_from(max_bytes).unwrap_or(u64::MAX).saturating_add(1);
    reader
        .take(limit)
        .read_to_end(&mut out)
        .map_err(|e| BatchError::Decompression { codec: codec.name(), reason: e.to_string() })?;
    if out.len() > max_bytes {
        return Err(BatchError::DecompressedTooLarge { limit: max_bytes });
    }
    Ok(out)
}

/// Decodes an LZ4 frame of independent blocks (what Kafka clients write)
/// block by block straight into the output, or `None` for a frame this
/// fast path does not take (linked blocks, a dictionary). Checksums inside
/// the frame are not verified: the batch's CRC-32C already covers every
/// byte of it.
fn lz4_independent_blocks(data: &[u8], max_bytes: usize) -> Option<Result<Vec<u8>, BatchError>> {
    const MAGIC: [u8; 4] = [0x04, 0x22, 0x4d, 0x18];
    let bad = |reason: &str| Some(Err(BatchError::Decompression { codec: "lz4", reason: reason.to_string() }));
    if data.len() < 7 || data[..4] != MAGIC {
        return None;
    }
    let (flg, bd) = (data[4], data[5]);
    let independent = flg & 0x20 != 0;
    let (block_checksum, content_size, content_checksum, dictionary) =
        (flg & 0x10 != 0, flg & 0x08 != 0, flg & 0x04 != 0, flg & 0x01 != 0);
    if flg >> 6 != 0b01 || !independent || dictionary {
        return None;
    }
    let max_block = match (bd >> 4) & 0x7 {
        4 => 64 << 10,
        5 => 256 << 10,
        6 => 1 << 20,
        7 => 4 << 20,
        _ => return bad("bad block size in the frame descriptor"),
    };
    let mut pos = 6 + if content_size { 8 } else { 0 } + 1; // descriptor, then its checksum byte
    let mut out: Vec<u8> = Vec::new();
    loop {
        let Some(size) = data.get(pos..pos + 4) else { return bad("frame truncated") };
        let size = u32::from_le_bytes(size.try_into().expect("4 bytes"));
        pos += 4;
        if size == 0 {
            break; // end mark
        }
        let stored = size & 0x8000_0000 != 0;
        let len = (size & 0x7fff_ffff) as usize;
        let Some(block) = data.get(pos..pos + len) else { return bad("block truncated") };
        pos += len + if block_checksum { 4 } else { 0 };
        if stored {
            if out.len() + len > max_bytes {
                return Some(Err(BatchError::DecompressedTooLarge { limit: max_bytes }));
            }
            out.extend_from_slice(block);
            continue;
        }
        let room = max_block.min(max_bytes.saturating_sub(out.len()) + 1);
        let start = out.len();
        out.resize(start + room, 0);
        match lz4_flex::block::decompress_into(block, &mut out[start..]) {
            Ok(n) => out.truncate(start + n),
            Err(_) if room <= max_block && start + room > max_bytes => {
                return Some(Err(BatchError::DecompressedTooLarge { limit: max_bytes }));
            }
            Err(e) => return bad(&e.to_string()),
        }
        if out.len() > max_bytes {
            return Some(Err(BatchError::DecompressedTooLarge { limit: max_bytes }));
        }
    }
    if pos + if content_checksum { 4 } else { 0 } > data.len() {
        return bad("content checksum truncated");
    }
    Some(Ok(out))
}

/// One raw snappy block, its declared length checked first.
fn snappy_block(data: &[u8], max_bytes: usize) -> Result<Vec<u8>, BatchError> {
    let bad = |reason: String| BatchError::Decompression { codec: "snappy", reason };
    let len = snap::raw::decompress_len(data).map_err(|e| bad(e.to_string()))?;
    if len > max_bytes {
        return Err(BatchError::DecompressedTooLarge { limit: max_bytes });
    }
    snap::raw::Decoder::new().decompress_vec(data).map_err(|e| bad(e.to_string()))
}

/// xerial's framing: the magic, version and compatible version (4 bytes
/// each), then blocks of a 4-byte big-endian length and a raw snappy block.
fn xerial_decompress(data: &[u8], max_bytes: usize) -> Result<Vec<u8>, BatchError> {
    let bad = |reason: &str| BatchError::Decompression { codec: "snappy", reason: reason.to_string() };
    if data.len() < XERIAL_HEADER_LEN {
        return Err(bad("xerial header truncated"));
    }
    let mut out = Vec::new();
    let mut pos = XERIAL_HEADER_LEN;
    while pos < data.len() {
        let len_bytes: [u8; 4] =
            data.get(pos..pos + 4).and_then(|b| b.try_into().ok()).ok_or(bad("block length truncated"))?;
        let len = u32::from_be_bytes(len_bytes) as usize;
        pos += 4;
        let block =
            data.get(pos..pos.checked_add(len).ok_or(bad("block length overflows"))?).ok_or(bad("block truncated"))?;
        pos += len;
        let left = max_bytes.saturating_sub(out.len());
        out.extend(snappy_block(block, left).map_err(|e| match e {
            BatchError::DecompressedTooLarge { .. } => BatchError::DecompressedTooLarge { limit: max_bytes },
            other => other,
        })?);
    }
    Ok(out)
}

fn xerial_compress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() / 2 + XERIAL_HEADER_LEN);
    out.extend_from_slice(XERIAL_MAGIC);
    out.extend_from_slice(&1u32.to_be_bytes());
    out.extend_from_slice(&1u32.to_be_bytes());
    let mut encoder = snap::raw::Encoder::new();
    for chunk in data.chunks(XERIAL_BLOCK) {
        let block = encoder.compress_vec(chunk).expect("snappy compresses any block");
        out.extend_from_slice(&u32::try_from(block.len()).expect("a block is small").to_be_bytes());
        out.extend_from_slice(&block);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Compression; 4] = [Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd];

    #[test]
    fn every_codec_round_trips_and_names_itself() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for codec in ALL {
            let packed = codec.compress(&data);
            assert!(packed.len() < data.len(), "{codec} compresses");
            assert_eq!(codec.decompress(&packed, data.len()).unwrap(), data, "{codec}");
            assert_eq!(Compression::from_attributes(codec.attribute_bits()).unwrap(), codec);
            assert_eq!(codec.name().parse::<Compression>().unwrap(), codec);
        }
        assert!(matches!(Compression::from_attributes(5), Err(BatchError::UnknownCompression(5))));
    }

    #[test]
    fn a_decompression_bomb_is_refused_at_the_limit() {
        let zeros = vec![0u8; 8 << 20];
        for codec in ALL {
            let packed = codec.compress(&zeros);
            assert!(packed.len() < 1 << 20, "{codec}: {} bytes", packed.len());
            let e = codec.decompress(&packed, 1 << 20).unwrap_err();
            assert!(matches!(e, BatchError::DecompressedTooLarge { limit } if limit == 1 << 20), "{codec}: {e}");
        }
    }

    #[test]
    fn lz4_frames_of_independent_blocks_take_the_fast_path_and_decode_as_the_frame_decoder_does() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| format!("{} ", i % 977).into_bytes()).collect();
        let packed = Compression::Lz4.compress(&data);
        let fast = lz4_independent_blocks(&packed, 1 << 24).expect("lz4_flex writes independent blocks").unwrap();
        assert_eq!(fast, data);
        assert!(matches!(
            lz4_independent_blocks(&packed, 1000),
            Some(Err(BatchError::DecompressedTooLarge { limit: 1000 }))
        ));
        let mut generic = Vec::new();
        lz4_flex::frame::FrameDecoder::new(&packed[..]).read_to_end(&mut generic).unwrap();
        assert_eq!(generic, data);
        // A truncated frame is an error, not a panic.
        assert!(matches!(lz4_independent_blocks(&packed[..packed.len() / 2], 1 << 24), Some(Err(_))));
    }

    #[test]
    fn snappy_reads_raw_blocks_as_well_as_xerial_framing() {
        let data = b"hello hello hello hello".repeat(100);
        let raw = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        assert_eq!(Compression::Snappy.decompress(&raw, 1 << 20).unwrap(), data);
        assert!(Compression::Snappy.compress(&data).starts_with(XERIAL_MAGIC), "written the Java client's way");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for codec in ALL {
            for junk in [&b"not compressed at all"[..], b"\xff\xff\xff\xff\xff\xff", XERIAL_MAGIC] {
                let outcome = codec.decompress(junk, 1 << 20);
                assert!(matches!(outcome, Err(BatchError::Decompression { .. })), "{codec}: {junk:?} gave {outcome:?}");
            }
        }
    }
}
