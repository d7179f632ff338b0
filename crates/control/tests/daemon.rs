//! End-to-end tests of bulwarkd: a real daemon process, real `bulwark monitor` processes and
//! real function micro-VMs (tests/payloads/echo.c, which upper-cases console input) on this
//! host's /dev/kvm. Without KVM they fail, never skip.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bulwark_control::client::{ApiClient, ClientError};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_bulwarkd"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `bulwark` and `bulwark-tools` come from another package: build them once (cargo does not
/// build other packages' binaries for a test).
fn cli_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "bulwark-cli", "--bins"]);
        if bin_dir().ends_with("release") {
            cmd.arg("--release");
        }
        let o = cmd.current_dir(repo_root()).output().unwrap();
        assert!(
            o.status.success(),
            "cargo build -p bulwark-cli: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    });
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} was not built", p.display());
    p
}

fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests run real VMs and need /dev/kvm (read-write): {e}");
    }
}

/// The echo payload, built once.
fn echo_payload() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("bulwarkd-test-payload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("echo.elf");
        let o = Command::new(cli_bin("bulwark"))
            .args(["payload", "build"])
            .arg(repo_root().join("tests/payloads/echo.c"))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    })
    .clone()
}

/// A state directory, a bulwarkd on it, and cleanup of every process that used it.
struct Daemon {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    /// Extra bulwarkd arguments.
    args: Vec<&'static str>,
}

impl Daemon {
    fn start(test: &str) -> Self {
        Self::start_with(test, &[])
    }

