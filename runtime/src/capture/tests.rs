//! Capture engine tests: exact bytes through real pipes and io_uring, caps, a full disk,
//! followers racing a writer, and the detach/attach hand-off.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::{ChunkKind, Follower, LogReader, Marker, StateDir};

fn uring_ok() -> bool {
    crate::testsupport::privileged("io_uring", || {
        crate::sys::uring::Ring::new(4, 1, 4096)
            .map(drop)
            .map_err(|e| format!("io_uring_setup failed: {e}"))
    })
}

struct Readback {
    out: Vec<u8>,
    err: Vec<u8>,
    markers: Vec<Marker>,
    ended: bool,
    seqs_ok: bool,
}

fn read_back(path: &Path) -> Readback {
    let mut r = LogReader::open(path).unwrap();
    let mut rb = Readback {
        out: Vec::new(),
        err: Vec::new(),
        markers: Vec::new(),
        ended: false,
        seqs_ok: true,
    };
    let mut expect = 1;
    while let Some(c) = r.try_next().unwrap() {
        rb.seqs_ok &= c.seq == expect;
        expect += 1;
        match c.kind {
            ChunkKind::Data(Stream::Stdout) => rb.out.extend_from_slice(&c.data),
            ChunkKind::Data(Stream::Stderr) => rb.err.extend_from_slice(&c.data),
            ChunkKind::Truncated(m) => rb.markers.push(m),
            ChunkKind::End => rb.ended = true,
        }
    }
    rb
}

fn pipe() -> (OwnedFd, std::fs::File) {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
    (r, std::fs::File::from(w))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn binary_data_and_no_trailing_newline_are_stored_exactly() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig::default()).unwrap();
    let id = JobId::parse("bin").unwrap();
    let (ro, mut wo) = pipe();
    let (re, mut we) = pipe();
    let h = cap
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    let all: Vec<u8> = (0..=255u8).collect();
    wo.write_all(&all).unwrap();
    we.write_all(b"no newline at the end").unwrap();
    wo.write_all(&all).unwrap();
    drop((wo, we));
    let s = h.wait().unwrap();
    assert!(s.write_error.is_none(), "{:?}", s.write_error);
    assert_eq!((s.stdout_bytes, s.stderr_bytes), (512, 21));
    let rb = read_back(&state.log_path(&id));
    assert_eq!(rb.out, [all.clone(), all].concat());
    assert_eq!(rb.err, b"no newline at the end");
    assert!(rb.ended && rb.seqs_ok && rb.markers.is_empty());
}

#[test]
fn a_100_mib_line_without_newline_through_few_small_buffers() {
    big_line(false);
}

#[test]
fn a_100_mib_line_with_inline_writes() {
    big_line(true);
}

fn big_line(inline_writes: bool) {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    // 4 buffers of 64 KiB: the writer is far faster than the pool, so it must be slowed down
    // by its full pipe (backpressure) and nothing may be lost.
    let cap = Capture::start(CaptureConfig {
        buffers: 4,
        buffer_size: 64 << 10,
        inline_writes,
        ..CaptureConfig::default()
    })
    .unwrap();
    let id = JobId::parse("big").unwrap();
    let (ro, mut wo) = pipe();
    let h = cap
        .add(id.clone(), Some(ro), None, state.create_job(&id).unwrap())
        .unwrap();
    let data = Arc::new(pattern(100 << 20, 7));
    let d = data.clone();
    let t = std::thread::spawn(move || wo.write_all(&d).unwrap());
    let s = h.wait().unwrap();
    t.join().unwrap();
    assert_eq!(s.stdout_bytes, 100 << 20);
    let rb = read_back(&state.log_path(&id));
    assert!(rb.out == *data, "stored bytes differ");
    assert!(rb.ended && rb.seqs_ok);
}

#[test]
fn stdout_and_stderr_are_drained_together() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig {
        pipe_size: 0,
        ..CaptureConfig::default()
    })
    .unwrap();
    let id = JobId::parse("both").unwrap();
    let (ro, mut wo) = pipe();
    let (re, mut we) = pipe();
    let h = cap
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    // One thread writes 4 MiB to stderr and only then to stdout: it blocks forever unless
    // stderr is drained while stdout is idle.
    let t = std::thread::spawn(move || {
        we.write_all(&pattern(4 << 20, 1)).unwrap();
        wo.write_all(&pattern(4 << 20, 2)).unwrap();
    });
    let s = h.wait().unwrap();
    t.join().unwrap();
    assert_eq!((s.stdout_bytes, s.stderr_bytes), (4 << 20, 4 << 20));
    let rb = read_back(&state.log_path(&id));
    assert!(rb.out == pattern(4 << 20, 2) && rb.err == pattern(4 << 20, 1));
}

