//! Numbers as a person reads them, shared by the verdicts and every view:
//! counts with digit grouping, durations and ages, ETAs, rates; and errors
//! on one line; bytes from outside, escaped.

use std::borrow::Cow;

use num_format::{Locale, ToFormattedString as _};

/// 1034 -> "1,034".
pub fn count(value: u64) -> String {
    value.to_formatted_string(&Locale::en)
}

/// A count and its noun: "1 event", "2,310 events".
pub fn counted(value: u64, one: &str, many: &str) -> String {
    format!("{} {}", count(value), if value == 1 { one } else { many })
}

/// An age in whole seconds: "42s", "9m12s", "3h05m", "2d04h".
pub fn age(seconds: f64) -> String {
    let total = seconds.max(0.0).round() as u64;
    match total {
        0..60 => format!("{total}s"),
        _ => minutes_and_longer(total),
    }
}

/// A duration to the precision that reads best: "850ns", "12.3ms",
/// "4.217s", then as [`age`] does from a minute on.
pub fn duration(ns: u64) -> String {
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    match ns {
        n if n < US => format!("{n}ns"),
        n if n < MS => format!("{:.1}us", n as f64 / US as f64),
        n if n < S => format!("{:.1}ms", n as f64 / MS as f64),
        n if n < 60 * S => format!("{:.3}s", n as f64 / S as f64),
        n => minutes_and_longer(n / S),
    }
}

/// "9m12s", "3h05m", "2d04h": two units, the second zero-padded.
fn minutes_and_longer(total_s: u64) -> String {
    let (days, hours, minutes, secs) = (
        total_s / 86_400,
        total_s / 3_600 % 24,
        total_s / 60 % 60,
        total_s % 60,
    );
    match total_s {
        0..3_600 => format!("{minutes}m{secs:02}s"),
        3_600..86_400 => format!("{hours}h{minutes:02}m"),
        _ => format!("{days}d{hours:02}h"),
    }
}

/// "~40s", "~12 min", "~5 h", "~20 days".
pub fn eta_phrase(seconds: f64) -> String {
    let seconds = seconds.max(0.0);
    if seconds < 100.0 {
        format!("~{seconds:.0}s")
    } else if seconds < 100.0 * 60.0 {
        format!("~{:.0} min", seconds / 60.0)
    } else if seconds < 48.0 * 3_600.0 {
        format!("~{:.0} h", seconds / 3_600.0)
    } else {
        format!("~{:.0} days", seconds / 86_400.0)
    }
}

/// A rate in the unit that reads best: "12/s", "2.5/s", "2.0/min", "0.5/h".
pub fn per_second_phrase(per_second: f64) -> String {
    in_rate_unit(per_second, RateUnit::for_rate(per_second))
}

/// Two rates to compare, both in the unit that reads best for the larger:
/// "29.8/min vs 0/min", not "29.8/min vs 0/s".
pub fn per_second_pair(a: f64, b: f64) -> (String, String) {
    let unit = RateUnit::for_rate(a.max(b));
    (in_rate_unit(a, unit), in_rate_unit(b, unit))
}

#[derive(Clone, Copy)]
enum RateUnit {
    Second,
    Minute,
    Hour,
}

impl RateUnit {
    fn for_rate(per_second: f64) -> Self {
        if per_second <= 0.0 || per_second >= 1.0 {
            Self::Second
        } else if per_second * 60.0 >= 0.1 {
            Self::Minute
        } else {
            Self::Hour
        }
    }
}

fn in_rate_unit(per_second: f64, unit: RateUnit) -> String {
    let (scale, name) = match unit {
        RateUnit::Second => (1.0, "s"),
        RateUnit::Minute => (60.0, "min"),
        RateUnit::Hour => (3_600.0, "h"),
    };
    let value = per_second * scale;
    match unit {
        _ if value <= 0.0 => format!("0/{name}"),
        RateUnit::Second if value >= 10.0 => format!("{value:.0}/{name}"),
        _ => format!("{value:.1}/{name}"),
    }
}

/// "2.0 s", "10 s".
pub fn seconds_phrase(seconds: f64) -> String {
    if seconds < 10.0 {
        format!("{seconds:.1} s")
    } else {
        format!("{seconds:.0} s")
    }
}

/// Bytes from outside (a process name, a cgroup path) as every view shows
/// them: control characters (an escape sequence, a newline) and bytes that
/// are not UTF-8 are written out as escapes (`\u{1b}`, `\n`, `\xff`), so
/// that nothing can drive the terminal, split a line or hide what follows
/// it. Borrowed for plain text, the common case.
pub fn shown(bytes: &[u8]) -> Cow<'_, str> {
    if let Ok(text) = std::str::from_utf8(bytes)
        && !text.chars().any(char::is_control)
    {
        return Cow::Borrowed(text);
    }
    let mut shown = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() {
                shown.extend(c.escape_default());
            } else {
                shown.push(c);
            }
        }
        for byte in chunk.invalid() {
            shown.push_str(&format!("\\x{byte:02x}"));
        }
    }
    Cow::Owned(shown)
}

/// An error and its causes on one line, each said once: some errors
/// already name their cause in their own message.
pub fn one_line(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    for cause in anyhow::Chain::new(error) {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let said = anyhow::Error::new(io).context(format!(
            "/x: {}",
            std::io::Error::from_raw_os_error(libc::ENOENT)
        ));
        assert_eq!(
            one_line(said.as_ref()),
            "/x: No such file or directory (os error 2)"
        );
        let chained = anyhow::anyhow!("root cause").context("doing it");
        assert_eq!(one_line(chained.as_ref()), "doing it: root cause");
    }

    #[test]
    fn numbers_read_like_the_issue() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_034), "1,034");
        assert_eq!(count(65_535), "65,535");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(age(552.0), "9m12s");
        assert_eq!(age(42.4), "42s");
        assert_eq!(age(3_900.0), "1h05m");
        assert_eq!(age(187_200.0), "2d04h");
        assert_eq!(eta_phrase(20.0 * 86_400.0), "~20 days");
        assert_eq!(eta_phrase(16.2), "~16s");
        assert_eq!(eta_phrase(720.0), "~12 min");
        assert_eq!(per_second_phrase(2.0 / 60.0), "2.0/min");
        assert_eq!(per_second_phrase(10.0), "10/s");
        assert_eq!(per_second_phrase(0.0), "0/s");
        assert_eq!(counted(1, "event", "events"), "1 event");
        assert_eq!(counted(2_310, "event", "events"), "2,310 events");
        assert_eq!(
            per_second_pair(0.5, 0.0),
            ("30.0/min".into(), "0/min".into())
        );
        assert_eq!(per_second_pair(0.0, 12.0), ("0/s".into(), "12/s".into()));
        assert_eq!(seconds_phrase(2.004), "2.0 s");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(850), "850ns");
        assert_eq!(duration(12_340_000), "12.3ms");
        assert_eq!(duration(4_217_000_000), "4.217s");
        assert_eq!(duration(552_000_000_000), "9m12s");
        assert_eq!(duration(11_100_000_000_000), "3h05m");
        assert_eq!(duration(187_200_000_000_000), "2d04h");
    }
}