    fn start_with(test: &str, args: &[&'static str]) -> Self {
        require_kvm();
        cli_bin("bulwark");
        let dir = std::env::temp_dir().join(format!("bulwarkd-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut d = Self {
            log: dir.join("daemon.log"),
            dir,
            child: None,
            args: args.to_vec(),
        };
        d.spawn();
        d
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn socket(&self) -> PathBuf {
        self.state().join("bulwarkd.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_bulwarkd"))
            .arg("--state-dir")
            .arg(self.state())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "bulwarkd did not start: {}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// kill -9 the daemon (its monitors live on).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn operator_token(&self) -> String {
        std::fs::read_to_string(self.state().join("operator.token"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn operator(&self) -> ApiClient {
        ApiClient::new(&self.socket(), Some(self.operator_token()))
    }

    fn as_token(&self, t: Option<&str>) -> ApiClient {
        ApiClient::new(&self.socket(), t.map(str::to_string))
    }

    /// Runs `bulwark vm ARGS` with the operator token.
    fn cli(&self, token: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new(cli_bin("bulwark"))
            .arg("vm")
            .args([
                "--socket",
                self.socket().to_str().unwrap(),
                "--token",
                token,
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Every monitor started on this state directory, found by its command line.
        let needle = self.state().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&needle) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("bulwarkd log:\n{}", self.logs());
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn ok(c: &ApiClient, method: &str, path: &str, body: Option<Value>) -> Value {
    match c.call(method, path, body.as_ref()).await {
        Ok(v) => v,
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// The error code and HTTP status of a failing call.
async fn err(c: &ApiClient, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    match c.call(method, path, body.as_ref()).await {
        Err(ClientError::Api { status, code, .. }) => (status, code),
        other => panic!("{method} {path}: expected an error, got {other:?}"),
    }
}

/// Creates and starts an echo VM; returns its owner token.
async fn create_echo(op: &ApiClient, name: &str) -> String {
    let v = ok(
        op,
        "POST",
        "/v1/vms",
        Some(json!({ "name": name, "spec": { "payload": echo_payload() } })),
    )
    .await;
    v["owner_token"].as_str().unwrap().to_string()
}

async fn start(op: &ApiClient, name: &str) -> Value {
    ok(op, "POST", &format!("/v1/vms/{name}/start"), None).await
}

/// Reads from the console until `want` has arrived (or panics after 5 s).
async fn read_until<R: tokio::io::AsyncRead + Unpin>(r: &mut R, got: &mut Vec<u8>, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(got).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Ok(Ok(0)) => panic!(
                "console closed before {want:?}; got {:?}",
                String::from_utf8_lossy(got)
            ),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("console read: {e}"),
            Err(_) => panic!(
                "no {want:?} on the console; got {:?}",
                String::from_utf8_lossy(got)
            ),
        }
    }
}

/// Whatever arrives within `wait`.
async fn read_for<R: tokio::io::AsyncRead + Unpin>(r: &mut R, wait: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, r.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return got,
        }
    }
}

fn monitor_pid(v: &Value) -> u64 {
    v["monitor"]["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no monitor pid in {v}"))
}

#[test]
fn lifecycle_through_api_create_start_console_pause_resume_stop_delete() {
    let d = Daemon::start("lifecycle");
    rt().block_on(async {
        let op = d.operator();
        let owner_token = create_echo(&op, "echo1").await;
        let owner = d.as_token(Some(&owner_token));
        let v = start(&op, "echo1").await;
        assert_eq!(v["state"], "running", "{v}");
        let v = ok(&op, "GET", "/v1/vms/echo1", None).await;
        assert_eq!(v["state"], "running");
        assert_eq!(v["live"]["vcpus"], 1);
        assert_eq!(v["live"]["memory"], 16 << 20);
        assert_eq!(v["vcpus"], 1);
        // The owner may describe its own VM too.
        assert_eq!(
            ok(&owner, "GET", "/v1/vms/echo1", None).await["name"],
            "echo1"
        );

        // Console: typed input comes back upper-cased.
        let mut con = owner.console("echo1").await.unwrap();
        con.write_all(b"hello bulwark\n").await.unwrap();
        let mut got = Vec::new();
        read_until(&mut con, &mut got, "HELLO BULWARK\n").await;
        drop(con);
        // A second attach gets the scroll-back first.
        let mut con = owner.console("echo1").await.unwrap();
        let mut got = Vec::new();
        read_until(&mut con, &mut got, "HELLO BULWARK\n").await;

        // Paused: input is not echoed until resumed.
        let v = ok(&op, "POST", "/v1/vms/echo1/pause", None).await;
        assert_eq!(v["state"], "paused");
        assert_eq!(
            ok(&op, "GET", "/v1/vms/echo1", None).await["state"],
            "paused"
        );
        con.write_all(b"while paused\n").await.unwrap();
        let quiet = read_for(&mut con, Duration::from_millis(300)).await;
        assert!(
            !String::from_utf8_lossy(&quiet).contains("WHILE PAUSED"),
            "echoed while paused: {quiet:?}"
        );
        assert_eq!(
            ok(&op, "POST", "/v1/vms/echo1/resume", None).await["state"],
            "running"
        );
        let mut got = Vec::new();
        read_until(&mut con, &mut got, "WHILE PAUSED\n").await;
        drop(con);

        // Stop: a function VM has no power button, so stop falls back to kill.
        let v = ok(
            &op,
            "POST",
            "/v1/vms/echo1/stop",
            Some(json!({ "timeout_ms": 2000 })),
        )
        .await;
        assert_eq!(v["state"], "stopped", "{v}");
        assert!(v["stopped_by"].as_str().unwrap().contains("kill"), "{v}");
        assert!(v["last_exit"]["reason"].is_string(), "{v}");
        assert_eq!(
            err(&op, "POST", "/v1/vms/echo1/pause", None).await,
            (409, "wrong_state".into())
        );
        ok(&op, "DELETE", "/v1/vms/echo1", None).await;
        assert_eq!(
            err(&op, "GET", "/v1/vms/echo1", None).await,
            (404, "not_found".into())
        );
        assert_eq!(ok(&op, "GET", "/v1/vms", None).await["vms"], json!([]));
    });
}

#[test]
fn cli_drives_the_lifecycle_and_console() {
    let d = Daemon::start("cli");
    let op = d.operator_token();
    let out = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let payload = echo_payload();
    let o = d.cli(
        &op,
        &[
            "create",
            "cli1",
            "--payload",
            payload.to_str().unwrap(),
            "--owner-token",
            "cli-owner-token-0001",
        ],
        b"",
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = d.cli(&op, &["start", "cli1"], b"");
    assert!(
        o.status.success() && out(&o).contains("running"),
        "{}",
        out(&o)
    );
    let o = d.cli(&op, &["list"], b"");
    assert!(
        out(&o).contains("cli1") && out(&o).contains("running"),
        "{}",
        out(&o)
    );
    let o = d.cli(&op, &["describe", "cli1", "--json"], b"");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["live"]["vcpus"], 1);
    // Console with pipes: stdin goes to the guest, output to stdout, and the command ends
    // when the connection does. The guest's answer to the first line is waited for by a
    // second attach, which shows it in the scroll-back.
    let mut child = Command::new(cli_bin("bulwark"))
        .arg("vm")
        .args([
            "--socket",
            d.socket().to_str().unwrap(),
            "--token",
            "cli-owner-token-0001",
        ])
        .args(["console", "cli1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"from the cli\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let o = d.cli("cli-owner-token-0001", &["console", "cli1"], b"");
    assert!(out(&o).contains("FROM THE CLI"), "{}", out(&o));
    // The owner cannot stop it; the operator can.
    let o = d.cli("cli-owner-token-0001", &["stop", "cli1"], b"");
    assert!(
        !o.status.success() && out(&o).contains("forbidden"),
        "{}",
        out(&o)
    );
    let o = d.cli(&op, &["pause", "cli1"], b"");
    assert!(out(&o).contains("paused"), "{}", out(&o));
    let o = d.cli(&op, &["stop", "cli1", "--timeout", "1s"], b"");
    assert!(
        o.status.success() && out(&o).contains("stopped"),
        "{}",
        out(&o)
    );
    let o = d.cli(&op, &["pause", "cli1"], b"");
    assert!(
        !o.status.success() && out(&o).contains("wrong_state"),
        "{}",
        out(&o)
    );
    let o = d.cli(&op, &["delete", "cli1"], b"");
    assert!(o.status.success(), "{}", out(&o));
    let o = d.cli(&op, &["describe", "cli1"], b"");
    assert!(
        !o.status.success() && out(&o).contains("not_found"),
        "{}",
        out(&o)
    );
}

#[test]
fn daemon_killed_and_restarted_keeps_vms_running_with_same_monitors() {
    let mut d = Daemon::start("restart");
    let rt = rt();
    let (owners, pids) = rt.block_on(async {
        let op = d.operator();
        let mut owners = Vec::new();
        let mut pids = Vec::new();
        for name in ["keep1", "keep2"] {
            owners.push(create_echo(&op, name).await);
            pids.push(monitor_pid(&start(&op, name).await));
        }
        (owners, pids)
    });
    d.kill9();
    // The monitors live on without the daemon.
    for pid in &pids {
        assert!(Path::new(&format!("/proc/{pid}")).exists());
    }
    d.spawn();
    rt.block_on(async {
        let op = d.operator();
        let list = ok(&op, "GET", "/v1/vms", None).await;
        assert_eq!(list["vms"].as_array().unwrap().len(), 2, "{list}");
        for (i, name) in ["keep1", "keep2"].iter().enumerate() {
            let v = ok(&op, "GET", &format!("/v1/vms/{name}"), None).await;
            assert_eq!(v["state"], "running", "{v}");
            assert_eq!(monitor_pid(&v), pids[i]);
            assert_eq!(v["live"]["pid"], pids[i]);
            let owner = d.as_token(Some(&owners[i]));
            let mut con = owner.console(name).await.unwrap();
            con.write_all(b"still here\n").await.unwrap();
            let mut got = Vec::new();
            read_until(&mut con, &mut got, "STILL HERE\n").await;
        }
        // Re-attached monitors are still watched: a kill is seen although they are not
        // the new daemon's children.
        let v = ok(&op, "POST", "/v1/vms/keep1/kill", None).await;
        assert_eq!(v["state"], "stopped", "{v}");
    });
}

#[test]
fn monitor_killed_by_signal_is_reported_and_requests_fail_cleanly() {
    let d = Daemon::start("monkill");
    rt().block_on(async {
        let op = d.operator();
        create_echo(&op, "victim").await;
        let pid = monitor_pid(&start(&op, "victim").await);
        // The jailed monitor is the child of the process the daemon started; it dies with it.
        let inner: Vec<u32> = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while inner
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        {
            assert!(
                Instant::now() < deadline,
                "the jailed monitor outlived its process"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Right after the kill the daemon may not have noticed yet: either answer is fine.
        let (status, code) = err(&op, "POST", "/v1/vms/victim/pause", None).await;
        assert!(
            (status, code.as_str()) == (503, "monitor_gone")
                || (status, code.as_str()) == (409, "wrong_state"),
            "{status} {code}"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let v = loop {
            let v = ok(&op, "GET", "/v1/vms/victim", None).await;
            if v["state"] != "running" || Instant::now() > deadline {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(v["state"] == "failed" || v["state"] == "stopped", "{v}");
        assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
        assert_eq!(
            err(&op, "POST", "/v1/vms/victim/resume", None).await,
            (409, "wrong_state".into())
        );
        // It can be started again.
        assert_eq!(start(&op, "victim").await["state"], "running");
    });
}

#[test]
fn roles_are_enforced_per_route_and_per_vm() {
    let d = Daemon::start("roles");
    rt().block_on(async {
        let op = d.operator();
        let t1 = create_echo(&op, "vm-a").await;
        let t2 = create_echo(&op, "vm-b").await;
        start(&op, "vm-a").await;
        let none = d.as_token(None);
        let bogus = d.as_token(Some("not-a-token-of-anybody"));
        let owner_a = d.as_token(Some(&t1));
        let owner_b = d.as_token(Some(&t2));
        assert_eq!(
            err(&none, "GET", "/v1/vms", None).await,
            (401, "unauthorized".into())
        );
        assert_eq!(
            err(&bogus, "GET", "/v1/vms", None).await,
            (401, "unauthorized".into())
        );
        assert_eq!(
            err(&owner_a, "POST", "/v1/vms/vm-a/stop", None).await,
            (403, "forbidden".into())
        );
        assert_eq!(
            err(&owner_a, "GET", "/v1/vms", None).await,
            (403, "forbidden".into())
        );
        assert_eq!(
            err(&owner_a, "GET", "/metrics", None).await,
            (403, "forbidden".into())
        );
        assert_eq!(
            err(&owner_b, "GET", "/v1/vms/vm-a", None).await,
            (403, "forbidden".into())
        );
        assert!(matches!(
            op.console("vm-a").await,
            Err(ClientError::Api { status: 403, .. })
        ));
        assert!(matches!(
            owner_b.console("vm-a").await,
            Err(ClientError::Api { status: 403, .. })
        ));
        assert!(owner_a.console("vm-a").await.is_ok());
        // Guest-reaching routes without an agent, and snapshots, for the owner.
        assert_eq!(
            err(&owner_a, "GET", "/v1/vms/vm-a/ps", None).await,
            (409, "no_agent".into())
        );
        assert_eq!(
            err(
                &owner_a,
                "POST",
                "/v1/vms/vm-a/exec",
                Some(json!({ "argv": ["true"] }))
            )
            .await,
            (409, "no_agent".into())
        );
        assert_eq!(
            err(
                &op,
                "POST",
                "/v1/vms/vm-a/exec",
                Some(json!({ "argv": ["true"] }))
            )
            .await,
            (403, "forbidden".into())
        );
        // Snapshot: carried to the monitor; whatever it answers is passed on, never faked.
        let snap = owner_a
            .call(
                "POST",
                "/v1/vms/vm-a/snapshot",
                Some(&json!({ "key": "11".repeat(32), "name": "s1" })),
            )
            .await;
        match snap {
            Ok(v) => assert!(v["bytes"].as_u64().unwrap() > 0, "{v}"),
            Err(ClientError::Api { code, .. }) => {
                assert!(code == "monitor_error" || code == "wrong_state", "{code}")
            }
            Err(e) => panic!("{e}"),
        }
        assert_eq!(
            err(
                &owner_a,
                "POST",
                "/v1/vms/vm-a/snapshot",
                Some(json!({ "key": "zz" }))
            )
            .await,
            (400, "invalid_request".into())
        );
        // Denials are logged with the peer's credentials.
        assert!(d.logs().contains("peer_uid="), "{}", d.logs());
    });
}

#[test]
fn bad_input_gets_stable_error_codes() {
    let d = Daemon::start("badinput");
    rt().block_on(async {
        let op = d.operator();
        let p = echo_payload();
        let raw = |body: Vec<u8>| {
            let op = op.clone();
            async move {
                let (status, bytes) = op.raw("POST", "/v1/vms", body).await.unwrap();
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                (status, v["error"]["code"].as_str().unwrap().to_string())
            }
        };
        assert_eq!(raw(b"{\"name\": ".to_vec()).await, (400, "bad_json".into()));
        assert_eq!(raw(b"[1,2]".to_vec()).await, (400, "bad_json".into()));
        assert_eq!(
            raw(serde_json::to_vec(&json!({"name":"x","spec":{"payload":p},"colour":1})).unwrap())
                .await,
            (400, "unknown_field".into())
        );
        assert_eq!(
            raw(
                serde_json::to_vec(&json!({"name":"x","spec":{"payload":p,"memroy":"1M"}}))
                    .unwrap()
            )
            .await,
            (400, "unknown_field".into())
        );
        let mut huge = b"{\"name\":\"".to_vec();
        huge.resize((1 << 20) + 10, b'a');
        assert_eq!(raw(huge).await, (413, "payload_too_large".into()));
        let create = |spec: Value, name: &str| json!({ "name": name, "spec": spec });
        for spec in [
            json!({ "payload": p, "memory": "9999G" }),
            json!({ "payload": p, "vcpus": 0 }),
            json!({ "payload": "relative.elf" }),
            json!({}),
        ] {
            assert_eq!(
                err(&op, "POST", "/v1/vms", Some(create(spec.clone(), "x"))).await,
                (400, "invalid_spec".into()),
                "{spec}"
            );
        }
        assert_eq!(
            err(
                &op,
                "POST",
                "/v1/vms",
                Some(create(json!({ "payload": p }), "Bad_Name"))
            )
            .await,
            (400, "invalid_name".into())
        );
        ok(
            &op,
            "POST",
            "/v1/vms",
            Some(create(json!({ "payload": p }), "dup")),
        )
        .await;
        assert_eq!(
            err(
                &op,
                "POST",
                "/v1/vms",
                Some(create(json!({ "payload": p }), "dup"))
            )
            .await,
            (409, "name_taken".into())
        );
        // TOML specs work too.
        let toml = format!("payload = \"{}\"\nvcpus = 2\n", p.display());
        let v = ok(
            &op,
            "POST",
            "/v1/vms",
            Some(json!({ "name": "fromtoml", "spec_toml": toml })),
        )
        .await;
        assert_eq!(v["vcpus"], 2);
        assert_eq!(
            err(&op, "POST", "/v1/vms/dup/pause", None).await,
            (409, "wrong_state".into())
        );
        assert_eq!(
            err(&op, "POST", "/v1/vms/nope/start", None).await,
            (404, "not_found".into())
        );
        assert_eq!(
            err(&op, "GET", "/v1/nothing", None).await,
            (404, "not_found".into())
        );
        assert_eq!(
            err(&op, "PUT", "/v1/vms", None).await,
            (405, "method_not_allowed".into())
        );
        assert_eq!(
            err(
                &op,
                "POST",
                "/v1/vms/dup/stop",
                Some(json!({ "timeout": 1 }))
            )
            .await,
            (400, "unknown_field".into())
        );
        // A missing payload fails at start with the monitor's own reason.
        ok(
            &op,
            "POST",
            "/v1/vms",
            Some(create(
                json!({ "payload": "/nonexistent/p.elf" }),
                "nopayload",
            )),
        )
        .await;
        let (status, code) = err(&op, "POST", "/v1/vms/nopayload/start", None).await;
        assert_eq!((status, code.as_str()), (500, "monitor_error"));
        let v = ok(&op, "GET", "/v1/vms/nopayload", None).await;
        assert_eq!(v["state"], "failed", "{v}");
        assert!(
            v["reason"].as_str().unwrap().contains("/nonexistent/p.elf"),
            "{v}"
        );
        // Delete of a running VM needs force.
        start(&op, "dup").await;
        assert_eq!(
            err(&op, "DELETE", "/v1/vms/dup", None).await,
            (409, "wrong_state".into())
        );
        ok(&op, "DELETE", "/v1/vms/dup?force=true", None).await;
    });
}

#[test]
fn socket_token_and_state_are_private() {
    let d = Daemon::start("modes");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket()), 0o600);
    assert_eq!(mode(&d.state()), 0o700);
    assert_eq!(mode(&d.state().join("operator.token")), 0o600);
    rt().block_on(async {
        let op = d.operator();
        let v = ok(&op, "POST", "/v1/vms", Some(json!({ "name": "m", "spec": { "payload": echo_payload() }, "owner_token": "chosen-owner-token-1" }))).await;
        assert!(v.get("owner_token").is_none(), "a chosen token is not echoed back");
        let dir = d.state().join("vms").join(v["id"].as_str().unwrap());
        assert_eq!(mode(&dir), 0o700);
        assert!(dir.join("spec.json").exists());
    });
    // The token is stored only as a hash.
    let db = std::fs::read(d.state().join("bulwarkd.redb")).unwrap();
    assert!(!db.windows(20).any(|w| w == b"chosen-owner-token-1"));
}

#[test]
fn metrics_show_per_vm_exit_counters_and_api_counts() {
    let d = Daemon::start("metrics");
    rt().block_on(async {
        let op = d.operator();
        let owner = create_echo(&op, "met").await;
        start(&op, "met").await;
        let mut con = d.as_token(Some(&owner)).console("met").await.unwrap();
        con.write_all(b"count me\n").await.unwrap();
        read_until(&mut con, &mut Vec::new(), "COUNT ME").await;
        let text = ok(&op, "GET", "/metrics", None).await;
        let text = text.as_str().unwrap();
        for want in [
            "bulwark_vm_exits_total{vm=\"met\",kind=\"all\"}",
            "bulwark_vm_exits_total{vm=\"met\",kind=\"hostcall\"}",
            "bulwark_vm_state{vm=\"met\",state=\"running\"} 1",
            "bulwark_vm_uptime_seconds{vm=\"met\"}",
            "bulwark_vm_vcpu_seconds_total{vm=\"met\"}",
            "bulwark_api_requests_total{route=\"POST /v1/vms/{name}/start\",status=\"200\"} 1",
            "bulwark_api_request_duration_seconds_count{route=\"POST /v1/vms\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        let hostcalls: u64 = text
            .lines()
            .find(|l| l.starts_with("bulwark_vm_exits_total{vm=\"met\",kind=\"hostcall\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(hostcalls > 0, "{text}");
        ok(&op, "POST", "/v1/vms/met/kill", None).await;
        let text = ok(&op, "GET", "/metrics", None).await;
        assert!(
            text.as_str()
                .unwrap()
                .contains("bulwark_vm_exits_total{vm=\"met\",kind=\"all\"}")
        );
    });
}

/// The router's route table and docs/api/openapi.json list the same (method, path) pairs.
#[test]
fn openapi_lists_exactly_the_routes_of_the_router() {
    let text = std::fs::read_to_string(repo_root().join("docs/api/openapi.json")).unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let mut documented = std::collections::BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let served: std::collections::BTreeSet<_> = bulwark_control::routes::ROUTES
        .iter()
        .map(|r| (r.method.to_string(), r.path.to_string()))
        .collect();
    assert_eq!(documented, served);
    // Every error code the daemon can answer is documented.
    let codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
        ["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>();
    for c in [
        "bad_json",
        "unknown_field",
        "invalid_spec",
        "invalid_name",
        "invalid_request",
        "name_taken",
        "not_found",
        "method_not_allowed",
        "wrong_state",
        "unauthorized",
        "forbidden",
        "payload_too_large",
        "monitor_gone",
        "monitor_error",
        "no_agent",
        "agent_error",
        "internal",
    ] {
        assert!(codes.contains(c), "{c} not documented");
    }
}

#[test]
fn snapshot_then_restore_through_the_api_resumes_the_guest() {
    let d = Daemon::start("snaprestore");
    rt().block_on(async {
        let op = d.operator();
        let t = create_echo(&op, "snap").await;
        let owner = d.as_token(Some(&t));
        start(&op, "snap").await;
        // Nothing in progress: the progress route says so, to the owner and the operator.
        for c in [&owner, &op] {
            let p = ok(c, "GET", "/v1/vms/snap/progress", None).await;
            assert_eq!(p, json!({ "operation": null, "done": 0, "total": 0 }));
        }
        let key = "42".repeat(32);
        let v = ok(
            &owner,
            "POST",
            "/v1/vms/snap/snapshot",
            Some(json!({ "key": key, "name": "s1" })),
        )
        .await;
        assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
        // Restore needs a stopped VM, an existing snapshot and the right key.
        assert_eq!(
            err(
                &owner,
                "POST",
                "/v1/vms/snap/restore",
                Some(json!({ "snapshot": "s1", "key": key }))
            )
            .await,
            (409, "wrong_state".into())
        );
        ok(&op, "POST", "/v1/vms/snap/kill", None).await;
        assert_eq!(
            err(
                &owner,
                "POST",
                "/v1/vms/snap/restore",
                Some(json!({ "snapshot": "nope", "key": key }))
            )
            .await,
            (404, "not_found".into())
        );
        let (status, code) = err(
            &owner,
            "POST",
            "/v1/vms/snap/restore",
            Some(json!({ "snapshot": "s1", "key": "43".repeat(32) })),
        )
        .await;
        assert_eq!(
            (status, code.as_str()),
            (500, "monitor_error"),
            "a wrong key must not restore"
        );
        let v = ok(
            &owner,
            "POST",
            "/v1/vms/snap/restore",
            Some(json!({ "snapshot": "s1", "key": key })),
        )
        .await;
        assert_eq!(v["state"], "running", "{v}");
        let mut con = owner.console("snap").await.unwrap();
        con.write_all(b"restored\n").await.unwrap();
        read_until(&mut con, &mut Vec::new(), "RESTORED\n").await;
        // Lazily: the monitor is told to (`--lazy`), and the guest answers the same way.
        ok(&op, "POST", "/v1/vms/snap/kill", None).await;
        let v = ok(
            &owner,
            "POST",
            "/v1/vms/snap/restore",
            Some(json!({ "snapshot": "s1", "key": key, "lazy": true })),
        )
        .await;
        assert_eq!(v["state"], "running", "{v}");
        let pid = v["monitor"]["pid"].as_u64().expect("the monitor's pid");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(
            cmdline.split(|&b| b == 0).any(|a| a == b"--lazy"),
            "the monitor was not started lazily: {:?}",
            String::from_utf8_lossy(&cmdline)
        );
        let mut con = owner.console("snap").await.unwrap();
        con.write_all(b"lazily\n").await.unwrap();
        read_until(&mut con, &mut Vec::new(), "LAZILY\n").await;
    });
}

#[test]
fn monitors_are_jailed_unless_the_daemon_says_no_jail_and_then_it_warns() {
    for (args, jailed) in [(&[][..], true), (&["--no-jail"][..], false)] {
        let d = Daemon::start_with(if jailed { "jailed" } else { "nojail" }, args);
        rt().block_on(async {
            let op = d.operator();
            create_echo(&op, "j").await;
            let pid = monitor_pid(&start(&op, "j").await);
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
            let no_jail = cmdline.split(|&b| b == 0).any(|a| a == b"--no-jail");
            assert_eq!(no_jail, !jailed);
            // A jailed monitor is the only child of the process the daemon started, in its
            // own mount namespace.
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            assert_eq!(
                !children.trim().is_empty(),
                jailed,
                "children: {children:?}"
            );
            ok(&op, "POST", "/v1/vms/j/kill", None).await;
        });
        assert_eq!(d.logs().contains("--no-jail: every VM"), !jailed);
    }
}
