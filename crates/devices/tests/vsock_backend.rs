//! virtio-vsock with its host streams in a back-end process (`backend=process`): a guest
//! driver's rings in real memory, real unix sockets, a real launcher and back-end process, a
//! real `kill -9`. Not a libtest harness: the launcher must be forked while the process has one
//! thread, before any test thread exists.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;

use bulwark_backends::launcher::Launcher;
use bulwark_devices::virtio::vsock::guest::GuestVsock;
use bulwark_devices::virtio::vsock::{HEADER_LEN, HOST_CID, Header, Vsock, VsockConfig, op};
use bulwark_devices::virtio::{DeviceEvents, Isolation, VirtioDevice};
use common::{backend_pid, kill9};

const CID: u64 = 9;
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;
const WAIT: Duration = Duration::from_secs(10);

struct Guest {
    dev: Vsock,
    events: DeviceEvents,
    /// The guest's driver: rings, buffers and packets in guest memory.
    g: GuestVsock,
    socket: PathBuf,
}

/// A packet from the guest (its length is set when it is sent).
fn header(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        kind: 1,
        op,
        buf_alloc: 1 << 20,
        ..Header::default()
    }
}

impl Guest {
    fn new(dir: &Path) -> Self {
        let socket = dir.join("v.sock");
        let events = DeviceEvents::new().unwrap();
        let cfg = VsockConfig {
            cid: CID,
            socket: socket.clone(),
            isolation: Isolation::Process,
        };
        let mut dev = Vsock::new(&cfg, events.clone()).expect("a vsock device with a back-end");
        let mut g = GuestVsock::activate(&mut dev, CID, RX_BUF);
        g.post_rx(&mut dev, 64);
        Self {
            dev,
            events,
            g,
            socket,
        }
    }

    fn send(&mut self, h: Header, payload: &[u8]) {
        self.g.send(&mut self.dev, h, payload);
    }

    /// Runs the device on its ready descriptors (host streams, the back-end's channel) as its
    /// thread would, for up to `ms`.
    fn pump(&mut self, ms: i32) {
        GuestVsock::pump_once(&mut self.dev, &self.events, ms);
    }

