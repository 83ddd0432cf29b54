//! Placeholder default seccomp filter (replaced by the full filter).

use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// Errors building the filter.
#[derive(Debug, thiserror::Error)]
#[error("failed to build the seccomp filter: {0}")]
pub struct SeccompError(String);

pub(crate) fn default_filter() -> Result<&'static BpfProgram, SeccompError> {
    static F: OnceLock<Result<BpfProgram, String>> = OnceLock::new();
    F.get_or_init(|| {
        let rules = [libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_chroot]
            .into_iter()
            .map(|n| (n, vec![]))
            .collect();
        let arch = std::env::consts::ARCH.try_into().map_err(|e| format!("{e:?}"))?;
        let f = SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch)
            .map_err(|e| e.to_string())?;
        f.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
    })
    .as_ref()
    .map_err(|e| SeccompError(e.clone()))
}

pub(crate) fn install(prog: &BpfProgram) -> Result<(), rustix::io::Errno> {
    seccompiler::apply_filter(prog).map_err(|_| rustix::io::Errno::INVAL)
}
