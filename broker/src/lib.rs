//! The Tally broker as a library.

pub mod storage;

#[cfg(not(target_pointer_width = "64"))]
compile_error!("Tally maps whole segments into memory and needs a 64-bit target");
