//! End-to-end tests of the guest agent: the real `bulwark-agent` binary listening on a unix
//! socket (`--unix`, since a test host has no guest vsock), driven through the host client.
//! Commands run for real (`sh`, `cat`, `head`, `sleep`), and processes come from the real
//! `/proc`. The vsock handshake is tested against small in-test unix listeners that play the
//! VMM's part.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use bulwark_agent::client::{self, ClientError};
use bulwark_agent::proto::{self, Message, error_code};

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bulwark-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).expect("create temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `bulwark-agent --unix <dir>/agent.sock`, killed on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark-agent"))
            .arg("--unix")
            .arg(&socket)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start bulwark-agent");
        let mut stderr = BufReader::new(child.stderr.take().expect("piped stderr"));
        let mut line = String::new();
        stderr.read_line(&mut line).expect("agent stderr");
        assert_eq!(
            line.trim_end(),
            format!(
                "bulwark-agent: listening on unix socket {}",
                socket.display()
            )
        );
        // Keep the agent's later log lines visible (and its stderr pipe from filling up).
        thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
            }
        });
        Self {
            child,
            socket,
            _dir: dir,
        }
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).expect("connect to the agent")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn exec_exit_status_and_both_streams_are_returned() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let result = client::exec(
        &mut conn,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        &[],
        b"",
        None,
    )
    .unwrap();
    assert_eq!(result.status, 3);
    assert_eq!(result.stdout, b"out\n");
    assert_eq!(result.stderr, b"err\n");
    assert!(!result.truncated);
}

#[test]
fn exec_four_mib_of_stdout_arrives_complete() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let result = client::exec(
        &mut conn,
        &["head", "-c", "4194304", "/dev/zero"],
        &[],
        b"",
        None,
    )
    .unwrap();
    assert_eq!(result.status, 0);
    assert_eq!(result.stdout.len(), 4 << 20);
    assert!(result.stdout.iter().all(|&b| b == 0));
    assert!(!result.truncated);
}

#[test]
fn exec_large_stderr_before_stdout_does_not_deadlock() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let script = "head -c 2000000 /dev/zero >&2; head -c 2000000 /dev/zero";
    let result = client::exec(
        &mut conn,
        &["sh", "-c", script],
        &[],
        b"",
        Some(Duration::from_secs(60)),
    )
    .unwrap();
    assert_eq!(result.status, 0);
    assert_eq!(
        (result.stdout.len(), result.stderr.len()),
        (2_000_000, 2_000_000)
    );
}

#[test]
fn exec_stdin_and_env_are_delivered() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let input: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let result = client::exec(&mut conn, &["cat"], &[], &input, None).unwrap();
    assert_eq!(result.status, 0);
    assert_eq!(result.stdout, input);
    let result = client::exec(
        &mut conn,
        &["sh", "-c", "printf %s \"$GREETING\""],
        &[("GREETING", "hello guest")],
        b"",
        None,
    )
    .unwrap();
    assert_eq!(result.stdout, b"hello guest");
}

#[test]
fn exec_timeout_kills_the_command_with_sigkill_status() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let started = Instant::now();
    let result = client::exec(
        &mut conn,
        &["sleep", "30"],
        &[],
        b"",
        Some(Duration::from_millis(300)),
    )
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(result.status, 128 + 9);
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
}

#[test]
fn exec_unknown_command_is_an_agent_error_naming_it() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let err = client::exec(&mut conn, &["no-such-command-xyz"], &[], b"", None).unwrap_err();
    match &err {
        ClientError::Agent { code, message, .. } => {
            assert_eq!(*code, error_code::SPAWN_FAILED);
            assert!(message.contains("no-such-command-xyz"), "{message}");
            assert!(message.contains("No such file"), "{message}");
        }
        other => panic!("expected an agent error, got {other}"),
    }
    // The connection stays usable after an Error reply to a well-formed request.
    let result = client::exec(&mut conn, &["true"], &[], b"", None).unwrap();
    assert_eq!(result.status, 0);
}

#[test]
fn ps_lists_the_agent_with_its_comm_uid_and_parent() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let procs = client::ps(&mut conn).unwrap();
    let me = procs
        .iter()
        .find(|p| p.pid == agent.pid())
        .unwrap_or_else(|| panic!("agent pid {} not in {} processes", agent.pid(), procs.len()));
    assert_eq!(me.comm, "bulwark-agent");
    assert_eq!(me.ppid, std::process::id());
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    assert_eq!(me.uid, uid);
    assert!(b"RS".contains(&me.state), "state {}", char::from(me.state));
}

#[test]
fn hello_reports_protocol_version() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    assert_eq!(client::hello(&mut conn).unwrap(), proto::PROTOCOL_VERSION);
}

#[test]
fn garbage_frame_gets_error_reply_and_agent_keeps_serving() {
    let mut agent = Agent::start();
    for garbage in [
        &b"\xff\xff\xff\xff"[..],        // length far above the maximum
        b"\x03\x00\x00\x00\x07\x04\x00", // version 7
        b"\x02\x00\x00\x00\x01\x63",     // kind 99
        b"\x03\x00\x00\x00\x01\x04\x00", // PsRequest with a trailing byte
        &[&b"\x00\x00\x00\x02"[..], &[0xab; 1000]].concat(), // too long, body left unread
    ] {
        let mut conn = agent.connect();
        conn.write_all(garbage).unwrap();
        let reply = proto::read_message(&mut conn).unwrap();
        let Some(Message::Error { code, message }) = reply else {
            panic!("expected an Error reply, got {reply:?}")
        };
        assert_eq!(code, error_code::MALFORMED_FRAME);
        assert!(message.starts_with("malformed frame: "), "{message}");
        // Then end-of-file (or a reset, if the agent closed with the garbage unread).
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "the agent closed the connection after its reply"
        );
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent is still running"
    );
    let mut conn = agent.connect();
    assert!(!client::ps(&mut conn).unwrap().is_empty());
}

