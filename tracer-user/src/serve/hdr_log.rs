//! `--hdr-log FILE`: the per-process distributions as a standard HdrHistogram
//! interval log (V2 compressed histograms, as HistogramLogProcessor and the
//! Python `hdrhistogram` package read them).
//!
//! One interval per report, holding the values recorded since the previous
//! one, with one tag per distribution and process: `connect_latency_us.pid4242`,
//! `connection_lifetime_us.pid4242`, `close_wait_dwell_us.pid4242`. Values
//! are in microseconds. A comment names each process the first time it
//! appears in a file. When the file reaches `max_bytes` it becomes `FILE.1`
//! (the older ones shift to `FILE.2` ...; `keep` of them are kept) and a new
//! file starts with the same StartTime and BaseTime (socktrace's start), so
//! every file reads on its own and the timestamps of all of them line up.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use thiserror::Error;

use crate::watch::distribution::{Distributions, Timing};

/// The format version that HdrHistogram's Java writer puts in its header.
const FORMAT_VERSION_COMMENT: &str = "[Histogram log format version 1.3]";
const LEGEND: &str =
    "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n";

#[derive(Debug, Error)]
pub enum HdrLogError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("encoding a histogram for {path}: {message}")]
    Encode { path: PathBuf, message: String },
}

#[derive(Clone, Debug)]
pub struct HdrLogOptions {
    pub path: PathBuf,
    /// Rotate once the file reaches this size.
    pub max_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep: usize,
}

pub struct HdrLog {
    options: HdrLogOptions,
    file: File,
    /// Bytes in the current file.
    written: u64,
    /// StartTime and BaseTime of every file: interval timestamps count from it.
    start: SystemTime,
    /// End of the last interval, from `start`.
    last_end: Duration,
    serializer: V2DeflateSerializer,
    /// What each histogram held when last logged, to log only what is new.
    logged: HashMap<(u32, Timing), Histogram<u64>>,
    /// Processes already named in a comment of the current file.
    named: HashSet<u32>,
}

impl HdrLog {
    /// Starts a new log at `options.path`; a log already there is rotated
    /// away first, as if it had filled up.
    pub fn create(options: HdrLogOptions, start: SystemTime) -> Result<Self, HdrLogError> {
        let path = options.path.clone();
        if fs::metadata(&path).is_ok_and(|meta| meta.len() > 0) {
            shift_rotated(&path, options.keep).map_err(|source| io_error(&path, source))?;
        }
        let (file, written) = new_file(&path, start)?;
        Ok(Self {
            options,
            file,
            written,
            start,
            last_end: Duration::ZERO,
            serializer: V2DeflateSerializer::new(),
            logged: HashMap::new(),
            named: HashSet::new(),
        })
    }

    /// Logs the interval from the previous call (or the start) to `now`:
    /// for each process (pid, comm, distributions) and distribution, the
    /// values recorded in it; distributions with none are left out.
    pub fn write_interval<'a>(
        &mut self,
        now: SystemTime,
        processes: impl IntoIterator<Item = (u32, &'a str, &'a Distributions)>,
    ) -> Result<(), HdrLogError> {
        let end = now
            .duration_since(self.start)
            .unwrap_or_default()
            .max(self.last_end);
        let (interval_start, length) = (self.last_end, end - self.last_end);
        let path = self.options.path.clone();
        let encode_error = |message: String| HdrLogError::Encode {
            path: path.clone(),
            message,
        };
        let mut buffer = Vec::new();
        // Built without headers, so it writes the interval lines alone.
        let mut writer = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut buffer, &mut self.serializer)
            .map_err(|e| encode_error(e.to_string()))?;
        let mut seen = HashSet::new();
        for (pid, comm, distributions) in processes {
            seen.insert(pid);
            for timing in Timing::ALL {
                let Some(current) = distributions.get(timing).histogram() else {
                    continue;
                };
                let Some(interval) = new_values(self.logged.entry((pid, timing)), current) else {
                    continue;
                };
                if self.named.insert(pid) {
                    writer
                        .write_comment(&format!("[pid {pid}: {comm}]"))
                        .map_err(|e| encode_error(e.to_string()))?;
                }
                let tag = format!("{}_us.pid{pid}", timing.name());
                writer
                    .write_histogram(&interval, interval_start, length, Tag::new(&tag))
                    .map_err(|e| encode_error(e.to_string()))?;
            }
        }
        self.logged.retain(|(pid, _), _| seen.contains(pid));
        self.last_end = end;
        if buffer.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&buffer)
            .and_then(|()| self.file.flush())
            .map_err(|source| io_error(&self.options.path, source))?;
        self.written += buffer.len() as u64;
        if self.written >= self.options.max_bytes {
            self.rotate()?;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<(), HdrLogError> {
        let path = &self.options.path;
        shift_rotated(path, self.options.keep).map_err(|source| io_error(path, source))?;
        let (file, written) = new_file(path, self.start)?;
        self.file = file;
        self.written = written;
        self.named.clear();
        Ok(())
    }
}

