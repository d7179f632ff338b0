//! The VM description lives in `bulwark-spec`, shared with bulwarkd.
pub use bulwark_spec::*;