#[test]
fn a_thousand_jobs_writing_at_once() {
    if !uring_ok() {
        return;
    }
    // 2 pipes + 2 log fds per job.
    let (_, hard) = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .zip(rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum)
        .unwrap_or((1024, 1024));
    if hard < 8192 {
        eprintln!("skipping: RLIMIT_NOFILE hard limit {hard} < 8192");
        return;
    }
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        },
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig {
        pipe_size: 0,
        ..CaptureConfig::default()
    })
    .unwrap();
    let mut jobs = Vec::new();
    for n in 0..1000 {
        let id = JobId::parse(&format!("j{n}")).unwrap();
        let (ro, mut wo) = pipe();
        let (re, mut we) = pipe();
        let h = cap
            .add(
                id.clone(),
                Some(ro),
                Some(re),
                state.create_job(&id).unwrap(),
            )
            .unwrap();
        let t = std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || {
                for line in 0..200 {
                    writeln!(wo, "job {n} out {line}").unwrap();
                    if line % 10 == 0 {
                        writeln!(we, "job {n} err {line}").unwrap();
                    }
                }
            })
            .unwrap();
        jobs.push((id, h, t, n));
    }
    for (id, h, t, n) in jobs {
        t.join().unwrap();
        let s = h.wait().unwrap();
        assert!(s.write_error.is_none(), "job {n}: {:?}", s.write_error);
        let rb = read_back(&state.log_path(&id));
        let want_out: String = (0..200).map(|l| format!("job {n} out {l}\n")).collect();
        let want_err: String = (0..200)
            .step_by(10)
            .map(|l| format!("job {n} err {l}\n"))
            .collect();
        assert_eq!(rb.out, want_out.as_bytes(), "job {n}");
        assert_eq!(rb.err, want_err.as_bytes(), "job {n}");
        assert!(rb.ended && rb.seqs_ok);
    }
}

#[test]
fn followers_attaching_at_random_moments_see_every_line_once_in_order() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig::default()).unwrap();
    let id = JobId::parse("race").unwrap();
    let (ro, wo) = pipe();
    let h = cap
        .add(id.clone(), Some(ro), None, state.create_job(&id).unwrap())
        .unwrap();
    const LINES: u64 = 1_500_000;
    let writer = std::thread::spawn(move || {
        let mut w = std::io::BufWriter::with_capacity(64 << 10, wo);
        for i in 0..LINES {
            writeln!(w, "{i}").unwrap();
        }
    });
    let mut seed = crate::store::now_ns() | 1;
    let mut readers = Vec::new();
    for r in 0..6 {
        // xorshift: random attach delays (0-400 ms) and, for half of the readers, a random
        // starting sequence number (--since).
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 400);
        let since = if r % 2 == 1 { 1 + (seed >> 20) % 50 } else { 1 };
        let state = state.clone();
        let id = id.clone();
        readers.push(std::thread::spawn(move || {
            std::thread::sleep(delay);
            let mut f = Follower::new(state.open_log(&id).unwrap(), since).unwrap();
            // A long backstop proves the waking is done by inotify, not by polling.
            f.set_backstop(Duration::from_secs(30));
            let mut text = Vec::new();
            let mut first_seq = None;
            let mut last_seq = 0;
            while let Some(c) = f.next_chunk().unwrap() {
                first_seq.get_or_insert(c.seq);
                assert_eq!(
                    c.seq,
                    last_seq.max(since - 1) + 1,
                    "reader {r}: seq gap or repeat"
                );
                last_seq = c.seq;
                text.extend_from_slice(&c.data);
            }
            (r, since, first_seq, text)
        }));
    }
    writer.join().unwrap();
    h.wait().unwrap();
    let all = read_back(&state.log_path(&id));
    for reader in readers {
        let (r, since, first_seq, text) = reader.join().unwrap();
        assert_eq!(first_seq, Some(since), "reader {r}");
        if since == 1 {
            // Parse: every number exactly once, in order.
            let mut next = 0u64;
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let n: u64 = std::str::from_utf8(line).unwrap().parse().unwrap();
                assert_eq!(n, next, "reader {r}: line out of order, duplicated or lost");
                next += 1;
            }
            assert_eq!(next, LINES, "reader {r}");
        } else {
            assert!(
                all.out.ends_with(&text),
                "reader {r}: not a suffix of the log"
            );
        }
    }
}

