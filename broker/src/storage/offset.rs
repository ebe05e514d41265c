//! [`Offset`]: the number of a record in its partition.

/// The position of a record in its partition's sequence: the first record
/// ever appended has offset 0, the next 1, and so on. Not a byte position
/// (those are `position`s, in a segment file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);

impl Offset {
    /// The first offset of every partition.
    pub const ZERO: Offset = Offset(0);
    /// An upper bound above every offset, for reads with no limit.
    pub const MAX: Offset = Offset(u64::MAX);

    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// An offset from the wire, where offsets are `i64`; `None` if negative.
    pub fn from_wire(offset: i64) -> Option<Offset> {
        u64::try_from(offset).ok().map(Offset)
    }

    /// The wire form (`i64`). Offsets never reach `i64::MAX`: a batch's
    /// offsets come from an `i64` header field.
    pub fn to_wire(self) -> i64 {
        i64::try_from(self.0).unwrap_or(i64::MAX)
    }
}

/// The offset `n` records later.
impl std::ops::Add<u64> for Offset {
    type Output = Offset;
    fn add(self, n: u64) -> Offset {
        Offset(self.0 + n)
    }
}

impl std::fmt::Display for Offset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for Offset {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Offset)
    }
}
