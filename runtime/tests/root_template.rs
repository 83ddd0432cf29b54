//! The root template (`RuntimeConfig::root_template`), as root: a job that copies the template
//! must see exactly the root a job that builds its own sees, with the same isolation, and the
//! template must leave nothing in the host's mount table.
//!
//! The CLI's integration tests run one-shot jobs, which build their own root; these tests go
//! through `Runtime` directly, the way the daemon and the benchmark do.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;

use joblet_runtime::job::{JobId, JobSpec, Sandbox};
use joblet_runtime::testsupport::privileged;
use joblet_runtime::{ExitStatus, Runtime, RuntimeConfig, Stdio, StopReason};

fn gate() -> bool {
    privileged("mount namespaces and cgroups", || {
        if !Path::new("/proc/thread-self/ns/mnt").exists() {
            return Err("no /proc/thread-self/ns/mnt".into());
        }
        Ok(())
    })
}

fn runtime(state: &Path, root_template: bool) -> Runtime {
    Runtime::new(&RuntimeConfig {
        state_dir: state.to_owned(),
        cgroup_pool: 0,
        root_template,
        ..RuntimeConfig::default()
    })
    .expect("create the runtime")
}

fn spec(sandbox: Sandbox, script: &str) -> JobSpec {
    JobSpec {
        id: JobId::generate(),
        name: None,
        labels: Default::default(),
        command: ["/bin/sh", "-c", script]
            .into_iter()
            .map(OsString::from)
            .collect(),
        env: Vec::new(),
        limits: Default::default(),
        sandbox,
    }
}

/// Runs `script` in a job; returns (exit code, stdout+stderr, spawn path).
fn run(rt: &Runtime, sandbox: Sandbox, script: &str) -> (i32, String, String) {
    let (mut rd, wr) = std::io::pipe().expect("pipe");
    let wr: OwnedFd = wr.into();
    let stdio = Stdio {
        stdin: None,
        stdout: wr.try_clone().expect("dup"),
        stderr: wr,
    };
    let job = rt
        .spawn(&spec(sandbox, script), stdio)
        .unwrap_or_else(|e| panic!("spawn {script:?}: {e}"));
    let path = job.record().runtime.spawn_path.clone();
    let mut out = String::new();
    rd.read_to_string(&mut out).expect("read the job's output");
    let status = job.wait().expect("wait");
    let record = job.finish(status, StopReason::default());
    assert!(record.error.is_none(), "{:?}", record.error);
    let code = match status {
        ExitStatus::Code(c) => c,
        ExitStatus::Signal(s) => 128 + s,
    };
    (code, out, path)
}

/// Mount points with their per-mount options and filesystem type, without the ids, device
/// numbers and superblock options that differ between any two jobs.
fn layout(mountinfo: &str) -> Vec<String> {
    let mut v: Vec<String> = mountinfo
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let sep = f
                .iter()
                .position(|x| *x == "-")
                .expect("mountinfo separator");
            // root-in-fs, mount point, mount options, fs type
            format!("{} {} {} {}", f[3], f[4], f[5], f[sep + 1])
        })
        .collect();
    v.sort();
    v
}

