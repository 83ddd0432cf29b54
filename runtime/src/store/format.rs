//! The on-disk log format: a 16-byte file header, then chunks, each a 32-byte header and its
//! payload. Everything here is pure encoding and decoding; I/O lives in the writer and reader.
//!
//! ```text
//! file header  0..8   magic "JOBLETLG"
//!              8..12  format version (u32 LE, = 1)
//!              12..16 reserved, zero
//! chunk header 0..4   CRC-32 (IEEE) of header bytes 4..32 followed by the payload
//!              4..8   payload length (u32 LE)
//!              8..16  sequence number (u64 LE), 1 for the first chunk, +1 per chunk
//!              16..24 timestamp, nanoseconds since the Unix epoch (u64 LE)
//!              24     kind: 1 stdout, 2 stderr, 3 truncation marker, 4 end
//!              25..32 reserved, zero
//! ```
//!
//! A chunk is valid only when its whole payload is present and its CRC matches: a reader never
//! returns a partially written chunk, and recovery truncates a torn tail at the first invalid
//! chunk.

use crate::store::Stream;

/// The file header's magic.
pub(crate) const FILE_MAGIC: &[u8; 8] = b"JOBLETLG";
/// The format version written in the file header.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// Length of the file header.
pub const FILE_HEADER_LEN: u64 = 16;
/// Length of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// The largest payload a chunk may carry; a header claiming more is corrupt.
pub const MAX_CHUNK_PAYLOAD: u32 = 64 << 20;
/// Length of a truncation marker's fixed part (reason, lost stdout, lost stderr).
pub(crate) const MARKER_FIXED_LEN: usize = 24;

/// Chunk kinds as stored.
pub(crate) const KIND_STDOUT: u8 = 1;
pub(crate) const KIND_STDERR: u8 = 2;
pub(crate) const KIND_MARKER: u8 = 3;
pub(crate) const KIND_END: u8 = 4;

/// The file header bytes.
pub(crate) fn file_header() -> [u8; FILE_HEADER_LEN as usize] {
    let mut h = [0u8; FILE_HEADER_LEN as usize];
    h[..8].copy_from_slice(FILE_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h
}

/// Checks a file header; returns why it is not one.
pub(crate) fn check_file_header(h: &[u8]) -> Result<(), String> {
    if h.len() < FILE_HEADER_LEN as usize || &h[..8] != FILE_MAGIC {
        return Err("not a joblet log (bad magic)".to_owned());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("unsupported log format version {version}"));
    }
    Ok(())
}

/// The kind byte of a stream's data chunks.
pub(crate) fn stream_kind(stream: Stream) -> u8 {
    match stream {
        Stream::Stdout => KIND_STDOUT,
        Stream::Stderr => KIND_STDERR,
    }
}

/// Encodes a chunk header; the CRC covers the header's tail and `payload`, which may be given in
/// pieces (the engine writes a chunk straight from its read buffer).
pub(crate) fn encode_header(
    kind: u8,
    seq: u64,
    ts_ns: u64,
    payload: &[&[u8]],
) -> [u8; CHUNK_HEADER_LEN] {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let len = u32::try_from(len).expect("chunk payload fits in u32");
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..24].copy_from_slice(&ts_ns.to_le_bytes());
    h[24] = kind;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..]);
    for p in payload {
        crc.update(p);
    }
    h[..4].copy_from_slice(&crc.finalize().to_le_bytes());
    h
}

/// A decoded chunk header (CRC not yet checked against the payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) crc: u32,
    pub(crate) len: u32,
    pub(crate) seq: u64,
    pub(crate) ts_ns: u64,
    pub(crate) kind: u8,
}

/// Decodes a chunk header; `Err` when it cannot be one (unknown kind, oversized, reserved bytes
/// set).
pub(crate) fn decode_header(h: &[u8; CHUNK_HEADER_LEN]) -> Result<Header, String> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    let header = Header {
        crc: u32_at(0),
        len: u32_at(4),
        seq: u64_at(8),
        ts_ns: u64_at(16),
        kind: h[24],
    };
    if !(KIND_STDOUT..=KIND_END).contains(&header.kind) {
        return Err(format!("unknown chunk kind {}", header.kind));
    }
    if header.len > MAX_CHUNK_PAYLOAD {
        return Err(format!("chunk length {} over the maximum", header.len));
    }
    if h[25..].iter().any(|&b| b != 0) {
        return Err("reserved header bytes set".to_owned());
    }
    Ok(header)
}

