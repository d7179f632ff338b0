//! Guest images: what bulwark boots. For now, function micro-VM payloads built from C or
//! assembly sources against the bulwark SDK (`sdk/bulwark.h`, `sdk/crt0.S`).
#![forbid(unsafe_code)]

pub mod payload;
