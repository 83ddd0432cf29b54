//! Every isolation property the README promises, each attacked from inside a job.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::{joblet, privileged, run, sh, unique};

#[test]
fn command_is_pid_1_of_its_own_namespace() {
    if !privileged() {
        return;
    }
    assert_eq!(sh(&[], "echo $$").ok().trim(), "1");
}

#[test]
fn host_processes_are_invisible_and_unsignalable() {
    if !privileged() {
        return;
    }
    let mut host = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("start a host process");
    let hp = host.id();
    let r = sh(
        &[],
        &format!(
            "ls /proc | grep -c '^[0-9]'; test -e /proc/{hp} && echo visible; kill -0 {hp} 2>/dev/null && echo signalled; kill -KILL {hp} 2>/dev/null; true"
        ),
    );
    let out = r.ok().to_owned();
    let alive = host.try_wait().expect("try_wait").is_none();
    let _ = host.kill();
    let _ = host.wait();
    let count: u32 = out
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("process count");
    assert!(count <= 4, "job sees {count} processes: {out}");
    assert!(
        !out.contains("visible") && !out.contains("signalled"),
        "{out}"
    );
    assert!(alive, "the job killed a host process");
}

#[test]
fn hostname_is_the_jobs_own_and_the_hosts_is_untouched() {
    if !privileged() {
        return;
    }
    let before = rustix::system::uname().nodename().to_owned();
    let r = sh(
        &["--hostname", "jobhost", "--user", "0"],
        "hostname; hostname attacker 2>/dev/null; true",
    );
    assert_eq!(r.ok().lines().next(), Some("jobhost"));
    assert_eq!(rustix::system::uname().nodename(), before.as_c_str());
    // The default hostname is the job id.
    let r = sh(&[], "hostname");
    assert_eq!(r.ok().trim(), r.report()["id"].as_str().unwrap());
}

#[test]
fn host_files_outside_the_root_are_invisible() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "s3cret").unwrap();
    let r = sh(
        &[],
        &format!(
            "cat {} 2>/dev/null; for p in /root /home /var /sys /boot {}; do test -e $p && echo $p; done; ls /",
            secret.display(),
            crate::state_dir().display()
        ),
    );
    let out = r.ok();
    assert!(!out.contains("s3cret"), "{out}");
    for p in ["/root", "/home", "/var", "/sys", "/boot"] {
        assert!(!out.lines().any(|l| l == p), "{p} visible: {out}");
    }
    let mut top: Vec<&str> = out.lines().skip_while(|l| l.starts_with('/')).collect();
    top.sort();
    for expected in ["dev", "etc", "proc", "tmp", "usr", "work"] {
        assert!(
            top.contains(&expected),
            "{expected} missing from / : {top:?}"
        );
    }
}

#[test]
fn root_is_read_only_even_for_uid_0() {
    if !privileged() {
        return;
    }
    let r = sh(
        &["--user", "0"],
        "for p in /x /etc/passwd /usr/bin/x /bin/x /dev/x /proc/sys/kernel/hostname /proc/sysrq-trigger; do \
           (echo 1 > $p) 2>/dev/null && echo WROTE $p; done; true",
    );
    assert!(!r.ok().contains("WROTE"), "{}", r.stdout);
}

#[test]
fn tmp_and_work_are_private_and_writable() {
    if !privileged() {
        return;
    }
    let marker = format!("joblet-tmp-{}", unique());
    let host_file = std::path::Path::new("/tmp").join(&marker);
    std::fs::write(&host_file, "host").unwrap();
    let r = sh(
        &[],
        &format!(
            "test -e /tmp/{marker} && echo SEEN; echo job > /tmp/{marker} && echo job > /work/f && pwd"
        ),
    );
    let out = r.ok().to_owned();
    assert_eq!(std::fs::read_to_string(&host_file).unwrap(), "host");
    std::fs::remove_file(&host_file).unwrap();
    assert!(!out.contains("SEEN"), "{out}");
    assert_eq!(out.trim(), "/work");
    // A second job does not see the first one's files.
    assert_eq!(
        sh(&[], &format!("test -e /tmp/{marker} && echo SEEN; true")).ok(),
        ""
    );
    // /tmp is size-limited.
    let r = sh(
        &["--tmp-size", "1M"],
        "dd if=/dev/zero of=/tmp/big bs=1M count=4 2>&1; echo rc=$?",
    );
    assert!(r.ok().contains("No space left"), "{}", r.stdout);
}

#[test]
fn no_capabilities_and_no_new_privs_even_for_uid_0() {
    if !privileged() {
        return;
    }
    for user in ["0", "65534"] {
        let r = sh(
            &["--user", user],
            "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status",
        );
        let out = r.ok();
        for line in out.lines() {
            let (k, v) = line.split_once(':').unwrap();
            let v = v.trim();
            match k {
                "NoNewPrivs" => assert_eq!(v, "1", "{out}"),
                "Seccomp" => assert_eq!(v, "2", "{out}"),
                _ => assert_eq!(v, "0000000000000000", "{k} for --user {user}: {out}"),
            }
        }
    }
    // --cap-add keeps exactly one capability, for a non-root user too.
    let r = sh(
        &["--user", "1000", "--cap-add", "NET_BIND_SERVICE"],
        "grep -E '^Cap(Eff|Bnd|Amb)' /proc/self/status",
    );
    for line in r.ok().lines() {
        assert!(line.ends_with("0000000000000400"), "{}", r.stdout);
    }
}

