//! A monitor managed by bulwarkd: the control and console sockets in the VM's directory,
//! served from the event loop.
//!
//! `control.sock` speaks the closed message set of `bulwark-channel` (describe, pause, resume,
//! shutdown, kill, snapshot). `console.sock` is a byte stream: each client first gets the
//! scroll-back (the last [`SCROLLBACK`] bytes of console output) and then the output as it
//! comes; what a client writes is console input. Output fans out from a ring the vCPU threads
//! append to, so a slow or stuck client never blocks a vCPU: a client that falls more than the
//! ring behind skips ahead and is told how much it missed.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark_channel::{
    CONSOLE_SOCKET, CONTROL_SOCKET, DeviceInfo, ExitCounts, FrameBuffer, IntrospectView, Request,
    Response, RunState, VmInfo, error_code,
};
use bulwark_devices::console::ConsoleSink;
use bulwark_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::control::VmControl;
use crate::introspect::{Introspector, ReadError, cpu_view};
use crate::outcome::StopReason;
use crate::snapshot::cpu::VcpuState;
use crate::snapshot::{Header, RecordWriter, SNAPSHOT_FORMAT, SnapshotError, SnapshotSource};
use crate::vcpu::{VcpuContext, sum_counters};

/// Console output kept for clients that attach later.
pub const SCROLLBACK: usize = 256 * 1024;
/// Control and console clients at once; more are refused (closed on accept).
const MAX_CLIENTS: usize = 32;
/// How long a pause waits for the vCPUs to park.
const PAUSE_WAIT: Duration = Duration::from_secs(5);

/// First epoll token of the managed sockets; the event loop owns the ones below.
pub const TOKEN_BASE: u64 = 16;
const TOKEN_CONTROL_LISTENER: u64 = TOKEN_BASE;
const TOKEN_CONSOLE_LISTENER: u64 = TOKEN_BASE + 1;
const TOKEN_HUB: u64 = TOKEN_BASE + 2;
const TOKEN_CLIENTS: u64 = TOKEN_BASE + 3;

#[derive(Debug, thiserror::Error)]
pub enum ManagedError {
    #[error("cannot create the control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("managed monitor setup failed: {0}")]
    Io(#[from] io::Error),
}

/// Console output as the monitor keeps it for console clients.
#[derive(Debug)]
pub struct ConsoleHub {
    ring: Mutex<Ring>,
    /// Readable when output arrived.
    notify: EventFd,
}

#[derive(Debug)]
struct Ring {
    data: VecDeque<u8>,
    /// Bytes ever written; `data` holds the last `data.len()` of them.
    total: u64,
}

impl ConsoleHub {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            ring: Mutex::new(Ring {
                data: VecDeque::with_capacity(SCROLLBACK),
                total: 0,
            }),
            notify: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends output; the oldest bytes past the scroll-back fall out.
    pub fn push(&self, data: &[u8]) {
        {
            let mut r = self.ring();
            let data = &data[data.len().saturating_sub(SCROLLBACK)..];
            let over = (r.data.len() + data.len()).saturating_sub(SCROLLBACK);
            r.data.drain(..over);
            r.data.extend(data);
            r.total += data.len() as u64;
        }
        let _ = self.notify.write(1);
    }

    /// Up to `max` bytes from offset `from`, and the offset they start at (later than `from`
    /// when those bytes already fell out of the ring).
    pub fn read_from(&self, from: u64, max: usize) -> (u64, Vec<u8>) {
        let r = self.ring();
        let oldest = r.total - r.data.len() as u64;
        let start = from.clamp(oldest, r.total);
        let skip = (start - oldest) as usize;
        let n = (r.data.len() - skip).min(max);
        (start, r.data.range(skip..skip + n).copied().collect())
    }

