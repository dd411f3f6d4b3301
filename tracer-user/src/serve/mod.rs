//! The Prometheus and HdrHistogram view of the `watch` reports, for
//! `socktrace serve` (`crate::commands::serve`): metric families and their
//! labels, the text and OpenMetrics expositions, the HTTP server and its
//! TLS and auth, and the interval log.

pub mod exposition;
pub mod hdr_log;
pub mod http;
pub mod metrics;
pub mod web_config;