/// The values `current` got since it was last logged (all of them the first
/// time), and remembers `current`; `None` when there are none.
fn new_values(
    logged: Entry<'_, (u32, Timing), Histogram<u64>>,
    current: &Histogram<u64>,
) -> Option<Histogram<u64>> {
    match logged {
        Entry::Vacant(entry) => {
            entry.insert(current.clone());
            Some(current.clone())
        }
        Entry::Occupied(mut entry) => {
            let previous = entry.get_mut();
            if previous.len() == current.len() {
                return None;
            }
            let mut interval = current.clone();
            // A pid reused by a new process starts over: log it whole.
            if previous.len() > current.len() || interval.subtract(&*previous).is_err() {
                interval = current.clone();
            }
            previous.clone_from(current);
            Some(interval)
        }
    }
}

fn io_error(path: &Path, source: io::Error) -> HdrLogError {
    HdrLogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `path` becomes `path.1`, `path.1` becomes `path.2` ..., and the one past
/// `keep` is removed.
fn shift_rotated(path: &Path, keep: usize) -> io::Result<()> {
    let ignore_missing = |result: io::Result<()>| match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if keep == 0 {
        return ignore_missing(fs::remove_file(path));
    }
    ignore_missing(fs::remove_file(rotated(path, keep)))?;
    for n in (1..keep).rev() {
        ignore_missing(fs::rename(rotated(path, n), rotated(path, n + 1)))?;
    }
    ignore_missing(fs::rename(path, rotated(path, 1)))
}

/// Creates `path` with the log header; returns it and the header's size.
fn new_file(path: &Path, start: SystemTime) -> Result<(File, u64), HdrLogError> {
    let mut header = Vec::new();
    let mut serializer = V2DeflateSerializer::new();
    IntervalLogWriterBuilder::new()
        .add_comment(FORMAT_VERSION_COMMENT)
        .add_comment(&format!(
            "[socktrace {}: TCP connection timings per process, in microseconds]",
            env!("CARGO_PKG_VERSION")
        ))
        .add_comment(
            "[Tags: connect_latency_us.pidPID (SYN_SENT to ESTABLISHED), \
             connection_lifetime_us.pidPID (ESTABLISHED to CLOSE), \
             close_wait_dwell_us.pidPID (CLOSE_WAIT to the process's close)]",
        )
        .with_start_time(start)
        .with_base_time(start)
        .begin_log_with(&mut header, &mut serializer)
        .map_err(|source| io_error(path, source))?;
    header.extend_from_slice(LEGEND.as_bytes());
    let mut file = File::create(path).map_err(|source| io_error(path, source))?;
    file.write_all(&header)
        .map_err(|source| io_error(path, source))?;
    Ok((file, header.len() as u64))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use hdrhistogram::serialization::Deserializer;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("socktrace-hdr-log-{}-{n}", std::process::id()));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// (tag, start timestamp, count) of every interval in `path`.
    fn read(path: &Path) -> Vec<(String, f64, u64)> {
        let text = fs::read(path).unwrap();
        let mut deserializer = Deserializer::new();
        IntervalLogIterator::new(&text)
            .filter_map(|entry| match entry.unwrap() {
                LogEntry::Interval(interval) => Some(interval),
                _ => None,
            })
            .map(|interval| {
                let bytes = STANDARD.decode(interval.encoded_histogram()).unwrap();
                let histogram: Histogram<u64> =
                    deserializer.deserialize(&mut bytes.as_slice()).unwrap();
                (
                    interval.tag().unwrap().as_str().to_string(),
                    interval.start_timestamp().as_secs_f64(),
                    histogram.len(),
                )
            })
            .collect()
    }

    fn options(dir: &TempDir, max_bytes: u64, keep: usize) -> HdrLogOptions {
        HdrLogOptions {
            path: dir.0.join("socktrace.hlog"),
            max_bytes,
            keep,
        }
    }

    #[test]
    fn logs_only_new_values_per_interval() {
        let dir = TempDir::new();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut log = HdrLog::create(options(&dir, 1 << 20, 2), start).unwrap();
        let mut distributions = Distributions::default();
        for _ in 0..3 {
            distributions.connect_latency.record_ns(80_000);
        }
        let at = |s: u64| start + Duration::from_secs(s);
        log.write_interval(at(1), [(4242, "client", &distributions)])
            .unwrap();
        // Nothing new: nothing logged.
        log.write_interval(at(2), [(4242, "client", &distributions)])
            .unwrap();
        distributions.connect_latency.record_ns(90_000);
        distributions.lifetime.record_ns(5_000_000);
        log.write_interval(at(3), [(4242, "client", &distributions)])
            .unwrap();

        let intervals = read(&dir.0.join("socktrace.hlog"));
        assert_eq!(
            intervals,
            vec![
                ("connect_latency_us.pid4242".to_string(), 0.0, 3),
                ("connect_latency_us.pid4242".to_string(), 2.0, 1),
                ("connection_lifetime_us.pid4242".to_string(), 2.0, 1),
            ]
        );
        let text = fs::read_to_string(dir.0.join("socktrace.hlog")).unwrap();
        assert!(text.starts_with("#[Histogram log format version 1.3]\n"));
        assert!(text.contains("#[StartTime: 1700000000.000 (seconds since epoch)]\n"));
        assert!(text.contains("#[BaseTime: 1700000000.000 (seconds since epoch)]\n"));
        assert_eq!(text.matches("#[pid 4242: client]").count(), 1);
    }

    #[test]
    fn rotates_by_size_and_keeps_n_files() {
        let dir = TempDir::new();
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        // Small enough that every interval fills a file.
        let mut log = HdrLog::create(options(&dir, 200, 2), start).unwrap();
        let mut distributions = Distributions::default();
        for second in 1..=5u64 {
            distributions.connect_latency.record_ns(second * 100_000);
            log.write_interval(
                start + Duration::from_secs(second),
                [(7, "c", &distributions)],
            )
            .unwrap();
        }
        let path = dir.0.join("socktrace.hlog");
        assert!(path.exists());
        assert!(!rotated(&path, 3).exists(), "only two rotated files kept");
        // Newest first: FILE.1 has the 5th interval, FILE.2 the 4th.
        assert_eq!(read(&rotated(&path, 1))[0].1, 4.0);
        assert_eq!(read(&rotated(&path, 2))[0].1, 3.0);
        assert!(read(&path).is_empty(), "the new file has only its header");
        let text = fs::read_to_string(rotated(&path, 1)).unwrap();
        assert!(text.contains("#[StartTime: 1700000000.000"));
        assert!(
            text.contains("#[pid 7: c]"),
            "each file names its processes"
        );

        // A restart moves the previous log aside instead of overwriting it.
        HdrLog::create(options(&dir, 200, 2), start).unwrap();
        assert_eq!(read(&rotated(&path, 2))[0].1, 4.0);
    }
}