    /// Offset of the oldest byte still kept.
    pub fn oldest(&self) -> u64 {
        let r = self.ring();
        r.total - r.data.len() as u64
    }
}

/// The `Write` end of a hub: what the console sink writes to.
pub struct HubWriter(pub Arc<ConsoleHub>);

impl Write for HubWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0.push(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A managed monitor before its VM is built: where its sockets go, and the console ring its
/// devices write to. The sockets are bound only when the VM is ready to run
/// ([`ManagedServer::new`]): a daemon that sees `control.sock` may use the VM, and a restore
/// that fails leaves none behind.
#[derive(Debug)]
pub struct ManagedSetup {
    pub dir: PathBuf,
    pub hub: Arc<ConsoleHub>,
}

#[derive(Debug)]
struct Listeners {
    control: UnixListener,
    console: UnixListener,
}

/// The process id describe reports (0: this process's own).
static REPORTED_PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Reports `pid` as the monitor's process id: a jailed monitor is PID 1 of its own namespace,
/// while the control plane knows the jail's outer process, which it started.
pub fn set_reported_pid(pid: u32) {
    REPORTED_PID.store(pid, std::sync::atomic::Ordering::Relaxed);
}

fn reported_pid() -> u32 {
    match REPORTED_PID.load(std::sync::atomic::Ordering::Relaxed) {
        0 => std::process::id(),
        pid => pid,
    }
}

fn bind(dir: &Path, name: &str) -> Result<UnixListener, ManagedError> {
    let path = dir.join(name);
    // A socket left by an earlier monitor of this VM is stale: that monitor is gone (the
    // daemon starts one monitor per directory).
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).map_err(|source| ManagedError::Bind {
        path: path.clone(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

impl ManagedSetup {
    /// A managed monitor for the VM directory `dir`.
    pub fn new(dir: &Path) -> Result<Self, ManagedError> {
        if !dir.is_dir() {
            return Err(ManagedError::Io(io::Error::new(
                io::ErrorKind::NotFound,
                format!("the VM directory {} does not exist", dir.display()),
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            hub: Arc::new(ConsoleHub::new()?),
        })
    }
}

/// What the control channel reports about the VM and can do to it beyond pause and stop.
pub struct VmView {
    pub kind: &'static str,
    pub vcpus: u32,
    pub memory: u64,
    pub started: Instant,
    pub console: Arc<ConsoleSink>,
    pub devices: Vec<(String, Arc<MmioTransport>)>,
    /// Presses the ACPI power button, for VMs that have one.
    pub power_button: Option<Box<dyn Fn() + Send>>,
    /// How this VM's state is saved, for VMs that can be snapshotted.
    pub snapshot: Option<Box<dyn SnapshotSource>>,
    /// Introspection, for VMs whose spec allows it.
    pub introspection: Option<Arc<Introspector>>,
}

enum ClientKind {
    Control(FrameBuffer),
    Console { offset: u64 },
}

struct Client {
    stream: UnixStream,
    kind: ClientKind,
    out: Vec<u8>,
    /// Registered for EPOLLOUT because `out` did not drain.
    want_out: bool,
}

/// The managed sockets while the VM runs; driven by the event loop.
pub struct ManagedServer {
    setup: ManagedSetup,
    sockets: Listeners,
    view: VmView,
    clients: HashMap<u64, Client>,
    next_token: u64,
}

/// What the event loop hands the server for one wake-up.
pub struct LoopCtx<'a> {
    pub epoll: &'a Epoll,
    pub control: &'a VmControl,
    pub vcpu: &'a VcpuContext,
    /// Kicks every vCPU thread out of `KVM_RUN`.
    pub kick: &'a dyn Fn(),
    /// Console input from clients goes here.
    pub input: &'a mut VecDeque<u8>,
}

impl ManagedServer {
    /// Binds `control.sock` and `console.sock` (mode 0600) in the VM directory.
    pub fn new(setup: ManagedSetup, view: VmView) -> Result<Self, ManagedError> {
        let sockets = Listeners {
            control: bind(&setup.dir, CONTROL_SOCKET)?,
            console: bind(&setup.dir, CONSOLE_SOCKET)?,
        };
        Ok(Self {
            setup,
            sockets,
            view,
            clients: HashMap::new(),
            next_token: TOKEN_CLIENTS,
        })
    }

    /// Adds the listeners and the output notifier to the event loop's epoll.
    pub fn register(&self, epoll: &Epoll) -> io::Result<()> {
        for (fd, token) in [
            (self.sockets.control.as_raw_fd(), TOKEN_CONTROL_LISTENER),
            (self.sockets.console.as_raw_fd(), TOKEN_CONSOLE_LISTENER),
            (self.setup.hub.notify.as_raw_fd(), TOKEN_HUB),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(())
    }

    /// Serves one ready token.
    pub fn handle(&mut self, token: u64, ctx: &mut LoopCtx<'_>) {
        match token {
            TOKEN_CONTROL_LISTENER => self.accept(true, ctx.epoll),
            TOKEN_CONSOLE_LISTENER => self.accept(false, ctx.epoll),
            TOKEN_HUB => {
                let _ = self.setup.hub.notify.read();
                let tokens: Vec<u64> = self.clients.keys().copied().collect();
                for t in tokens {
                    self.pump(t, ctx.epoll);
                }
            }
            t => self.serve_client(t, ctx),
        }
    }

    fn accept(&mut self, control: bool, epoll: &Epoll) {
        let listener = if control {
            &self.sockets.control
        } else {
            &self.sockets.console
        };
        let mut accepted = Vec::new();
        while let Ok((stream, _)) = listener.accept() {
            accepted.push(stream);
        }
        for stream in accepted {
            if self.clients.len() >= MAX_CLIENTS || stream.set_nonblocking(true).is_err() {
                tracing::warn!("refusing a managed-socket client: too many clients");
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let ev = EpollEvent::new(EventSet::IN, token);
            if epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                .is_err()
            {
                continue;
            }
            let kind = if control {
                ClientKind::Control(FrameBuffer::default())
            } else {
                ClientKind::Console {
                    offset: self.setup.hub.oldest(),
                }
            };
            self.clients.insert(
                token,
                Client {
                    stream,
                    kind,
                    out: Vec::new(),
                    want_out: false,
                },
            );
            if !control {
                self.pump(token, epoll);
            }
        }
    }

    fn drop_client(&mut self, token: u64, epoll: &Epoll) {
        if let Some(c) = self.clients.remove(&token) {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// Reads what a client sent and answers it.
    fn serve_client(&mut self, token: u64, ctx: &mut LoopCtx<'_>) {
        let mut buf = [0u8; 16 * 1024];
        let mut closed = false;
        let mut frames = Vec::new();
        {
            let Some(c) = self.clients.get_mut(&token) else {
                return;
            };
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => match &mut c.kind {
                        ClientKind::Control(fb) => fb.extend(&buf[..n]),
                        ClientKind::Console { .. } => ctx.input.extend(&buf[..n]),
                    },
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            if let ClientKind::Control(fb) = &mut c.kind {
                loop {
                    match fb.next_frame() {
                        Ok(Some(f)) => frames.push(Ok(f)),
                        Ok(None) => break,
                        Err(e) => {
                            frames.push(Err(e));
                            closed = true;
                            break;
                        }
                    }
                }
            }
        }
        for f in frames {
            let resp = match f.and_then(|f| bulwark_channel::decode::<Request>(&f)) {
                Ok(req) => self.serve_request(req, ctx),
                Err(e) => Response::error(error_code::INVALID, e.to_string()),
            };
            if let Some(c) = self.clients.get_mut(&token) {
                c.out.extend(bulwark_channel::encode(&resp));
            }
        }
        self.pump(token, ctx.epoll);
        if closed {
            // Flush what is owed before closing, as far as the socket takes it.
            self.drop_client(token, ctx.epoll);
        }
    }

    /// Moves output to a client: pending replies, or console bytes from the hub.
    fn pump(&mut self, token: u64, epoll: &Epoll) {
        let hub = self.setup.hub.clone();
        let Some(c) = self.clients.get_mut(&token) else {
            return;
        };
        let mut dead = false;
        loop {
            if c.out.is_empty() {
                let ClientKind::Console { offset } = &mut c.kind else {
                    break;
                };
                let (start, data) = hub.read_from(*offset, 64 * 1024);
                if start > *offset {
                    let note = format!(
                        "\r\n[bulwark: {} bytes of console output skipped: this client fell behind]\r\n",
                        start - *offset
                    );
                    c.out.extend(note.as_bytes());
                }
                if data.is_empty() && c.out.is_empty() {
                    *offset = start;
                    break;
                }
                *offset = start + data.len() as u64;
                c.out.extend(data);
            }
            match c.stream.write(&c.out) {
                Ok(0) => {
                    dead = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    dead = true;
                    break;
                }
            }
        }
        if dead {
            self.drop_client(token, epoll);
            return;
        }
        let want_out = !c.out.is_empty();
        if want_out != c.want_out {
            c.want_out = want_out;
            let events = if want_out {
                EventSet::IN | EventSet::OUT
            } else {
                EventSet::IN
            };
            let _ = epoll.ctl(
                ControlOperation::Modify,
                c.stream.as_raw_fd(),
                EpollEvent::new(events, token),
            );
        }
    }

    fn serve_request(&mut self, req: Request, ctx: &mut LoopCtx<'_>) -> Response {
        let control = ctx.control;
        if control.is_stopping() && !matches!(req, Request::Describe | Request::Kill) {
            return Response::error(error_code::WRONG_STATE, "the VM is stopping");
        }
        match req {
            Request::Describe => Response::Info(self.describe(ctx)),
            Request::Pause => {
                if control.is_paused() {
                    return Response::error(error_code::WRONG_STATE, "the VM is already paused");
                }
                if self.pause(ctx) {
                    Response::Ok
                } else {
                    Response::error(
                        error_code::FAILED,
                        "the vCPUs did not stop within 5 s; the VM keeps running",
                    )
                }
            }
            Request::Resume => {
                if !control.is_paused() {
                    return Response::error(error_code::WRONG_STATE, "the VM is not paused");
                }
                control.resume();
                Response::Ok
            }
            Request::Shutdown => match &self.view.power_button {
                Some(press) => {
                    if control.is_paused() {
                        return Response::error(
                            error_code::WRONG_STATE,
                            "the VM is paused; resume it so the guest can see the power button",
                        );
                    }
                    press();
                    Response::Ok
                }
                None => Response::error(
                    error_code::UNSUPPORTED,
                    "this VM has no ACPI power button (function micro-VMs have no OS to shut down); kill it instead",
                ),
            },
            Request::Kill => {
                control.stop(StopReason::Killed);
                Response::Ok
            }
            Request::Snapshot {
                path,
                key,
                leave_paused,
            } => self.snapshot(Path::new(&path), &key, leave_paused, ctx),
            Request::Introspect { view, symbol } => self.introspect(view, symbol, ctx),
        }
    }

    /// Holds the vCPUs, takes every vCPU's registers, reads the guest kernel through vCPU 0's
    /// view of it, lets them run on.
    fn introspect(
        &self,
        view: IntrospectView,
        symbol: Option<String>,
        ctx: &LoopCtx<'_>,
    ) -> Response {
        let Some(vmi) = &self.view.introspection else {
            return Response::error(
                error_code::FORBIDDEN,
                "this VM's spec does not allow introspection; its owner allows it with `introspection = true` in the spec the VM is created from",
            );
        };
        // Parsing the profile takes a while the first time: before the vCPUs stop.
        if let Err(e) = vmi.profile() {
            return Response::error(error_code::FAILED, e);
        }
        let was_paused = ctx.control.is_paused();
        let t0 = Instant::now();
        if !was_paused && !self.pause(ctx) {
            return Response::error(
                error_code::FAILED,
                "the vCPUs did not stop within 5 s; nothing was read",
            );
        }
        let cpus = self.on_every_vcpu(ctx, |fd, _, _| cpu_view(fd));
        let failed = match &cpus {
            None => Some("a vCPU did not hand over its registers in time".to_string()),
            Some(c) => c.iter().enumerate().find_map(|(i, r)| {
                r.as_ref()
                    .err()
                    .map(|e| format!("cannot read vCPU {i}'s registers: {e}"))
            }),
        };
        // Lists are read while the guest is held, so they are consistent. A measurement reads
        // tens of MiB of kernel text, which does not change while the guest runs unless
        // something attacks it (and then the check is what should see it), so the guest runs
        // on once its registers are taken.
        let mut paused_us = 0;
        let mut run_on = || {
            if !was_paused {
                ctx.control.resume();
                paused_us = t0.elapsed().as_micros() as u64;
            }
        };
        if matches!(view, IntrospectView::Baseline | IntrospectView::Check) {
            run_on();
        }
        let result = match failed {
            Some(e) => Err(ReadError::Failed(e)),
            None => {
                let cpus: Vec<_> = cpus.into_iter().flatten().flatten().collect();
                let r = vmi.read(view, symbol.as_deref(), &ctx.vcpu.mem, &cpus);
                match (&r, vmi.debug()) {
                    // Every vCPU takes the new guest-debug setting before the guest runs on.
                    (Ok(_), Some(debug))
                        if matches!(view, IntrospectView::Trace | IntrospectView::Untrace) =>
                    {
                        match self.set_guest_debug(debug, ctx) {
                            Ok(()) => r,
                            Err(e) => {
                                vmi.untrace();
                                let _ = self.set_guest_debug(Default::default(), ctx);
                                Err(ReadError::Failed(e))
                            }
                        }
                    }
                    _ => r,
                }
            }
        };
        if !matches!(view, IntrospectView::Baseline | IntrospectView::Check) {
            run_on();
        }
        tracing::info!(
            ?view,
            paused_us,
            ok = result.is_ok(),
            "introspection served"
        );
        match result {
            Ok(mut r) => {
                r.paused_us = paused_us;
                Response::Introspection(r)
            }
            Err(e) => Response::error(e.code(), e.message()),
        }
    }

    /// Runs `job` on every (parked) vCPU's own thread with its fd, its registers and its host
    /// call in progress, and collects the results in vCPU order; `None` when a vCPU did not
    /// answer within the pause timeout.
    fn on_every_vcpu<T: Send + 'static>(
        &self,
        ctx: &LoopCtx<'_>,
        job: impl Fn(
            &kvm_ioctls::VcpuFd,
            Result<kvm_bindings::kvm_regs, kvm_ioctls::Error>,
            Option<u32>,
        ) -> T
        + Send
        + Sync
        + 'static,
    ) -> Option<Vec<T>> {
        let n = self.view.vcpus;
        let job = Arc::new(job);
        let (tx, rx) = std::sync::mpsc::channel();
        for i in 0..n {
            let (tx, job) = (tx.clone(), job.clone());
            ctx.vcpu.jobs.post(
                i,
                Box::new(move |fd, regs, pending| {
                    let _ = tx.send((i, job(fd, regs, pending)));
                }),
            );
        }
        drop(tx);
        ctx.control.nudge();
        let deadline = Instant::now() + PAUSE_WAIT;
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let (i, v) = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            out[i as usize] = Some(v);
        }
        out.into_iter().collect()
    }

    /// Sets guest debugging on every (parked) vCPU.
    fn set_guest_debug(
        &self,
        debug: kvm_bindings::kvm_guest_debug,
        ctx: &LoopCtx<'_>,
    ) -> Result<(), String> {
        let results = self
            .on_every_vcpu(ctx, move |fd, _, _| fd.set_guest_debug(&debug))
            .ok_or("a vCPU did not take the guest-debug setting in time")?;
        for (i, r) in results.into_iter().enumerate() {
            r.map_err(|e| format!("KVM_SET_GUEST_DEBUG on vCPU {i}: {e}"))?;
        }
        Ok(())
    }

    /// Pauses the VM if it runs; false if the vCPUs did not park.
    fn pause(&self, ctx: &LoopCtx<'_>) -> bool {
        ctx.control.request_pause();
        if ctx
            .control
            .wait_parked(self.view.vcpus, PAUSE_WAIT, ctx.kick)
        {
            true
        } else {
            ctx.control.resume();
            false
        }
    }

    fn snapshot(
        &mut self,
        path: &Path,
        key: &str,
        leave_paused: bool,
        ctx: &LoopCtx<'_>,
    ) -> Response {
        let Some(src) = &self.view.snapshot else {
            return Response::error(
                error_code::UNSUPPORTED,
                "snapshots are not available for this kind of VM",
            );
        };
        if let Some(why) = src.refuse() {
            return Response::error(error_code::UNSUPPORTED, why);
        }

        let key = match bulwark_seal::OwnerKey::from_hex(key) {
            Ok(k) => k,
            Err(e) => return Response::error(error_code::INVALID, e.to_string()),
        };
        if !path.is_absolute() {
            return Response::error(error_code::INVALID, "the snapshot path must be absolute");
        }
        let spec = match std::fs::read_to_string(self.setup.dir.join(bulwark_channel::SPEC_FILE)) {
            Ok(s) => s,
            Err(e) => {
                return Response::error(
                    error_code::FAILED,
                    format!("cannot read the VM's spec.json: {e}"),
                );
            }
        };
        // Memory still being restored lazily reads as holes: wait until it is all in place.
        if let Some(Err(e)) = src.base().lazy.as_ref().map(|l| l.wait()) {
            return Response::error(error_code::FAILED, e.to_string());
        }
        let was_paused = ctx.control.is_paused();
        let t0 = Instant::now();
        if !was_paused && !self.pause(ctx) {
            return Response::error(
                error_code::FAILED,
                "the vCPUs did not stop within 5 s; no snapshot was taken",
            );
        }
        let result = self.write_snapshot(path, &key, spec, ctx);
        let paused_ms = t0.elapsed().as_millis() as u64;
        if !was_paused && !leave_paused {
            ctx.control.resume();
        }
        match result {
            Ok(bytes) => {
                tracing::info!(path = %path.display(), bytes, paused_ms, "snapshot written");
                Response::Snapshot { bytes, paused_ms }
            }
            Err(e) => Response::error(
                error_code::FAILED,
                format!(
                    "snapshot failed, the VM {}: {}",
                    if leave_paused || was_paused {
                        "stays paused"
                    } else {
                        "runs on"
                    },
                    bulwark_channel::error_chain(&e)
                ),
            ),
        }
    }

    /// Captures every vCPU on its own (parked) thread, then writes the sealed file.
    fn write_snapshot(
        &self,
        path: &Path,
        key: &bulwark_seal::OwnerKey,
        spec: String,
        ctx: &LoopCtx<'_>,
    ) -> Result<u64, SnapshotError> {
        let Some(src) = &self.view.snapshot else {
            return Err(SnapshotError::Unsupported("no snapshot source".into()));
        };
        let n = self.view.vcpus;
        let base = src.base();
        let msr_index: Arc<[u32]> = base.msr_index.as_slice().into();
        let irqchip = src.in_kernel_irqchip();
        let states = self
            .on_every_vcpu(ctx, move |fd, regs, pending| {
                regs.map_err(crate::snapshot::kvm("KVM_GET_REGS"))
                    .and_then(|r| VcpuState::capture(fd, r, &msr_index, irqchip, pending))
            })
            .ok_or_else(|| {
                SnapshotError::Unsupported("a vCPU did not hand over its state in time".into())
            })?
            .into_iter()
            .collect::<Result<Vec<VcpuState>, SnapshotError>>()?;
        let regions = base.regions.clone();
        let header = Header {
            format: SNAPSHOT_FORMAT,
            kind: self.view.kind.to_string(),
            spec,
            vcpus: n,
            regions: regions.clone(),
            clock_ns: u64::try_from(base.clock_start.elapsed().as_nanos()).unwrap_or(u64::MAX),
        };
        let total = regions.iter().map(|r| r.1).sum();
        crate::snapshot::write_sealed(path, key, |out| {
            let progress = crate::snapshot::Progress::start(&self.setup.dir, "snapshot", total);
            let mut w = RecordWriter::new(out).with_progress(progress);
            w.header(&header)?;
            for (i, st) in states.iter().enumerate() {
                st.write(i as u32, &mut w)?;
            }
            src.write_state(&mut w, &mut |w| {
                let populated = |i: usize, len: u64| {
                    (base.ram_map.as_ref()).and_then(|m| m.populated(i, len).ok())
                };
                w.memory(&ctx.vcpu.mem, &regions, &populated)
            })?;
            w.end()?;
            Ok(())
        })
    }

    fn describe(&self, ctx: &LoopCtx<'_>) -> VmInfo {
        let c = sum_counters(&ctx.vcpu.live);
        let state = if ctx.control.is_stopping() {
            RunState::Stopping
        } else if ctx.control.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        };
        let vcpu_time_ns = ctx
            .vcpu
            .live
            .iter()
            .map(|l| thread_cpu_ns(l.tid.load(std::sync::atomic::Ordering::Relaxed)))
            .sum();
        VmInfo {
            state,
            kind: self.view.kind.to_string(),
            vcpus: self.view.vcpus,
            memory: self.view.memory,
            uptime_ms: self.view.started.elapsed().as_millis() as u64,
            vcpu_time_ns,
            exits: ExitCounts {
                total: c.exits,
                io: c.io,
                mmio: c.mmio,
                hostcalls: c.hostcalls,
            },
            console_bytes: self.view.console.written(),
            devices: self
                .view
                .devices
                .iter()
                .map(|(name, t)| DeviceInfo {
                    name: name.clone(),
                    counters: (t.stats().snapshot().fields().into_iter())
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                })
                .collect(),
            pid: reported_pid(),
            lazy_restore: (self.view.snapshot.as_ref())
                .and_then(|s| s.base().lazy.as_ref())
                .map(|l| l.info()),
            introspections: self.view.introspection.as_ref().map_or(0, |v| v.served()),
        }
    }
}

/// Nanoseconds a thread of this process ran (from its schedstat), 0 if unknown.
fn thread_cpu_ns(tid: u32) -> u64 {
    if tid == 0 {
        return 0;
    }
    std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_keeps_the_last_scrollback_bytes_and_reports_skips() {
        let hub = ConsoleHub::new().unwrap();
        hub.push(b"hello ");
        hub.push(b"world");
        assert_eq!(hub.read_from(0, 100), (0, b"hello world".to_vec()));
        assert_eq!(hub.read_from(6, 3), (6, b"wor".to_vec()));
        let big = vec![b'x'; SCROLLBACK];
        hub.push(&big);
        let (start, data) = hub.read_from(0, usize::MAX);
        assert_eq!(start, 11, "the oldest 11 bytes fell out");
        assert_eq!(data.len(), SCROLLBACK);
        assert_eq!(hub.oldest(), 11);
        assert!(hub.notify.read().unwrap() >= 3);
        let (start, data) = hub.read_from(u64::MAX, 10);
        assert_eq!((start, data.len()), (11 + SCROLLBACK as u64, 0));
    }
}
