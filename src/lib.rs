//! The library half of the `tally` package: the benchmark driver that both
//! `tally bench` and the `benches/` targets use, and a helper to run the real
//! `tally` binary as a child process.

pub mod bench;
pub mod child;
