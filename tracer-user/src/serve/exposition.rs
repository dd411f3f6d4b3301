//! Which exposition format a scraper gets, and the Prometheus text format
//! (0.0.4) derived from the OpenMetrics text that prometheus-client writes.

/// What `/metrics` answers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text`, when the scraper prefers it (as
    /// Prometheus does).
    OpenMetrics,
    /// `text/plain; version=0.0.4`, for everyone else (curl, promtool,
    /// older scrapers).
    Prometheus,
}

impl Format {
    /// From the request's `Accept` header: OpenMetrics if it is acceptable
    /// and weighted at least as high as plain text.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics_q, mut text_q) = (0.0f64, 0.0f64);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|param| param.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics_q = openmetrics_q.max(q),
                "text/plain" | "text/*" | "*/*" => text_q = text_q.max(q),
                _ => {}
            }
        }
        if openmetrics_q > 0.0 && openmetrics_q >= text_q {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// prometheus-client only writes OpenMetrics. For the metric types socktrace
/// uses, the Prometheus text format differs in the family headers alone: a
/// counter's family is named after its `_total` samples, `info` becomes a
/// gauge named `<name>_info`, and there are no `# UNIT` or `# EOF` lines.
/// Samples, label escaping and histograms are the same in both.
pub fn openmetrics_to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The encoder writes each family's HELP line just before its TYPE line.
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), kind),
                "info" => (format!("{name}_info"), "gauge"),
                _ => (name.to_string(), kind),
            };
            if let Some(help) = help.take() {
                out.push_str(&format!("# HELP {name} {help}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if !line.starts_with("# UNIT ") && line != "# EOF" {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics() {
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Prometheus);
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text; q=0")),
            Format::Prometheus
        );
        assert_eq!(
            Format::negotiate(Some("text/plain, application/openmetrics-text;q=0.9")),
            Format::Prometheus
        );
    }

    #[test]
    fn headers_become_prometheus_text() {
        // Each OpenMetrics line and what it becomes (None: dropped).
        let lines = [
            (
                "# HELP socktrace_connects Connections opened.",
                Some("# HELP socktrace_connects_total Connections opened."),
            ),
            (
                "# TYPE socktrace_connects counter",
                Some("# TYPE socktrace_connects_total counter"),
            ),
            (
                r#"socktrace_connects_total{pid="1",comm="a \"b\""} 3"#,
                Some(r#"socktrace_connects_total{pid="1",comm="a \"b\""} 3"#),
            ),
            (
                "# HELP socktrace_build Version.",
                Some("# HELP socktrace_build_info Version."),
            ),
            (
                "# TYPE socktrace_build info",
                Some("# TYPE socktrace_build_info gauge"),
            ),
            (
                r#"socktrace_build_info{version="0.1.0"} 1"#,
                Some(r#"socktrace_build_info{version="0.1.0"} 1"#),
            ),
            (
                "# HELP socktrace_age_seconds Age.",
                Some("# HELP socktrace_age_seconds Age."),
            ),
            (
                "# TYPE socktrace_age_seconds gauge",
                Some("# TYPE socktrace_age_seconds gauge"),
            ),
            ("# UNIT socktrace_age_seconds seconds", None),
            (
                r#"socktrace_age_seconds{pid="1"} 2.5"#,
                Some(r#"socktrace_age_seconds{pid="1"} 2.5"#),
            ),
            ("# EOF", None),
        ];
        let openmetrics: String = lines.iter().map(|(from, _)| format!("{from}\n")).collect();
        let expected: String = lines
            .iter()
            .filter_map(|(_, to)| to.map(|to| format!("{to}\n")))
            .collect();
        assert_eq!(openmetrics_to_prometheus(&openmetrics), expected);
    }
}
