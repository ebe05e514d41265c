//! The library half of the `tally` package: the benchmark driver that both
//! `tally bench` and the `benches/` targets use, a helper to run the real
//! `tally` binary as a child process, and the `tally dev` supervisor.

pub mod bench;
pub mod bench_chart;
pub mod bench_disk;
pub mod bench_idempotence;
pub mod bench_partitions;
pub mod bench_sweep;
pub mod child;
pub mod dev;

/// README.md's Rust examples, compiled as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