#[test]
fn runs_as_nobody_by_default_and_as_asked() {
    if !privileged() {
        return;
    }
    assert_eq!(
        sh(&[], "echo $(id -u) $(id -g) $(id -G)").ok().trim(),
        "65534 65534 65534"
    );
    assert_eq!(
        sh(&["--user", "1000:1001"], "echo $(id -u) $(id -g)")
            .ok()
            .trim(),
        "1000 1001"
    );
}

#[test]
fn mounting_and_chroot_are_refused() {
    if !privileged() {
        return;
    }
    for extra in [&[][..], &["--no-seccomp"][..]] {
        let mut args = vec!["--user", "0"];
        args.extend_from_slice(extra);
        let r = sh(
            &args,
            "mount -t tmpfs none /tmp 2>/dev/null && echo MOUNTED; chroot / true 2>/dev/null && echo CHROOTED; \
             unshare -m true 2>/dev/null && echo UNSHARED; true",
        );
        assert_eq!(r.ok(), "", "{args:?}: {}", r.stdout);
    }
}

#[test]
fn host_loopback_is_reachable_and_network_none_is_not() {
    if !privileged() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        s.write_all(b"pong").ok();
        buf
    });
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo ping >&3 && echo connected");
    let r = run(&[], &["/bin/bash", "-c", &script]);
    assert_eq!(r.ok().trim(), "connected");
    assert_eq!(server.join().unwrap().trim(), "ping");

    let r = run(
        &["--network", "none"],
        &[
            "/bin/bash",
            "-c",
            &format!(
                "{script}; ip -o link 2>/dev/null | wc -l; cat /sys/class/net/lo/operstate 2>/dev/null; grep -c : /proc/net/dev"
            ),
        ],
    );
    assert!(!r.stdout.contains("connected"), "{r:#?}");
    // Only loopback exists (header lines excluded: /proc/net/dev lists one interface).
    assert_eq!(r.stdout.lines().last().map(str::trim), Some("1"), "{r:#?}");
}

#[test]
fn host_sysv_ipc_is_invisible() {
    if !privileged() {
        return;
    }
    let out = Command::new("ipcmk")
        .args(["-M", "4096"])
        .output()
        .expect("ipcmk (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    let id: String = text.chars().filter(char::is_ascii_digit).collect();
    assert!(!id.is_empty(), "ipcmk: {text}");
    let r = sh(&[], "tail -n +2 /proc/sysvipc/shm | wc -l");
    let _ = Command::new("ipcrm").args(["-m", &id]).status();
    assert_eq!(r.ok().trim(), "0");
}

#[test]
fn no_fd_or_environment_leaks_into_the_job() {
    if !privileged() {
        return;
    }
    // fd 7 is open (not close-on-exec) in joblet itself; the job must not get it.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r.json");
    let out = Command::new("/bin/sh")
        .arg("-c")
        .arg(format!(
            "exec 7</etc/hostname; exec {} run --report {} -- /bin/sh -c 'ls /proc/self/fd; env'",
            env!("CARGO_BIN_EXE_joblet"),
            report.display()
        ))
        .env("JOBLET_STATE_DIR", crate::state_dir())
        .env("JOBLET_TEST_SECRET", "leak")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let r = crate::finish(out, &report);
    let text = r.ok();
    let fds: Vec<&str> = text
        .lines()
        .take_while(|l| l.parse::<u32>().is_ok())
        .collect();
    // 0-2, plus the directory fd `ls` itself opened.
    assert!(fds.len() <= 4 && !fds.contains(&"7"), "fds: {fds:?}");
    assert!(
        !text.contains("JOBLET_TEST_SECRET") && !text.contains("leak"),
        "{text}"
    );
    assert!(
        text.contains("PATH=") && text.contains("HOME=/work"),
        "{text}"
    );
    let r = sh(&["--env", "GREETING=hi there"], "echo $GREETING");
    assert_eq!(r.ok().trim(), "hi there");
}

#[test]
fn binds_are_read_only_unless_rw() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("in"), "data").unwrap();
    let ro = format!("{}:/data", dir.path().display());
    let r = sh(
        &["--bind", &ro, "--user", "0"],
        "cat /data/in; echo x > /data/out 2>/dev/null && echo WROTE; true",
    );
    assert_eq!(r.ok().trim(), "data");
    let rw = format!("{}:/data:rw", dir.path().display());
    sh(
        &["--bind", &rw, "--user", "0", "--workdir", "/data"],
        "echo out > out",
    )
    .ok();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out"))
            .unwrap()
            .trim(),
        "out"
    );
}

#[test]
fn a_whole_rootfs_can_replace_the_minimal_root() {
    // The tiny rootfs below relies on a merged-/usr host (/bin -> usr/bin), like Debian 12.
    if !privileged() || !std::path::Path::new("/bin").is_symlink() {
        return;
    }
    // A tiny rootfs: the host's /usr tree bound in, plus the mount points joblet needs.
    let dir = tempfile::tempdir().unwrap();
    for d in ["tmp", "proc", "dev", "usr", "work"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    for l in ["bin", "lib", "lib64"] {
        if std::path::Path::new("/").join(l).is_symlink() {
            std::os::unix::fs::symlink(format!("usr/{l}"), dir.path().join(l)).unwrap();
        }
    }
    std::fs::write(dir.path().join("marker"), "rootfs").unwrap();
    let root = dir.path().display().to_string();
    let usr = "/usr:/usr".to_string();
    let mut out = joblet();
    out.args([
        "run",
        "--rootfs",
        &root,
        "--bind",
        &usr,
        "--",
        "/usr/bin/cat",
        "/marker",
    ]);
    let out = out.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rootfs", "{out:?}");
}