#[test]
fn template_root_is_the_same_root_as_a_built_one() {
    if !gate() {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let with = runtime(state.path(), true);
    let without = runtime(state.path(), false);
    let (c1, m1, p1) = run(&with, Sandbox::default(), "cat /proc/self/mountinfo");
    let (c2, m2, p2) = run(&without, Sandbox::default(), "cat /proc/self/mountinfo");
    assert_eq!((c1, c2), (0, 0), "{m1}\n{m2}");
    assert!(p1.ends_with("+root-template"), "{p1}");
    assert!(!p2.contains("root-template"), "{p2}");
    assert_eq!(layout(&m1), layout(&m2), "template:\n{m1}\nbuilt:\n{m2}");
    // Sanity: the layout really is the minimal root, read-only, with the per-job mounts.
    let l = layout(&m1);
    assert!(l.iter().any(|x| x.starts_with("/ / ro,")), "{l:#?}");
    for (point, fs) in [("/tmp", "tmpfs"), ("/work", "tmpfs"), ("/proc", "proc")] {
        assert!(
            l.iter()
                .any(|x| x.split(' ').nth(1) == Some(point) && x.ends_with(fs)),
            "{point} {fs} missing in {l:#?}"
        );
    }
}

#[test]
fn template_jobs_are_isolated_from_each_other_and_the_host() {
    if !gate() {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let host_secret = state.path().join("host-secret");
    std::fs::write(&host_secret, "x").expect("write a host file");
    let host_mounts = layout(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"));
    let rt = runtime(state.path(), true);
    let root = Sandbox {
        uid: 0,
        gid: 0,
        ..Sandbox::default()
    };
    let script = format!(
        "set -u
         [ \"$$\" = 1 ] || {{ echo not pid 1; exit 1; }}
         [ -e {secret} ] && {{ echo host file visible; exit 1; }}
         [ -e /tmp/left-by-another-job ] && {{ echo /tmp shared; exit 1; }}
         touch /tmp/left-by-another-job || {{ echo /tmp not writable; exit 1; }}
         touch /work/w || {{ echo /work not writable; exit 1; }}
         for f in /x /etc/x /usr/x /dev/x; do
           touch $f 2>/dev/null && {{ echo $f writable; exit 1; }}
         done
         echo 1 > /proc/sys/kernel/hostname 2>/dev/null && {{ echo /proc/sys writable; exit 1; }}
         mount -t tmpfs none /tmp 2>/dev/null && {{ echo mount allowed; exit 1; }}
         [ $(wc -l < /proc/self/mountinfo) -lt 40 ] || {{ echo host mounts visible; exit 1; }}
         # 0-2 and the directory ls reads: nothing of joblet's (the template's fd) leaks in.
         [ $(ls /proc/self/fd | wc -l) -le 4 ] || {{ ls -l /proc/self/fd; exit 1; }}
         exit 0",
        secret = host_secret.display()
    );
    for i in 0..20 {
        let (code, out, path) = run(&rt, root.clone(), &script);
        assert_eq!(code, 0, "job {i}: {out}");
        assert!(path.ends_with("+root-template"), "{path}");
    }
    // Nothing of the template or the jobs reached the host's mount table.
    let after = layout(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"));
    assert_eq!(host_mounts, after);
    drop(rt);
    state.close().expect("nothing mounted on the state dir");
}

#[test]
fn template_is_rebuilt_when_etc_changes_and_binds_build_their_own_root() {
    if !gate() {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let rt = runtime(state.path(), true);
    let (code, out, _) = run(&rt, Sandbox::default(), "cat /etc/passwd >/dev/null");
    assert_eq!(code, 0, "{out}");
    // A file created and removed in /etc changes its mtime: the next job rebuilds the template
    // (and the old one is dropped); it must work exactly as before.
    let probe = Path::new("/etc").join(format!(".joblet-test-{}", std::process::id()));
    std::fs::write(&probe, "").expect("create a file in /etc");
    std::fs::remove_file(&probe).expect("remove it");
    let (code, out, path) = run(&rt, Sandbox::default(), "cat /etc/passwd >/dev/null");
    assert_eq!(code, 0, "{out}");
    assert!(path.ends_with("+root-template"), "{path}");
    // A job with a --bind cannot use the shared read-only template: it builds its own root.
    let data = tempfile::tempdir().expect("bind source");
    std::fs::write(data.path().join("f"), "bound").expect("write");
    let sandbox = Sandbox {
        binds: vec![
            joblet_runtime::parse::bind(&format!("{}:/data", data.path().display())).expect("bind"),
        ],
        ..Sandbox::default()
    };
    let (code, out, path) = run(&rt, sandbox, "cat /data/f");
    assert_eq!((code, out.as_str()), (0, "bound"));
    assert!(!path.contains("root-template"), "{path}");
}

#[test]
fn binds_into_tmp_and_work_are_visible() {
    if !gate() {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let data = tempfile::tempdir().expect("bind source");
    std::fs::write(data.path().join("f"), "bound").expect("write");
    let src = data.path().display().to_string();
    let bind = |s: String| joblet_runtime::parse::bind(&s).expect("bind");
    let sandbox = Sandbox {
        uid: 0,
        gid: 0,
        binds: vec![
            bind(format!("{src}:/work/in")),
            bind(format!("{src}:/tmp/deep/out:rw")),
        ],
        ..Sandbox::default()
    };
    let script = "set -u
        [ \"$(cat /work/in/f)\" = bound ] || { echo /work/in not bound; exit 1; }
        touch /work/in/x 2>/dev/null && { echo /work/in writable; exit 1; }
        echo new > /tmp/deep/out/g || { echo /tmp/deep/out not writable; exit 1; }
        touch /work/own || { echo /work not writable; exit 1; }
        exit 0";
    for template in [true, false] {
        let rt = runtime(state.path(), template);
        let (code, out, path) = run(&rt, sandbox.clone(), script);
        assert_eq!(code, 0, "template {template}: {out}");
        assert!(
            !path.contains("root-template"),
            "binds build their own root: {path}"
        );
        assert_eq!(
            std::fs::read_to_string(data.path().join("g")).expect("written through the rw bind"),
            "new\n"
        );
        std::fs::remove_file(data.path().join("g")).expect("remove");
    }
}
