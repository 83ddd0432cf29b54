//! Unit tests of the store: format round trips, torn tails, records.

use std::io::Write as _;

use super::*;
use crate::job::JobId;

fn data_chunks(path: &Path) -> Vec<Chunk> {
    let mut r = LogReader::open(path).unwrap();
    let mut v = Vec::new();
    while let Some(c) = r.try_next().unwrap() {
        v.push(c);
    }
    v
}

#[test]
fn appended_chunks_read_back_in_order_with_all_byte_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(w.append(Stream::Stdout, &all).unwrap(), 1);
    assert_eq!(w.append(Stream::Stderr, b"no newline").unwrap(), 2);
    assert_eq!(w.finish().unwrap(), 3);
    let chunks = data_chunks(&path);
    assert_eq!(chunks.len(), 3);
    assert_eq!(chunks[0].kind, ChunkKind::Data(Stream::Stdout));
    assert_eq!(chunks[0].data, all);
    assert_eq!(chunks[1].kind, ChunkKind::Data(Stream::Stderr));
    assert_eq!(chunks[1].data, b"no newline");
    assert_eq!(chunks[2].kind, ChunkKind::End);
    assert_eq!(
        chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[test]
fn a_partial_chunk_is_not_returned_until_complete() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    w.append(Stream::Stdout, b"first").unwrap();
    drop(w);
    // Simulate a writer in the middle of writing the second chunk.
    let full = format::encode_header(format::KIND_STDOUT, 2, 5, &[b"second"]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&full).unwrap();
    f.write_all(b"sec").unwrap();
    let mut r = LogReader::open(&path).unwrap();
    assert_eq!(r.try_next().unwrap().unwrap().data, b"first");
    assert_eq!(r.try_next().unwrap(), None);
    assert_eq!(r.try_next().unwrap(), None);
    f.write_all(b"ond").unwrap();
    let c = r.try_next().unwrap().unwrap();
    assert_eq!((c.seq, c.data.as_slice()), (2, &b"second"[..]));
}

#[test]
fn recovery_truncates_a_torn_or_corrupt_tail_and_continues_the_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    w.append(Stream::Stdout, b"one").unwrap();
    w.append(Stream::Stdout, b"two").unwrap();
    let good_len = w.len();
    drop(w);
    // A complete-length chunk whose payload is garbage (a power cut's zeroed page) and a tail.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&format::encode_header(
        format::KIND_STDOUT,
        3,
        5,
        &[b"three"],
    ))
    .unwrap();
    f.write_all(b"\0\0\0\0\0garbage").unwrap();
    drop(f);
    let mut r = LogReader::open(&path).unwrap();
    r.try_next().unwrap();
    r.try_next().unwrap();
    assert!(matches!(r.try_next(), Err(StoreError::Corrupt { .. })));

    let (mut w, rec) = LogWriter::open(&path).unwrap();
    assert_eq!(rec.chunks, 2);
    assert_eq!(rec.next_seq, 3);
    assert_eq!(rec.valid_len, good_len);
    assert_eq!(rec.torn_bytes, 32 + 12);
    assert_eq!(w.append(Stream::Stderr, b"three").unwrap(), 3);
    w.finish().unwrap();
    let chunks = data_chunks(&path);
    let datas: Vec<&[u8]> = chunks.iter().map(|c| c.data.as_slice()).collect();
    assert_eq!(datas, vec![&b"one"[..], b"two", b"three", b""]);
    assert!(matches!(
        LogWriter::open(&path),
        Err(StoreError::Ended { .. })
    ));
}

#[test]
fn skip_to_and_since() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    for i in 0..10u8 {
        w.append(Stream::Stdout, &[b'0' + i]).unwrap();
    }
    let mut r = LogReader::open(&path).unwrap();
    assert!(r.skip_to(7).unwrap());
    assert_eq!(r.try_next().unwrap().unwrap().data, b"6");
    assert!(!r.skip_to(20).unwrap());
    assert_eq!(r.position().1, 11);
    w.finish().unwrap();
    let mut out = Vec::new();
    let mut err = Vec::new();
    let opts = logs::LogsOptions {
        since: 9,
        ..Default::default()
    };
    let s = logs::copy_logs(LogReader::open(&path).unwrap(), &opts, &mut out, &mut err).unwrap();
    assert_eq!(out, b"89");
    assert!(s.ended);
}

#[test]
fn records_are_replaced_atomically_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path());
    let id = JobId::parse("job1").unwrap();
    let mut rec = crate::job::JobRecord {
        id: id.clone(),
        name: None,
        labels: Default::default(),
        command: vec!["true".into()],
        state: crate::job::JobState::Running,
        exit_code: None,
        signal: None,
        oom_killed: false,
        timed_out: false,
        stopped: false,
        started_at_ns: 5,
        wall_ns: 0,
        cpu_user_ns: 0,
        cpu_system_ns: 0,
        memory_peak_bytes: None,
        limits: Default::default(),
        runtime: Default::default(),
        error: None,
        output: None,
        latency: None,
    };
    state.create_job(&id).unwrap();
    state.write_record(&rec).unwrap();
    rec.state = crate::job::JobState::Exited;
    rec.exit_code = Some(0);
    state.write_record(&rec).unwrap();
    assert_eq!(state.read_record(&id).unwrap(), rec);
    assert_eq!(state.records().unwrap(), vec![rec.clone()]);
    assert!(logs::ps_filter(state.records().unwrap(), false).is_empty());
    let table = logs::ps_table(&[rec], 10);
    assert!(
        table.contains("job1") && table.contains("exited"),
        "{table}"
    );
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(state.job_dir(&id))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let missing = JobId::parse("nope").unwrap();
    assert!(matches!(
        state.read_record(&missing),
        Err(StoreError::NoSuchJob { .. })
    ));
}