#[test]
fn connections_are_served_concurrently() {
    let agent = Agent::start();
    let mut slow = agent.connect();
    let slow_request =
        thread::spawn(move || client::exec(&mut slow, &["sleep", "1"], &[], b"", None).unwrap());
    thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let mut fast = agent.connect();
    client::exec(&mut fast, &["true"], &[], b"", None).unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow_request.join().unwrap().status, 0);
}

/// Plays the VMM's part of the vsock handshake on a unix socket: accepts one connection,
/// checks the `CONNECT` line, then runs `respond` on the stream.
fn fake_vmm(
    dir: &TempDir,
    respond: impl FnOnce(UnixStream) + Send + 'static,
) -> (PathBuf, thread::JoinHandle<()>) {
    let path = dir.0.join("vsock.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let vmm = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8];
        while line.last() != Some(&b'\n') {
            stream.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        assert_eq!(line, b"CONNECT 52\n");
        respond(stream);
    });
    (path, vmm)
}

#[test]
fn connect_vsock_uds_ok_reply_leaves_following_bytes_for_the_protocol() {
    let dir = TempDir::new();
    let (path, vmm) = fake_vmm(&dir, |mut stream| {
        // The reply and the "guest's" first frame in one write: the client must not eat it.
        let mut bytes = b"OK 1073741824\n".to_vec();
        bytes.extend(proto::encode(&Message::Hello { version: 1 }).unwrap());
        stream.write_all(&bytes).unwrap();
    });
    let mut stream = client::connect_vsock_uds(&path, 52).unwrap();
    assert_eq!(
        proto::read_message(&mut stream).unwrap(),
        Some(Message::Hello { version: 1 })
    );
    vmm.join().unwrap();
}

#[test]
fn connect_vsock_uds_then_requests_reach_the_agent() {
    let agent = Agent::start();
    let dir = TempDir::new();
    let agent_socket = agent.socket.clone();
    let (path, vmm) = fake_vmm(&dir, move |host| {
        let guest = UnixStream::connect(agent_socket).unwrap();
        host.try_clone()
            .unwrap()
            .write_all(b"OK 1073741824\n")
            .unwrap();
        // Forward both ways, as the VMM's vsock device would.
        let (mut host_rx, mut guest_tx) = (host.try_clone().unwrap(), guest.try_clone().unwrap());
        let up = thread::spawn(move || {
            let _ = std::io::copy(&mut host_rx, &mut guest_tx);
            let _ = guest_tx.shutdown(std::net::Shutdown::Write);
        });
        let (mut guest_rx, mut host_tx) = (guest, host);
        let _ = std::io::copy(&mut guest_rx, &mut host_tx);
        up.join().unwrap();
    });
    let mut stream = client::connect_vsock_uds(&path, 52).unwrap();
    let result = client::exec(&mut stream, &["echo", "via vsock"], &[], b"", None).unwrap();
    assert_eq!(result.stdout, b"via vsock\n");
    drop(stream);
    vmm.join().unwrap();
}

#[test]
fn connect_vsock_uds_garbage_reply_is_rejected_with_what_was_received() {
    let dir = TempDir::new();
    let (path, vmm) = fake_vmm(&dir, |mut stream| {
        stream.write_all(b"NOPE go away\n").unwrap();
    });
    let err = client::connect_vsock_uds(&path, 52).unwrap_err();
    assert!(
        matches!(&err, ClientError::HandshakeRejected { port: 52, reply, .. } if reply == "NOPE go away\n"),
        "{err}"
    );
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    vmm.join().unwrap();
}

#[test]
fn connect_vsock_uds_endless_reply_is_rejected_after_a_few_bytes() {
    let dir = TempDir::new();
    let (path, vmm) = fake_vmm(&dir, |mut stream| {
        let _ = stream.write_all(&[b'O'; 4096]);
    });
    let err = client::connect_vsock_uds(&path, 52).unwrap_err();
    assert!(
        matches!(&err, ClientError::HandshakeRejected { reply, .. } if reply.len() <= 32),
        "{err}"
    );
    vmm.join().unwrap();
}

#[test]
fn connect_vsock_uds_closed_socket_suggests_no_agent_listening() {
    let dir = TempDir::new();
    let (path, vmm) = fake_vmm(&dir, drop);
    let err = client::connect_vsock_uds(&path, 52).unwrap_err();
    assert!(
        matches!(&err, ClientError::HandshakeClosed { port: 52, received, .. } if received.is_empty()),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("no agent listening on guest vsock port 52?"),
        "{err}"
    );
    vmm.join().unwrap();
}

#[test]
fn connect_vsock_uds_missing_socket_is_a_connect_error() {
    let dir = TempDir::new();
    let path: &Path = &dir.0.join("absent.sock");
    let err = client::connect_vsock_uds(path, 52).unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
}
