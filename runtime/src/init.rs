//! `--init`: a minimal init that runs as the job's PID 1, starts the command as its child,
//! forwards signals to it and reaps every zombie of the namespace.
//!
//! Without it the command itself is PID 1, where the kernel drops signals it has no handler for
//! (so SIGTERM does nothing to most programs) and orphans are never reaped unless the command
//! does it. joblet's own binary is re-executed inside the job (from an fd, so it needs no path
//! in the job's root) under the name [`crate::spawn::INIT_ARGV0`].

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStringExt;

use rustix::process::{Pid, Signal, WaitOptions};

use crate::sys::misc::CStringArray;
use crate::sys::signal::SignalFd;

/// Signals forwarded to the command.
const FORWARDED: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
];

/// Runs the init with `args` (everything after `argv[0]`, starting with `--`). Returns the exit
/// code the init must exit with: the command's code, or 128 + the signal that killed it; 127/126
/// when the command cannot be found/executed.
pub fn run(args: Vec<OsString>) -> i32 {
    let mut it = args.into_iter().skip_while(|a| a != "--").skip(1);
    let Some(program) = it.next() else {
        eprintln!("joblet-init: no command");
        return 125;
    };
    let mut set: Vec<i32> = FORWARDED.to_vec();
    set.push(libc::SIGCHLD);
    let sigfd = match SignalFd::new(&set) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("joblet-init: failed to set up signals: {e}");
            return 125;
        }
    };
    let argv: Result<Vec<CString>, _> =
        std::iter::once(program.clone()).chain(it).map(|a| CString::new(a.into_vec())).collect();
    let Ok(argv) = argv else {
        eprintln!("joblet-init: the command contains a NUL byte");
        return 125;
    };
    let main_pid = match crate::sys::misc::spawn_clean(&CStringArray::new(argv)) {
        Ok(pid) => Pid::from_raw(pid),
        Err(e) => {
            eprintln!("joblet-init: {}: {e}", program.to_string_lossy());
            return if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
        }
    };
    loop {
        let mut fds = [rustix::event::PollFd::new(&sigfd, rustix::event::PollFlags::IN)];
        let _ = rustix::event::poll(&mut fds, None);
        while let Ok(Some(sig)) = sigfd.read() {
            if sig == libc::SIGCHLD {
                continue;
            }
            if let (Some(pid), Some(s)) = (main_pid, Signal::from_named_raw(sig)) {
                let _ = rustix::process::kill_process(pid, s);
            }
        }
        // Reap everything that exited: the command and any orphan re-parented to us.
        loop {
            match rustix::process::wait(WaitOptions::NOHANG) {
                Ok(Some((pid, status))) => {
                    if Some(pid) == main_pid {
                        if let Some(sig) = status.terminating_signal() {
                            return 128 + sig;
                        }
                        return status.exit_status().unwrap_or(0);
                    }
                }
                _ => break,
            }
        }
    }
}
