//! The Prometheus and HdrHistogram view of the `watch` reports, for
//! `socktrace serve` (`crate::commands::serve`): metric families and their
//! labels, the text and OpenMetrics expositions, the HTTP server, and the
//! interval log.

pub mod exposition;
pub mod hdr_log;
pub mod http;
pub mod metrics;