/// Whether `payload` matches the header's CRC.
pub(crate) fn crc_matches(
    raw_header: &[u8; CHUNK_HEADER_LEN],
    header: &Header,
    payload: &[u8],
) -> bool {
    let mut crc = crc32fast::Hasher::new();
    crc.update(&raw_header[4..]);
    crc.update(payload);
    crc.finalize() == header.crc
}

/// Why output was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncationReason {
    /// The job's log reached its size cap.
    JobCap,
    /// All logs of the capture engine together reached the total cap.
    TotalCap,
    /// The filesystem holding the state dir is full (ENOSPC, or no room could be reserved).
    DiskFull,
    /// Writing the log failed for another reason (the message says which).
    WriteError,
}

impl TruncationReason {
    fn code(self) -> u8 {
        match self {
            TruncationReason::JobCap => 1,
            TruncationReason::TotalCap => 2,
            TruncationReason::DiskFull => 3,
            TruncationReason::WriteError => 4,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => TruncationReason::JobCap,
            2 => TruncationReason::TotalCap,
            3 => TruncationReason::DiskFull,
            4 => TruncationReason::WriteError,
            _ => return None,
        })
    }
}

/// A truncation marker: output of the job that was not stored, since the previous marker.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Marker {
    /// Why it was dropped.
    pub reason: TruncationReason,
    /// Bytes of stdout dropped.
    pub lost_stdout: u64,
    /// Bytes of stderr dropped.
    pub lost_stderr: u64,
    /// A human-readable explanation (e.g. the cap, or the OS error).
    pub message: String,
}

impl Marker {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MARKER_FIXED_LEN + self.message.len());
        v.push(self.reason.code());
        v.extend_from_slice(&[0; 7]);
        v.extend_from_slice(&self.lost_stdout.to_le_bytes());
        v.extend_from_slice(&self.lost_stderr.to_le_bytes());
        v.extend_from_slice(self.message.as_bytes());
        v
    }

    pub(crate) fn decode(p: &[u8]) -> Option<Self> {
        if p.len() < MARKER_FIXED_LEN {
            return None;
        }
        Some(Marker {
            reason: TruncationReason::from_code(p[0])?,
            lost_stdout: u64::from_le_bytes(p[8..16].try_into().ok()?),
            lost_stderr: u64::from_le_bytes(p[16..24].try_into().ok()?),
            message: String::from_utf8_lossy(&p[24..]).into_owned(),
        })
    }
}

impl std::fmt::Display for Marker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "joblet: output truncated ({}): {} bytes of stdout and {} bytes of stderr not stored: {}",
            match self.reason {
                TruncationReason::JobCap => "job log cap",
                TruncationReason::TotalCap => "total log cap",
                TruncationReason::DiskFull => "disk full",
                TruncationReason::WriteError => "write error",
            },
            self.lost_stdout,
            self.lost_stderr,
            self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_crc_detects_flips() {
        let payload = b"hello";
        let raw = encode_header(KIND_STDERR, 7, 99, &[&payload[..2], &payload[2..]]);
        let h = decode_header(&raw).unwrap();
        assert_eq!((h.len, h.seq, h.ts_ns, h.kind), (5, 7, 99, KIND_STDERR));
        assert!(crc_matches(&raw, &h, payload));
        assert!(!crc_matches(&raw, &h, b"hellp"));
        let mut bad = raw;
        bad[24] = 9;
        assert!(decode_header(&bad).is_err());
    }

    #[test]
    fn marker_round_trips() {
        let m = Marker {
            reason: TruncationReason::DiskFull,
            lost_stdout: 12,
            lost_stderr: 1 << 40,
            message: "no space".into(),
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        assert_eq!(Marker::decode(&[3; 5]), None);
    }
}
