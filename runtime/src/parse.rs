//! Parsing of the values users give joblet: sizes, durations, CPU lists, device rates, binds,
//! users, capabilities. Each parser returns a [`ParseError`] that says what was wrong with the
//! value; the caller adds which option it came from.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use rustix::thread::CapabilitySet;

use crate::job::{Bind, CpuList, DevNum};

/// A value that could not be parsed; the message names the problem with the value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// A byte size: `512`, `64K`, `64k`, `100M`, `1.5G`, `2GiB`, `1T`. Binary multiples.
pub fn size(s: &str) -> Result<u64, ParseError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return err(format!(
            "invalid size {s:?}: expected a number such as 512M"
        ));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return err(format!(
                "invalid size {s:?}: unknown unit {unit:?} (use K, M, G or T)"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| ParseError(format!("invalid size {s:?}: {num:?} is not a number")))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return err(format!("invalid size {s:?}: too large"));
    }
    Ok(bytes as u64)
}

/// A duration: `500ms`, `10s`, `1.5m`, `2h`, `250us`; a bare number is seconds.
pub fn duration(s: &str) -> Result<Duration, ParseError> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        ParseError(format!(
            "invalid duration {s:?}: expected a number with a unit such as 500ms or 10s"
        ))
    })?;
    let secs = match unit {
        "" | "s" => value,
        "ms" => value / 1e3,
        "us" | "µs" => value / 1e6,
        "ns" => value / 1e9,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return err(format!(
                "invalid duration {s:?}: unknown unit {unit:?} (use ms, s, m, h or d)"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| ParseError(format!("invalid duration {s:?}")))
}

/// A CPU percentage: a positive integer, 100 = one full core.
pub fn cpu_percent(s: &str) -> Result<u32, ParseError> {
    match s.trim().trim_end_matches('%').parse::<u32>() {
        Ok(0) => err(format!("invalid CPU percent {s:?}: must be at least 1")),
        Ok(v) => Ok(v),
        Err(_) => err(format!(
            "invalid CPU percent {s:?}: expected a positive integer, 100 = one core"
        )),
    }
}

/// A kernel CPU list: `0`, `0-1`, `0,2-3`.
pub fn cpu_list(s: &str) -> Result<CpuList, ParseError> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',') {
        let bad = || {
            ParseError(format!(
                "invalid CPU list {s:?}: expected e.g. 0, 0-1 or 0,2-3"
            ))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: u32 = a.trim().parse().map_err(|_| bad())?;
        let b: u32 = b.trim().parse().map_err(|_| bad())?;
        if a > b || b - a > 4096 {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    if cpus.is_empty() {
        return err(format!("invalid CPU list {s:?}: empty"));
    }
    Ok(CpuList::new(cpus))
}

/// A device number `MAJ:MIN`.
pub fn dev_num(s: &str) -> Result<DevNum, ParseError> {
    let bad = || {
        ParseError(format!(
            "invalid device {s:?}: expected MAJ:MIN such as 8:0"
        ))
    };
    let (a, b) = s.trim().split_once(':').ok_or_else(bad)?;
    Ok(DevNum {
        major: a.parse().map_err(|_| bad())?,
        minor: b.parse().map_err(|_| bad())?,
    })
}

/// A device rate `MAJ:MIN=RATE` where RATE is a size per second (`10M`).
pub fn io_rate(s: &str) -> Result<(DevNum, u64), ParseError> {
    let (dev, rate) = s.split_once('=').ok_or_else(|| {
        ParseError(format!(
            "invalid IO limit {s:?}: expected MAJ:MIN=RATE such as 8:0=10M"
        ))
    })?;
    let rate = size(rate.trim_end_matches("/s"))?;
    if rate == 0 {
        return err(format!("invalid IO limit {s:?}: rate must be positive"));
    }
    Ok((dev_num(dev)?, rate))
}

/// A bind mount `SRC:DST[:rw|:ro]`; both paths absolute, DST without `..`.
pub fn bind(s: &str) -> Result<Bind, ParseError> {
    let mut parts = s.split(':');
    let (src, dst) = match (parts.next(), parts.next()) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => (a, b),
        _ => return err(format!("invalid bind {s:?}: expected SRC:DST[:rw]")),
    };
    let writable = match parts.next() {
        None | Some("ro") => false,
        Some("rw") => true,
        Some(m) => {
            return err(format!(
                "invalid bind {s:?}: unknown mode {m:?} (use ro or rw)"
            ));
        }
    };
    if parts.next().is_some() {
        return err(format!("invalid bind {s:?}: too many ':'"));
    }
    let target = job_path(dst).map_err(|e| ParseError(format!("invalid bind {s:?}: {e}")))?;
    if target == Path::new("/") {
        return err(format!(
            "invalid bind {s:?}: cannot bind over the job's root (use --rootfs)"
        ));
    }
    if !src.starts_with('/') {
        return err(format!(
            "invalid bind {s:?}: source must be an absolute path"
        ));
    }
    Ok(Bind {
        source: PathBuf::from(src),
        target,
        writable,
    })
}

/// An absolute path inside the job, normalised, with no `..`.
pub fn job_path(s: &str) -> Result<PathBuf, ParseError> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return err(format!("path {s:?} must be absolute"));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return err(format!("path {s:?} must not contain '..'"));
            }
        }
    }
    Ok(out)
}