#[test]
fn state_dir_resolution_prefers_the_flag() {
    let s = StateDir::resolve(Some("/x".into()));
    assert_eq!(s.root(), Path::new("/x"));
}

#[test]
fn a_log_has_one_writer_until_it_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    w.append(Stream::Stdout, b"one").unwrap();
    assert!(
        matches!(LogWriter::open(&path), Err(StoreError::Locked { .. })),
        "a second writer while the first lives"
    );
    // Readers take no lock.
    assert_eq!(
        LogReader::open(&path)
            .unwrap()
            .try_next()
            .unwrap()
            .unwrap()
            .data,
        b"one"
    );
    drop(w);
    let (w2, rec) = LogWriter::open(&path).unwrap();
    assert_eq!(rec.next_seq, 2);
    assert!(matches!(
        LogWriter::open(&path),
        Err(StoreError::Locked { .. })
    ));
    drop(w2);
}

#[test]
fn reopen_at_checks_the_last_chunk_and_cuts_only_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let w = LogWriter::create(&path).unwrap();
    let empty = w.end();
    assert_eq!((empty.next_seq, empty.last_chunk), (1, None));
    drop(w);
    // An empty log reopens from its end.
    let (mut w, rec) = LogWriter::reopen_at(&path, empty).unwrap();
    assert_eq!((rec.chunks, rec.torn_bytes), (0, 0));
    w.append(Stream::Stdout, b"one").unwrap();
    w.append(Stream::Stderr, b"two").unwrap();
    let end = w.end();
    assert_eq!(end.next_seq, 3);
    assert_eq!(end.last_chunk, Some(end.len - 32 - 3));
    // Held by a live writer.
    assert!(matches!(
        LogWriter::reopen_at(&path, end),
        Err(StoreError::Locked { .. })
    ));
    drop(w);

    let not_at = |e: LogEnd| {
        let r = LogWriter::reopen_at(&path, e);
        assert!(
            matches!(r, Err(StoreError::NotAt { .. })),
            "{e:?} accepted: {r:?}"
        );
    };
    not_at(LogEnd { next_seq: 4, ..end });
    not_at(LogEnd {
        len: end.len - 1,
        ..end
    });
    not_at(LogEnd {
        last_chunk: Some(end.last_chunk.unwrap() - 1),
        ..end
    });
    not_at(LogEnd {
        last_chunk: None,
        ..end
    });
    not_at(LogEnd {
        len: end.len + 1,
        ..end
    });
    // A torn chunk after the end is cut.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&[9u8; 40]).unwrap();
    drop(f);
    let (mut w, rec) = LogWriter::reopen_at(&path, end).unwrap();
    assert_eq!((rec.chunks, rec.next_seq, rec.torn_bytes), (2, 3, 40));
    assert_eq!(w.append(Stream::Stdout, b"three").unwrap(), 3);
    let later = w.end();
    drop(w);
    // A complete chunk after the end: someone wrote after the end was taken.
    not_at(end);
    let (w, _) = LogWriter::reopen_at(&path, later).unwrap();
    w.finish().unwrap();
    let chunks = data_chunks(&path);
    let datas: Vec<&[u8]> = chunks.iter().map(|c| c.data.as_slice()).collect();
    assert_eq!(datas, vec![&b"one"[..], b"two", b"three", b""]);
}

#[test]
fn a_fast_log_reserves_ahead_in_proportion_and_releases_it_at_the_end() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut w = LogWriter::create(&path).unwrap();
    let piece = vec![7u8; 256 << 10];
    // The most held past the end of the file at any point.
    let mut most_ahead = 0;
    for _ in 0..64 {
        w.append(Stream::Stdout, &piece).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        most_ahead = most_ahead.max((meta.blocks() * 512).saturating_sub(meta.size()));
    }
    if most_ahead == 0 {
        // A filesystem without FALLOC_FL_KEEP_SIZE: nothing is reserved, nothing to check.
        eprintln!("no reservation support in {}", dir.path().display());
        return;
    }
    // Past 12 MiB written the reserve is renewed by an eighth of the log (1.5 MiB or more), not
    // by one 256 KiB append: a fallocate call every few MiB.
    assert!(
        most_ahead >= 3 << 19,
        "at most {most_ahead} bytes reserved ahead"
    );
    assert!(most_ahead <= 33 << 20);
    w.finish().unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        meta.blocks() * 512 < meta.size() + (1 << 20),
        "the reserve is released when the log ends"
    );
}