    /// Packets placed in receive buffers since the last call (buffers are posted again).
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let out = self.g.received();
        if !out.is_empty() {
            self.g.post_rx(&mut self.dev, out.len());
        }
        out
    }

    /// Pumps until a packet with `op` arrives; what came with it and before it is returned too.
    fn until(&mut self, op: u16) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + WAIT;
        let mut got = Vec::new();
        loop {
            got.extend(self.received());
            if got.iter().any(|(h, _)| h.op == op) {
                return got;
            }
            assert!(Instant::now() < deadline, "no packet with op {op}: {got:?}");
            self.pump(50);
        }
    }

    /// A host client connects for guest port `port` and the guest accepts: the client and the
    /// host port.
    fn host_connect(&mut self, port: u32) -> (UnixStream, u32) {
        let mut client = UnixStream::connect(&self.socket).unwrap();
        client.set_read_timeout(Some(WAIT)).unwrap();
        client
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        let req = self.until(op::REQUEST).pop().unwrap().0;
        self.send(header(op::RESPONSE, port, req.src_port), &[]);
        self.pump(50);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line[..3], b"OK ", "{:?}", String::from_utf8_lossy(&line));
        (client, req.src_port)
    }

    fn stats(&self) -> bulwark_devices::virtio::DeviceCounters {
        self.dev.stats().snapshot()
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn main() {
    let launcher = Launcher::start()
        .expect("the back-end launcher (forked while this test has one thread)")
        .install();
    let dir = std::env::temp_dir().join(format!("bulwark-vsock-backend-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut g = Guest::new(&dir);
    let backend = backend_pid(launcher.pid(), "bw-vsock").expect("a bw-vsock process");
    let maps = std::fs::read_to_string(format!("/proc/{backend}/maps")).unwrap();
    assert!(
        maps.contains("bulwark-window-vsock") && !maps.contains("bulwark-guest"),
        "the back-end maps its window and no guest memory:\n{maps}"
    );

    // Host → guest and guest → host through the back-end, more than one window's worth.
    let (mut client, host_port) = g.host_connect(52);
    let to_guest = pattern(300 << 10, 1);
    let writer = {
        let mut c = client.try_clone().unwrap();
        let data = to_guest.clone();
        std::thread::spawn(move || c.write_all(&data).unwrap())
    };
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < to_guest.len() {
        for (h, p) in g.received() {
            if h.op == op::RW {
                got.extend(p);
                // Tell the device the guest consumed it.
                let mut u = header(op::CREDIT_UPDATE, 52, host_port);
                u.fwd_cnt = got.len() as u32;
                g.send(u, &[]);
            }
        }
        assert!(
            Instant::now() < deadline,
            "host → guest stalled at {}",
            got.len()
        );
        g.pump(20);
    }
    writer.join().unwrap();
    assert!(
        got == to_guest,
        "host → guest bytes arrive intact and in order"
    );
    let to_host = pattern(200 << 10, 7);
    for piece in to_host.chunks(32 << 10) {
        g.send(header(op::RW, 52, host_port), piece);
        g.pump(0);
    }
    let mut back = vec![0u8; to_host.len()];
    let reader = std::thread::spawn(move || {
        client.read_exact(&mut back).unwrap();
        (client, back)
    });
    let deadline = Instant::now() + WAIT;
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "guest → host stalled");
        g.pump(20);
    }
    let (mut client, back) = reader.join().unwrap();
    assert!(
        back == to_host,
        "guest → host bytes arrive intact and in order"
    );

    // A guest connection to a host listener, then the host closes: the guest hears it.
    let listener = UnixListener::bind(dir.join("v.sock_6000")).unwrap();
    g.send(header(op::REQUEST, 7000, 6000), &[]);
    let resp = g.until(op::RESPONSE);
    assert!(
        resp.iter()
            .any(|(h, _)| h.op == op::RESPONSE && h.dst_port == 7000)
    );
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(b"from the listener").unwrap();
    drop(peer);
    let packets = g.until(op::SHUTDOWN);
    let data: Vec<u8> = packets
        .iter()
        .filter(|(h, _)| h.op == op::RW && h.dst_port == 7000)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(data, b"from the listener");

    // kill -9 the back-end: the connection it held is reset for the guest and closed for the
    // host client; a new back-end serves the next connection.
    assert_eq!(g.stats().restarts, 0);
    assert_eq!(kill9(backend), 0, "kill -9 the back-end");
    let reset = g.until(op::RST);
    assert!(
        reset
            .iter()
            .any(|(h, _)| h.op == op::RST && h.dst_port == 52 && h.src_port == host_port),
        "the guest hears its connection is gone: {reset:?}"
    );
    let mut rest = Vec::new();
    let _ = client.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the host client sees its stream end");
    let (mut client, host_port) = g.host_connect(53);
    client.write_all(b"after the restart").unwrap();
    let packets = g.until(op::RW);
    assert!(
        packets
            .iter()
            .any(|(h, p)| h.src_port == host_port && p == b"after the restart")
    );
    let s = g.stats();
    assert_eq!(s.restarts, 1, "{s}");
    let again = backend_pid(launcher.pid(), "bw-vsock").expect("a new bw-vsock process");
    assert_ne!(again, backend);
    assert_eq!(g.dev.usage().connections, 1);

    // Killed again, and this time the device finds out from a request (the guest's data for
    // the open connection), not from the channel: the new back-end started for the next
    // client must still be heard.
    assert_eq!(kill9(again), 0);
    let deadline = Instant::now() + WAIT;
    while backend_pid(launcher.pid(), "bw-vsock") == Some(again) {
        assert!(Instant::now() < deadline, "the back-end did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    g.send(header(op::RW, 53, host_port), b"lost?");
    let reset = g.received();
    assert!(
        reset
            .iter()
            .any(|(h, _)| h.op == op::RST && h.src_port == host_port),
        "the request found the back-end dead and reset the connection: {reset:?}"
    );
    drop(client);
    let (mut client, host_port) = g.host_connect(54);
    client.write_all(b"third back-end").unwrap();
    let packets = g.until(op::RW);
    assert!(
        packets
            .iter()
            .any(|(h, p)| h.src_port == host_port && p == b"third back-end")
    );
    let s = g.stats();
    assert_eq!(s.restarts, 2, "{s}");

    // News that arrives while the device waits for a reply: the host writes while the stream
    // is watched (the back-end says so at once), then the guest's data makes the device call
    // the back-end, whose answer comes after that news. Nothing else will wake the device.
    client.write_all(b"racing").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    g.send(header(op::RW, 54, host_port), b"ping");
    let packets = g.until(op::RW);
    assert!(
        packets
            .iter()
            .any(|(h, p)| h.src_port == host_port && p == b"racing"),
        "{packets:?}"
    );
    let mut ping = [0u8; 4];
    client.read_exact(&mut ping).unwrap();
    assert_eq!(&ping, b"ping");

    // A client's CONNECT line reported while the device waits for another reply (closing the
    // stream of a connection the guest reset): the handshake still goes on.
    let mut late = UnixStream::connect(&g.socket).unwrap();
    late.set_read_timeout(Some(WAIT)).unwrap();
    late.write_all(b"CONNECT 55\n").unwrap();
    g.pump(50); // accepted, handed over, watched; the back-end reports the line at once
    std::thread::sleep(Duration::from_millis(100));
    g.send(header(op::RST, 54, host_port), &[]);
    let req = g.until(op::REQUEST);
    assert!(
        req.iter()
            .any(|(h, _)| h.op == op::REQUEST && h.dst_port == 55),
        "{req:?}"
    );
    let s = g.stats();
    let rss = backend_pid(launcher.pid(), "bw-vsock")
        .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_default();
    println!(
        "vsock back-end: data both ways, host close, two kills and restarts: ok ({s}; back-end RSS {rss})"
    );
    drop(g);
    let _ = std::fs::remove_dir_all(&dir);
}