/// `UID[:GID]`; GID defaults to UID.
pub fn user(s: &str) -> Result<(u32, u32), ParseError> {
    let bad = || {
        ParseError(format!(
            "invalid user {s:?}: expected UID[:GID] such as 1000 or 1000:1000"
        ))
    };
    let (u, g) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid: u32 = u.trim().parse().map_err(|_| bad())?;
    let gid: u32 = match g {
        Some(g) => g.trim().parse().map_err(|_| bad())?,
        None => uid,
    };
    if uid == u32::MAX || gid == u32::MAX {
        return Err(bad());
    }
    Ok((uid, gid))
}

/// A capability name: `NET_ADMIN`, `CAP_NET_ADMIN`, `cap_net_admin`.
pub fn capability(s: &str) -> Result<CapabilitySet, ParseError> {
    let upper = s.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CapabilitySet::from_name(name).ok_or_else(|| ParseError(format!("unknown capability {s:?}")))
}

/// `KEY=VALUE` for `--env` and `--label`; KEY non-empty, no `=` or NUL anywhere odd.
pub fn key_value(s: &str) -> Result<(String, String), ParseError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains('\0') && !v.contains('\0') => {
            Ok((k.to_owned(), v.to_owned()))
        }
        _ => err(format!("invalid {s:?}: expected KEY=VALUE")),
    }
}

/// A hostname: 1-64 characters of letters, digits, `-` and `.`.
pub fn hostname(s: &str) -> Result<String, ParseError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(s.to_owned())
    } else {
        err(format!(
            "invalid hostname {s:?}: use 1-64 letters, digits, '-' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(size("512").unwrap(), 512);
        assert_eq!(size("64K").unwrap(), 64 << 10);
        assert_eq!(size("100m").unwrap(), 100 << 20);
        assert_eq!(size("1.5G").unwrap(), 3 << 29);
        assert_eq!(size("2GiB").unwrap(), 2 << 30);
        assert!(
            size("12Q")
                .unwrap_err()
                .to_string()
                .contains("unknown unit")
        );
        assert!(size("").is_err());
        assert!(size("-5M").is_err());
        assert!(size("1e40T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(duration("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(duration("soon").is_err());
        assert!(duration("5y").is_err());
    }

    #[test]
    fn cpu_percents() {
        assert_eq!(cpu_percent("50").unwrap(), 50);
        assert_eq!(cpu_percent("150%").unwrap(), 150);
        assert!(cpu_percent("-5").is_err());
        assert!(cpu_percent("0").is_err());
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0").unwrap().cpus(), &[0]);
        assert_eq!(cpu_list("0-1").unwrap().cpus(), &[0, 1]);
        assert_eq!(cpu_list("3,0-1").unwrap().cpus(), &[0, 1, 3]);
        assert!(cpu_list("1-0").is_err());
        assert!(cpu_list("a").is_err());
        assert!(cpu_list("").is_err());
    }

    #[test]
    fn io_rates() {
        let (d, r) = io_rate("8:0=10M").unwrap();
        assert_eq!((d.major, d.minor, r), (8, 0, 10 << 20));
        assert!(io_rate("8:0").is_err());
        assert!(io_rate("sda=1M").is_err());
        assert!(io_rate("8:0=0").is_err());
    }

    #[test]
    fn binds() {
        let b = bind("/data:/mnt/data").unwrap();
        assert!(!b.writable);
        assert_eq!(b.target, PathBuf::from("/mnt/data"));
        assert!(bind("/data:/mnt:rw").unwrap().writable);
        assert!(bind("/data:/mnt:rx").is_err());
        assert!(bind("data:/mnt").is_err());
        assert!(bind("/data:mnt").is_err());
        assert!(bind("/data:/../etc").is_err());
        assert!(bind("/data:/").is_err());
    }

    #[test]
    fn users() {
        assert_eq!(user("1000").unwrap(), (1000, 1000));
        assert_eq!(user("0:5").unwrap(), (0, 5));
        assert!(user("root").is_err());
    }

    #[test]
    fn capabilities() {
        assert_eq!(capability("NET_ADMIN").unwrap(), CapabilitySet::NET_ADMIN);
        assert_eq!(
            capability("cap_sys_admin").unwrap(),
            CapabilitySet::SYS_ADMIN
        );
        assert!(
            capability("CAP_FLY")
                .unwrap_err()
                .to_string()
                .contains("unknown capability")
        );
    }

    #[test]
    fn key_values_and_hostnames() {
        assert_eq!(key_value("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(key_value("=x").is_err());
        assert!(key_value("nokey").is_err());
        assert!(hostname("job-1.local").is_ok());
        assert!(hostname("bad host").is_err());
    }
}