#[test]
fn size_caps_write_markers_and_keep_the_exact_prefix() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let job_cap = 1 << 20;
    let cap = Capture::start(CaptureConfig {
        job_cap: Some(job_cap),
        buffer_size: 64 << 10,
        ..CaptureConfig::default()
    })
    .unwrap();
    let id = JobId::parse("capped").unwrap();
    let (ro, mut wo) = pipe();
    let (re, mut we) = pipe();
    let h = cap
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    let data = pattern(3 << 20, 3);
    let d = data.clone();
    let t = std::thread::spawn(move || {
        wo.write_all(&d).unwrap();
        drop(wo);
        we.write_all(b"late stderr").unwrap();
    });
    let s = h.wait().unwrap();
    t.join().unwrap();
    let rb = read_back(&state.log_path(&id));
    assert!(rb.ended && rb.seqs_ok);
    assert!(data.starts_with(&rb.out), "stored stdout is not a prefix");
    assert_eq!(rb.out.len() as u64, s.stdout_bytes);
    assert_eq!(s.stdout_bytes + s.lost_stdout, 3 << 20);
    assert_eq!(s.lost_stderr, 11);
    assert!(!rb.markers.is_empty());
    assert!(
        rb.markers
            .iter()
            .all(|m| m.reason == TruncationReason::JobCap)
    );
    let marked: u64 = rb
        .markers
        .iter()
        .map(|m| m.lost_stdout + m.lost_stderr)
        .sum();
    assert_eq!(
        marked,
        s.lost_stdout + s.lost_stderr,
        "markers must account for every lost byte"
    );
    let size = std::fs::metadata(state.log_path(&id)).unwrap().len();
    assert!(size <= job_cap, "log of {size} bytes over its cap");
    assert!(size > job_cap - (128 << 10), "cap not filled: {size}");
}

#[test]
fn the_total_cap_spans_jobs() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig {
        total_cap: Some(1 << 20),
        ..CaptureConfig::default()
    })
    .unwrap();
    let mut lost = 0;
    let mut stored = 0;
    for n in 0..2 {
        let id = JobId::parse(&format!("t{n}")).unwrap();
        let (ro, mut wo) = pipe();
        let h = cap
            .add(id.clone(), Some(ro), None, state.create_job(&id).unwrap())
            .unwrap();
        let t = std::thread::spawn(move || wo.write_all(&pattern(700 << 10, 9)).unwrap());
        let s = h.wait().unwrap();
        t.join().unwrap();
        let rb = read_back(&state.log_path(&id));
        assert_eq!(rb.out.len() as u64, s.stdout_bytes);
        let marked: u64 = rb.markers.iter().map(|m| m.lost_stdout).sum();
        assert_eq!(marked, s.lost_stdout);
        lost += s.lost_stdout;
        stored += s.stdout_bytes;
        if n == 1 {
            assert!(
                rb.markers
                    .iter()
                    .any(|m| m.reason == TruncationReason::TotalCap)
            );
        }
    }
    assert_eq!(lost + stored, 2 * (700 << 10));
    assert!(stored < 1 << 20);
}

