//! Zig-zag variable-length integers, as Kafka's record format uses them.
//!
//! Encoding appends to a `Vec<u8>`; decoding reads from a byte slice and
//! returns the value with the number of bytes it took, or `None` when the
//! input is truncated or the varint is longer than its type allows. Decoding
//! never panics on any input.

/// Appends `value` as a zig-zag varint (at most 5 bytes).
pub fn put_varint(out: &mut Vec<u8>, value: i32) {
    put_unsigned(out, u64::from(((value << 1) ^ (value >> 31)) as u32));
}

/// Appends `value` as a zig-zag varlong (at most 10 bytes).
pub fn put_varlong(out: &mut Vec<u8>, value: i64) {
    put_unsigned(out, ((value << 1) ^ (value >> 63)) as u64);
}

fn put_unsigned(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The number of bytes `put_varint(value)` appends.
pub fn varint_len(value: i32) -> usize {
    unsigned_len(u64::from(((value << 1) ^ (value >> 31)) as u32))
}

/// The number of bytes `put_varlong(value)` appends.
pub fn varlong_len(value: i64) -> usize {
    unsigned_len(((value << 1) ^ (value >> 63)) as u64)
}

fn unsigned_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Reads a zig-zag varint from the front of `buf`: `(value, bytes_read)`.
pub fn get_varint(buf: &[u8]) -> Option<(i32, usize)> {
    let (raw, n) = get_unsigned(buf, 5)?;
    let raw = u32::try_from(raw).ok()?;
    Some((((raw >> 1) as i32) ^ -((raw & 1) as i32), n))
}

/// Reads a zig-zag varlong from the front of `buf`: `(value, bytes_read)`.
pub fn get_varlong(buf: &[u8]) -> Option<(i64, usize)> {
    let (raw, n) = get_unsigned(buf, 10)?;
    Some((((raw >> 1) as i64) ^ -((raw & 1) as i64), n))
}

fn get_unsigned(buf: &[u8], max_len: usize) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().take(max_len).enumerate() {
        let shift = 7 * i as u32;
        let low = u64::from(byte & 0x7f);
        if shift == 63 && low > 1 {
            return None;
        }
        value |= low << shift;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings_match_kafka() {
        // From Kafka's ByteUtilsTest: zig-zag maps 0,-1,1,-2,2 to 0,1,2,3,4.
        for (value, expected) in
            [(0, vec![0u8]), (-1, vec![1]), (1, vec![2]), (-64, vec![0x7f]), (64, vec![0x80, 0x01])]
        {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out, expected, "varint {value}");
            assert_eq!(varint_len(value), out.len());
        }
    }

    #[test]
    fn extremes_round_trip() {
        for v in [i32::MIN, i32::MAX, 0, -1, 1, 300, -300] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(get_varint(&out), Some((v, out.len())));
        }
        for v in [i64::MIN, i64::MAX, 0, -1, 1 << 40] {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            assert_eq!(out.len(), varlong_len(v));
            assert_eq!(get_varlong(&out), Some((v, out.len())));
        }
    }

    #[test]
    fn truncated_and_overlong_inputs_are_rejected() {
        assert_eq!(get_varint(&[]), None);
        assert_eq!(get_varint(&[0x80]), None);
        assert_eq!(get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
        assert_eq!(get_varlong(&[0xff; 11]), None);
    }

    proptest::proptest! {
        #[test]
        fn varlong_round_trips(v: i64) {
            let mut out = Vec::new();
            put_varlong(&mut out, v);
            proptest::prop_assert_eq!(get_varlong(&out), Some((v, out.len())));
        }
    }
}
