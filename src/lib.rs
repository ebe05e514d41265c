//! The library half of the `tally` package: the benchmark driver that both
//! `tally bench` and the `benches/` targets use, and a helper to run the real
//! `tally` binary as a child process.

pub mod bench;
pub mod bench_idempotence;
pub mod child;

/// README.md's Rust examples, compiled as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
