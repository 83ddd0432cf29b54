//! `joblet logs`, `joblet run`'s terminal copy, `joblet ps` and `joblet inspect`, as far as they
//! only need the store: copy a job's log to an output as the job wrote it, and format records.
//!
//! `joblet run` prints its job's output by following the stored log with [`copy_logs`], so
//! what the terminal shows is what was stored, byte for byte and in the same order.

use std::io::{self, Write};

use super::{ChunkKind, Follower, LogReader, StoreError, Stream};
use crate::job::{JobRecord, JobState};

/// What `joblet logs` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogsOptions {
    /// First sequence number to print (`--since`); 0 and 1 both mean from the start.
    pub since: u64,
    /// Only this stream (`--stream`).
    pub stream: Option<Stream>,
    /// Prefix each line with the time its chunk was stored (`--timestamps`).
    pub timestamps: bool,
    /// Keep following until the job's log ends (`-f`).
    pub follow: bool,
}

/// Errors of [`copy_logs`].
#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    /// The log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output could not be written (e.g. a closed pipe).
    #[error("failed to write the output of log {path}")]
    Output {
        /// The log.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What [`copy_logs`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogsSummary {
    /// The log's end chunk was reached (the job's output is complete).
    pub ended: bool,
    /// Sequence number of the last chunk read (0 if none).
    pub last_seq: u64,
    /// Truncation markers seen.
    pub markers: u64,
}

/// Copies a job's log: stdout chunks to `out`, stderr chunks and truncation notices to `err`.
/// Without `follow` it stops at the end of what is stored now; with it, at the end chunk.
pub fn copy_logs(
    reader: LogReader,
    opts: &LogsOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<LogsSummary, LogsError> {
    let since = opts.since.max(1);
    let follower = Follower::new(reader, since)?;
    copy_followed(follower, opts, out, err)
}

/// [`copy_logs`] with a follower the caller built (e.g. [`Follower::with_eventfd`]).
pub fn copy_followed(
    mut follower: Follower,
    opts: &LogsOptions,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<LogsSummary, LogsError> {
    let path = follower.reader().path().to_owned();
    let output = |source| LogsError::Output {
        path: path.clone(),
        source,
    };
    let mut summary = LogsSummary::default();
    let mut line_start = [true, true];
    let since = opts.since.max(1);
    loop {
        let chunk = if opts.follow {
            follower.next_chunk()?
        } else {
            let r = follower.reader_mut();
            if r.skip_to(since)? {
                r.try_next()?
            } else {
                None
            }
        };
        let Some(chunk) = chunk else { break };
        summary.last_seq = chunk.seq;
        match &chunk.kind {
            ChunkKind::Data(stream) => {
                if opts.stream.is_some_and(|s| s != *stream) {
                    continue;
                }
                let (w, at_start): (&mut dyn Write, &mut bool) = match stream {
                    Stream::Stdout => (&mut *out, &mut line_start[0]),
                    Stream::Stderr => (&mut *err, &mut line_start[1]),
                };
                if opts.timestamps {
                    write_stamped(w, &chunk.data, chunk.ts_ns, at_start).map_err(output)?;
                } else {
                    w.write_all(&chunk.data).map_err(output)?;
                }
                w.flush().map_err(output)?;
            }
            ChunkKind::Truncated(marker) => {
                summary.markers += 1;
                let sep = if line_start[1] { "" } else { "\n" };
                writeln!(err, "{sep}{marker}").map_err(output)?;
                line_start[1] = true;
                err.flush().map_err(output)?;
            }
            ChunkKind::End => {
                summary.ended = true;
                break;
            }
        }
    }
    Ok(summary)
}

fn write_stamped(
    w: &mut dyn Write,
    data: &[u8],
    ts_ns: u64,
    at_start: &mut bool,
) -> io::Result<()> {
    let stamp = rfc3339(ts_ns);
    for line in data.split_inclusive(|&b| b == b'\n') {
        if *at_start {
            write!(w, "{stamp} ")?;
        }
        w.write_all(line)?;
        *at_start = line.ends_with(b"\n");
    }
    Ok(())
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 UTC with microseconds.
pub fn rfc3339(ts_ns: u64) -> String {
    let secs = ts_ns / 1_000_000_000;
    let micros = (ts_ns % 1_000_000_000) / 1000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `joblet ps`: the records to show (all of them with `all`, else the running ones).
pub fn ps_filter(records: Vec<JobRecord>, all: bool) -> Vec<JobRecord> {
    records
        .into_iter()
        .filter(|r| all || r.effective_state() == JobState::Running)
        .collect()
}

/// `joblet ps` as a table: id, state, exit code, start time, duration, command.
pub fn ps_table(records: &[JobRecord], now_ns: u64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16}  {:<8}  {:>4}  {:<27}  {:>10}  COMMAND",
        "ID", "STATE", "EXIT", "STARTED", "DURATION"
    );
    for r in records {
        let state = serde_json::to_value(r.effective_state())
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let exit = match (r.exit_code, r.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(sig)) => format!("s{sig}"),
            _ => "-".to_owned(),
        };
        let wall = if r.effective_state() == JobState::Running {
            now_ns.saturating_sub(r.started_at_ns)
        } else {
            r.wall_ns
        };
        let _ = writeln!(
            s,
            "{:<16}  {:<8}  {:>4}  {:<27}  {:>9.1}s  {}",
            r.id,
            state,
            exit,
            rfc3339(r.started_at_ns),
            wall as f64 / 1e9,
            shell_words(&r.command)
        );
    }
    s
}

/// A command list as a shell-quoted line, for display.
fn shell_words(cmd: &[String]) -> String {
    cmd.iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339(1_709_210_096_123_456_789),
            "2024-02-29T12:34:56.123456Z"
        );
    }

    #[test]
    fn timestamps_prefix_every_line_start_across_chunks() {
        let mut out = Vec::new();
        let mut at_start = true;
        write_stamped(&mut out, b"a\nb", 0, &mut at_start).unwrap();
        write_stamped(&mut out, b"c\n", 0, &mut at_start).unwrap();
        let t = rfc3339(0);
        assert_eq!(String::from_utf8(out).unwrap(), format!("{t} a\n{t} bc\n"));
    }

    #[test]
    fn shell_words_quotes_what_needs_it() {
        let cmd = ["sh", "-c", "echo 'hi' there"].map(String::from);
        assert_eq!(shell_words(&cmd), r#"sh -c 'echo '\''hi'\'' there'"#);
    }
}