#[test]
fn a_full_disk_gives_an_error_a_marker_and_exact_bytes_up_to_it() {
    if !uring_ok()
        || !crate::testsupport::privileged("tmpfs mount", || {
            if rustix::process::geteuid().is_root() {
                Ok(())
            } else {
                Err("not root".into())
            }
        })
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    rustix::mount::mount(
        "tmpfs",
        &mnt,
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"size=4m",
    )
    .unwrap();
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }
    let _guard = Unmount(&mnt);
    let state = StateDir::new(&mnt);
    let cap = Capture::start(CaptureConfig {
        buffer_size: 256 << 10,
        ..CaptureConfig::default()
    })
    .unwrap();
    let id = JobId::parse("full").unwrap();
    let (ro, mut wo) = pipe();
    let (re, mut we) = pipe();
    let h = cap
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    let data = pattern(8 << 20, 5);
    let d = data.clone();
    let t = std::thread::spawn(move || {
        wo.write_all(&d).unwrap();
        we.write_all(b"after the disk filled").unwrap();
    });
    let s = h.wait().unwrap();
    t.join().unwrap();
    let err = s.write_error.as_ref().expect("a write error is reported");
    let msg = format!("{err}: {}", std::error::Error::source(err).unwrap());
    assert!(
        msg.contains("No space left") || msg.contains("os error 28"),
        "{msg}"
    );
    let rb = read_back(&state.log_path(&id));
    assert!(rb.seqs_ok);
    assert!(
        data.starts_with(&rb.out),
        "stored bytes are not the exact prefix"
    );
    assert_eq!(rb.out.len() as u64, s.stdout_bytes);
    assert_eq!(s.stdout_bytes + s.lost_stdout, 8 << 20);
    assert_eq!(s.lost_stderr, 21);
    assert!(!rb.markers.is_empty(), "no truncation marker");
    assert!(
        rb.markers
            .iter()
            .all(|m| m.reason == TruncationReason::DiskFull)
    );
    let marked: u64 = rb
        .markers
        .iter()
        .map(|m| m.lost_stdout + m.lost_stderr)
        .sum();
    assert_eq!(marked, s.lost_stdout + s.lost_stderr);
    assert!(rb.ended, "the end chunk fits in the reserved room");
}

#[test]
fn detach_and_attach_to_another_engine_loses_and_repeats_nothing() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let id = JobId::parse("handoff").unwrap();
    let (ro, wo) = pipe();
    let (re, we) = pipe();
    let a = Capture::start(CaptureConfig::default()).unwrap();
    let h = a
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    const LINES: u64 = 400_000;
    let writer = std::thread::spawn(move || {
        let mut wo = std::io::BufWriter::new(wo);
        let mut we = std::io::BufWriter::new(we);
        for i in 0..LINES {
            writeln!(wo, "{i}").unwrap();
            if i % 1000 == 0 {
                writeln!(we, "e{i}").unwrap();
            }
        }
    });
    std::thread::sleep(Duration::from_millis(30));
    let d = h.detach().unwrap().expect("job still running");
    // The "new process": a new engine and the log reopened from disk.
    let b = Capture::start(CaptureConfig::default()).unwrap();
    let (log, rec) = LogWriter::open(&d.log_path).unwrap();
    assert_eq!(rec.next_seq, d.next_seq);
    assert_eq!(rec.torn_bytes, 0);
    let h = b.add(id.clone(), d.stdout, d.stderr, log).unwrap();
    writer.join().unwrap();
    let s = h.wait().unwrap();
    assert!(s.write_error.is_none());
    drop(a);
    let rb = read_back(&state.log_path(&id));
    assert!(rb.ended && rb.seqs_ok);
    let want: String = (0..LINES).map(|i| format!("{i}\n")).collect();
    assert!(
        rb.out == want.as_bytes(),
        "stdout differs after the hand-off"
    );
    let want_err: String = (0..LINES)
        .step_by(1000)
        .map(|i| format!("e{i}\n"))
        .collect();
    assert_eq!(rb.err, want_err.as_bytes());
}

#[test]
fn the_terminal_copy_follows_the_store() {
    if !uring_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let cap = Capture::start(CaptureConfig::default()).unwrap();
    let id = JobId::parse("term").unwrap();
    let (ro, mut wo) = pipe();
    let (re, mut we) = pipe();
    let h = cap
        .add(
            id.clone(),
            Some(ro),
            Some(re),
            state.create_job(&id).unwrap(),
        )
        .unwrap();
    let reader = state.open_log(&id).unwrap();
    let follower = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let opts = crate::store::logs::LogsOptions {
            follow: true,
            ..Default::default()
        };
        let s = crate::store::logs::copy_logs(reader, &opts, &mut out, &mut err).unwrap();
        (s, out, err)
    });
    for i in 0..1000 {
        writeln!(wo, "line {i}").unwrap();
        if i % 100 == 0 {
            writeln!(we, "warn {i}").unwrap();
        }
    }
    drop((wo, we));
    h.wait().unwrap();
    let (s, out, err) = follower.join().unwrap();
    assert!(s.ended);
    let rb = read_back(&state.log_path(&id));
    assert_eq!(out, rb.out);
    assert_eq!(err, rb.err);
    assert_eq!(
        out.len(),
        (0..1000)
            .map(|i| format!("line {i}\n").len())
            .sum::<usize>()
    );
}
