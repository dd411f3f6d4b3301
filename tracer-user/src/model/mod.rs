//! The records every stage shares: the socket model (what the socket
//! stage hands on), the per-process reports of `watch` and `serve`, and the
//! JSON Lines records the views print.

mod records;
mod report;
mod socket;

pub use records::{AlertLine, ProcessLine, TraceRecord};
pub use report::*;
pub use socket::*;
