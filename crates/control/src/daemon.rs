//! The daemon's state and every VM operation: records in memory backed by the store, monitor
//! processes started, watched and re-attached, requests carried to monitors and guest agents.
//!
//! Locking: `vms` (a plain mutex) is held only to read or replace records, never across an
//! `.await`. Operations that change a VM's process (start, stop, kill, delete, restore, pause,
//! resume) also hold that VM's `op` lock, so two of them never interleave.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulwark_channel::{CONSOLE_SOCKET, CONTROL_SOCKET, Request, Response, SPEC_FILE, VmInfo};
use bulwark_spec::FileConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::auth;
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::monitor::{self, Launch, RestoreFrom};
use crate::routes::Role;
use crate::store::{MonitorProc, Store, StoreError, VmRecord, VmState};

/// How long a live monitor may take to answer its first Describe after being started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for a restoring monitor, which first reads, authenticates and decrypts the whole
/// snapshot (seconds per GiB on hardware, much longer under emulation). A monitor that dies
/// meanwhile is noticed at once; this only bounds one that lives and never answers.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one ordinary control request may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an introspection request may take: the first one parses the kernel profile
/// (System.map and BTF, several seconds for a 6.12 kernel under emulation) and a check hashes
/// tens of MiB of kernel text.
const INTROSPECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a snapshot may take to write.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a Kill may take to end the monitor process.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How often a re-attached monitor (not our child) is checked for its end.
const ORPHAN_POLL: Duration = Duration::from_millis(200);
/// The guest agent's vsock port.
const AGENT_PORT: u32 = 52;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}

/// Where the daemon keeps things and which monitor it starts.
#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The `bulwark` executable (its hidden `monitor` subcommand).
    pub monitor: PathBuf,
    /// Start monitors with `--no-jail` (debugging only).
    pub no_jail: bool,
}

#[derive(Debug)]
struct VmEntry {
    rec: VmRecord,
    op: Arc<tokio::sync::Mutex<()>>,
}

/// Who sent a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Operator,
    /// The hash of an owner token some VM has.
    Owner(String),
}

/// The daemon.
#[derive(Debug)]
pub struct Daemon {
    cfg: Config,
    store: Store,
    operator_hash: String,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    pub metrics: Metrics,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn mkdir_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)?;
    // An existing directory keeps its old mode otherwise.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

/// Whether `name` is a valid VM or snapshot name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Whether `key` is 64 hex digits (a 256-bit owner key).
pub fn valid_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The host's RAM in bytes, from /proc/meminfo.
fn host_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// `POST /v1/vms` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub name: String,
    pub spec: Option<Value>,
    pub spec_toml: Option<String>,
    pub owner_token: Option<String>,
}

/// Rounds of a cross-view (agent, introspection, agent, introspection, agent).
const CROSSVIEW_ROUNDS: usize = 2;

/// `POST .../introspect` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectBody {
    pub view: bulwark_channel::IntrospectView,
    /// For `trace`: the kernel function.
    #[serde(default)]
    pub symbol: Option<String>,
}

/// `POST .../exec` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Plain text (UTF-8) given to the command's stdin.
    #[serde(default)]
    pub stdin: String,
    /// 0 = no limit.
    #[serde(default)]
    pub timeout_ms: u32,
}

/// Parses a serde error message into the right API error.
pub fn json_error(e: &serde_json::Error, what: &str) -> ApiError {
    let msg = format!("{what}: {e}");
    if e.to_string().starts_with("unknown field") {
        ApiError::UnknownField(msg)
    } else {
        ApiError::BadJson(msg)
    }
}

impl Daemon {
    /// Opens the state directory and the store, and re-attaches to monitors recorded live.
    pub async fn open(cfg: Config) -> Result<Arc<Self>, DaemonError> {
        let sd = |source| DaemonError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        };
        mkdir_private(&cfg.state_dir).map_err(sd)?;
        mkdir_private(&cfg.state_dir.join("vms")).map_err(sd)?;
        let operator_hash = auth::operator_token_hash(&cfg.state_dir)?;
        let store = Store::open(&cfg.state_dir.join("bulwarkd.redb"))?;
        let records = store.load_all()?;
        let daemon = Arc::new(Self {
            cfg,
            store,
            operator_hash,
            vms: Mutex::new(BTreeMap::new()),
            metrics: Metrics::default(),
        });
        for rec in records {
            daemon.lock().insert(
                rec.name.clone(),
                VmEntry {
                    rec,
                    op: Arc::default(),
                },
            );
        }
        daemon.reattach().await;
        Ok(daemon)
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, VmEntry>> {
        // A panic while holding the lock cannot leave a record half-written (records are
        // replaced whole), so a poisoned lock is still good.
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("vms").join(id)
    }

    /// Finds each VM recorded live and decides what became of its monitor.
    async fn reattach(self: &Arc<Self>) {
        let live: Vec<VmRecord> = self
            .lock()
            .values()
            .filter(|e| e.rec.state.is_live())
            .map(|e| e.rec.clone())
            .collect();
        for rec in live {
            let dir = self.vm_dir(&rec.id);
            let Some(m) = rec.monitor else {
                self.mark_ended(&rec.id, None, "no monitor was recorded".into());
                continue;
            };
            if monitor::read_exit(&dir).is_some() {
                self.mark_ended(&rec.id, Some(m), String::new());
                continue;
            }
            let answer =
                monitor::call(&dir.join(CONTROL_SOCKET), &Request::Describe, CALL_TIMEOUT).await;
            match answer {
                Ok(Response::Info(info)) if monitor::alive(&m) => {
                    info!(vm = %rec.name, pid = m.pid, "re-attached to running monitor");
                    let state = match info.state {
                        bulwark_channel::RunState::Paused => VmState::Paused,
                        _ => VmState::Running,
                    };
                    if state != rec.state {
                        let _ = self.modify(&rec.name, |r| r.state = state);
                    }
                    self.watch_orphan(rec.id.clone(), m);
                }
                _ => self.mark_ended(
                    &rec.id,
                    Some(m),
                    "monitor died while bulwarkd was down".into(),
                ),
            }
        }
    }

    /// Who holds `token`, or 401.
    pub fn caller(&self, token: Option<&str>) -> Result<Caller, ApiError> {
        let Some(token) = token else {
            return Err(ApiError::Unauthorized(
                "no token: send `Authorization: Bearer <token>` (the operator token is in STATE_DIR/operator.token)".into(),
            ));
        };
        let hash = auth::token_hash(token);
        if hash == self.operator_hash {
            return Ok(Caller::Operator);
        }
        if self.lock().values().any(|e| e.rec.owner_hash == hash) {
            return Ok(Caller::Owner(hash));
        }
        Err(ApiError::Unauthorized("unknown token".into()))
    }

    /// Checks a caller against a route's role for the VM `name`.
    pub fn authorize(
        &self,
        caller: &Caller,
        role: Role,
        name: Option<&str>,
    ) -> Result<(), ApiError> {
        let owns = |hash: &str| {
            name.is_some_and(|n| self.lock().get(n).is_some_and(|e| e.rec.owner_hash == hash))
        };
        let ok = match (role, caller) {
            (Role::Operator | Role::OperatorOrOwner, Caller::Operator) => true,
            (Role::Owner | Role::OperatorOrOwner, Caller::Owner(h)) => owns(h),
            _ => false,
        };
        if ok {
            return Ok(());
        }
        Err(ApiError::Forbidden(match (role, caller) {
            (Role::Operator, _) => "this route needs the operator token".into(),
            (_, Caller::Operator) => {
                "this route needs the VM owner's token; the operator cannot reach a guest".into()
            }
            _ => "this token does not own this VM".into(),
        }))
    }

    /// The VM's snapshot or restore in progress, as its monitor reports it (`operation` is
    /// null when there is none).
    pub fn progress(&self, name: &str) -> Result<Value, ApiError> {
        let rec = self.get(name)?;
        let path = self.vm_dir(&rec.id).join(bulwark_channel::PROGRESS_FILE);
        Ok(
            match std::fs::read_to_string(path)
                .ok()
                .and_then(|t| bulwark_channel::parse_progress(&t))
            {
                Some((op, done, total)) => json!({ "operation": op, "done": done, "total": total }),
                None => json!({ "operation": null, "done": 0, "total": 0 }),
            },
        )
    }

    /// A copy of the record named `name`, or 404.
    pub fn get(&self, name: &str) -> Result<VmRecord, ApiError> {
        self.lock()
            .get(name)
            .map(|e| e.rec.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no VM named `{name}`")))
    }

    fn op_lock(&self, name: &str) -> Result<Arc<tokio::sync::Mutex<()>>, ApiError> {
        self.lock()
            .get(name)
            .map(|e| e.op.clone())
            .ok_or_else(|| ApiError::NotFound(format!("no VM named `{name}`")))
    }

    /// Changes a record, durably first: on a store error nothing changes.
    fn modify(&self, name: &str, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord, ApiError> {
        let mut vms = self.lock();
        let entry = vms
            .get_mut(name)
            .ok_or_else(|| ApiError::NotFound(format!("no VM named `{name}`")))?;
        let mut rec = entry.rec.clone();
        f(&mut rec);
        self.store.update(&rec)?;
        entry.rec = rec.clone();
        Ok(rec)
    }

    /// Creates a VM record and its directory. Returns the record and the generated owner
    /// token, if one was generated.
    pub fn create(&self, req: CreateRequest) -> Result<(VmRecord, Option<String>), ApiError> {
        if !valid_name(&req.name) {
            return Err(ApiError::InvalidName(format!(
                "bad VM name `{}`: use 1 to 63 of a-z, 0-9 and '-', starting with a letter or digit",
                req.name.chars().take(80).collect::<String>()
            )));
        }
        let spec = match (req.spec, req.spec_toml) {
            (Some(v), None) => {
                if !v.is_object() {
                    return Err(ApiError::InvalidSpec("spec must be a JSON object".into()));
                }
                FileConfig::deserialize(&v).map_err(|e| {
                    let msg = format!("spec: {e}");
                    if e.to_string().starts_with("unknown field") {
                        ApiError::UnknownField(msg)
                    } else {
                        ApiError::InvalidSpec(msg)
                    }
                })?
            }
            (None, Some(t)) => {
                FileConfig::from_toml(&t).map_err(|e| ApiError::InvalidSpec(e.to_string()))?
            }
            _ => {
                return Err(ApiError::InvalidSpec(
                    "give the VM spec as `spec` (a JSON object) or `spec_toml` (a string), exactly one".into(),
                ));
            }
        };
        let summary = spec
            .check()
            .map_err(|e| ApiError::InvalidSpec(e.to_string()))?;
        if let Some(host) = host_memory()
            && summary.memory > host
        {
            return Err(ApiError::InvalidSpec(format!(
                "memory = {} bytes is more than this host's {host} bytes of RAM",
                summary.memory
            )));
        }
        let generated = match &req.owner_token {
            Some(t) if !auth::token_well_formed(t) => {
                return Err(ApiError::InvalidRequest(format!(
                    "owner_token must be {} to {} printable ASCII characters without spaces",
                    auth::MIN_TOKEN_LEN,
                    auth::MAX_TOKEN_LEN
                )));
            }
            Some(_) => None,
            None => Some(auth::random_hex(32).map_err(|e| ApiError::Internal(e.to_string()))?),
        };
        let token = req
            .owner_token
            .as_deref()
            .or(generated.as_deref())
            .unwrap_or_default();
        let owner_hash = auth::token_hash(token);
        if owner_hash == self.operator_hash {
            return Err(ApiError::InvalidRequest(
                "owner_token must not be the operator token".into(),
            ));
        }
        let id = auth::random_hex(8).map_err(|e| ApiError::Internal(e.to_string()))?;
        let rec = VmRecord {
            id: id.clone(),
            name: req.name.clone(),
            spec,
            owner_hash,
            created_ms: now_ms(),
            state: VmState::Created,
            started_ms: None,
            monitor: None,
            last_exit: None,
            reason: None,
        };
        let mut vms = self.lock();
        if vms.contains_key(&rec.name) {
            return Err(ApiError::NameTaken(rec.name));
        }
        let dir = self.vm_dir(&id);
        let io = |what: &str, e: std::io::Error| {
            ApiError::Internal(format!("cannot write {what} in {}: {e}", dir.display()))
        };
        mkdir_private(&dir).map_err(|e| io("the VM directory", e))?;
        let spec_json = serde_json::to_vec_pretty(&rec.spec).unwrap_or_default();
        if let Err(e) = std::fs::write(dir.join(SPEC_FILE), spec_json) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(io(SPEC_FILE, e));
        }
        match self.store.insert(&rec) {
            Ok(()) => {}
            Err(StoreError::NameTaken(n)) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(ApiError::NameTaken(n));
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e.into());
            }
        }
        vms.insert(
            rec.name.clone(),
            VmEntry {
                rec: rec.clone(),
                op: Arc::default(),
            },
        );
        info!(vm = %rec.name, id = %rec.id, "created");
        Ok((rec, generated))
    }

    /// Starts the VM's monitor (fresh or from a snapshot) and waits until it answers.
    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        restore: Option<RestoreFrom>,
    ) -> Result<Value, ApiError> {
        let op = self.op_lock(name)?;
        let _held = op.lock().await;
        let rec = self.get(name)?;
        if rec.state.is_live() {
            return Err(ApiError::WrongState(format!(
                "VM `{name}` is {} already",
                rec.state.name()
            )));
        }
        let dir = self.vm_dir(&rec.id);
        let restoring = restore.is_some();
        for f in [bulwark_channel::EXIT_FILE, CONTROL_SOCKET, CONSOLE_SOCKET] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let spec_json = serde_json::to_vec_pretty(&rec.spec).unwrap_or_default();
        std::fs::write(dir.join(SPEC_FILE), spec_json).map_err(|e| {
            ApiError::Internal(format!(
                "cannot write {}: {e}",
                dir.join(SPEC_FILE).display()
            ))
        })?;
        let launch = Launch {
            monitor: &self.cfg.monitor,
            no_jail: self.cfg.no_jail,
            dir: &dir,
            restore: restore.as_ref(),
        };
        let child = monitor::spawn(&launch)
            .await
            .map_err(|e| ApiError::Internal(crate::error_chain(&e)))?;
        let pid = child.id().unwrap_or(0);
        let start_time = monitor::proc_stat(pid).map(|(_, t)| t).unwrap_or(0);
        let m = MonitorProc { pid, start_time };
        let saved = self.modify(name, |r| {
            r.state = VmState::Running;
            r.monitor = Some(m);
            r.started_ms = Some(now_ms());
            r.last_exit = None;
            r.reason = None;
        });
        // Watch the child even if the record could not be saved: it must be reaped.
        self.watch_child(rec.id.clone(), m, child);
        saved?;
        info!(vm = %name, pid, "monitor started");
        let timeout = if restoring {
            RESTORE_READY_TIMEOUT
        } else {
            READY_TIMEOUT
        };
        self.wait_ready(name, &dir, m, timeout).await
    }

    async fn wait_ready(
        &self,
        name: &str,
        dir: &Path,
        m: MonitorProc,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let deadline = Instant::now() + timeout;
        let mut poll = Duration::from_micros(500);
        loop {
            if let Some(exit) = monitor::read_exit(dir)
                && exit.setup_error
            {
                // Let the watcher record the end first, so a describe right after this
                // answer shows it.
                self.wait_ended(name, m, KILL_WAIT).await;
                return Err(ApiError::Monitor {
                    monitor_code: "start_failed".into(),
                    message: exit.reason,
                });
            }
            let rec = self.get(name)?;
            if rec.monitor != Some(m) {
                // The monitor ended before it answered.
                if let Some(exit) = rec.last_exit.as_ref().filter(|e| !e.setup_error) {
                    // It ran and ended (a quick function VM): not an error.
                    let _ = exit;
                    return Ok(self.describe_json(&rec, None));
                }
                return Err(ApiError::Monitor {
                    monitor_code: "start_failed".into(),
                    message: format!(
                        "{}; monitor.log: {}",
                        rec.reason.unwrap_or_else(|| "the monitor ended".into()),
                        monitor::log_tail(dir)
                    ),
                });
            }
            if let Ok(Response::Info(info)) =
                monitor::call(&dir.join(CONTROL_SOCKET), &Request::Describe, CALL_TIMEOUT).await
            {
                return Ok(self.describe_json(&rec, Some(&info)));
            }
            if Instant::now() > deadline {
                return Err(ApiError::Internal(format!(
                    "the monitor (pid {}) did not answer on its control socket within {timeout:?}; see {}",
                    m.pid,
                    dir.join("monitor.log").display()
                )));
            }
            // Poll often at first (a function micro-VM is up in a few milliseconds), then
            // back off.
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(20));
        }
    }

    /// Awaits our child monitor and records its end.
    fn watch_child(self: &Arc<Self>, id: String, m: MonitorProc, mut child: tokio::process::Child) {
        let me = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let why = match status {
                Ok(s) => format!("the monitor ended without an exit record ({s})"),
                Err(e) => format!("the monitor could not be waited for: {e}"),
            };
            me.mark_ended(&id, Some(m), why);
        });
    }

    /// Polls a re-attached monitor (not our child) until it ends.
    fn watch_orphan(self: &Arc<Self>, id: String, m: MonitorProc) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(ORPHAN_POLL).await;
                let current = me
                    .lock()
                    .values()
                    .any(|e| e.rec.id == id && e.rec.monitor == Some(m));
                if !current {
                    return;
                }
                if !monitor::alive(&m) {
                    me.mark_ended(
                        &id,
                        Some(m),
                        "the monitor ended without an exit record".into(),
                    );
                    return;
                }
            }
        });
    }

    /// Records that monitor `m` of VM `id` ended: with its exit record if it wrote one, else
    /// failed with `why`. Does nothing if the VM has moved on to another monitor.
    fn mark_ended(&self, id: &str, m: Option<MonitorProc>, why: String) {
        let exit = monitor::read_exit(&self.vm_dir(id));
        let name = {
            let vms = self.lock();
            let Some(e) = vms.values().find(|e| e.rec.id == id) else {
                return;
            };
            if e.rec.monitor != m {
                return;
            }
            e.rec.name.clone()
        };
        let res = self.modify(&name, |r| {
            r.monitor = None;
            r.started_ms = None;
            match exit {
                Some(x) => {
                    r.state = if x.setup_error {
                        VmState::Failed
                    } else {
                        VmState::Stopped
                    };
                    r.reason = Some(x.reason.clone());
                    r.last_exit = Some(x);
                }
                None => {
                    r.state = VmState::Failed;
                    r.reason = Some(why);
                }
            }
        });
        match res {
            Ok(r) => {
                info!(vm = %name, state = r.state.name(), reason = r.reason.as_deref().unwrap_or(""), "monitor ended")
            }
            Err(e) => warn!(vm = %name, error = %e, "cannot record the monitor's end"),
        }
    }

    /// Sends a request to a live VM's monitor.
    async fn control(
        &self,
        rec: &VmRecord,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ApiError> {
        if !rec.state.is_live() {
            return Err(ApiError::WrongState(format!(
                "VM `{}` is {}, not running",
                rec.name,
                rec.state.name()
            )));
        }
        let sock = self.vm_dir(&rec.id).join(CONTROL_SOCKET);
        match monitor::call(&sock, req, timeout).await {
            Ok(Response::Error { code, message }) => Err(ApiError::from_monitor(code, message)),
            Ok(r) => Ok(r),
            Err(e) => {
                let alive = rec.monitor.as_ref().is_some_and(monitor::alive);
                Err(ApiError::MonitorGone(format!(
                    "the monitor of VM `{}` {}: {}",
                    rec.name,
                    if alive { "does not answer" } else { "is gone" },
                    crate::error_chain(&e)
                )))
            }
        }
    }

    /// Pause or resume.
    pub async fn pause_resume(&self, name: &str, pause: bool) -> Result<Value, ApiError> {
        let op = self.op_lock(name)?;
        let _held = op.lock().await;
        let rec = self.get(name)?;
        let req = if pause {
            Request::Pause
        } else {
            Request::Resume
        };
        self.control(&rec, &req, CALL_TIMEOUT).await?;
        let state = if pause {
            VmState::Paused
        } else {
            VmState::Running
        };
        let rec = self.modify(name, |r| {
            if r.state.is_live() {
                r.state = state;
            }
        })?;
        Ok(json!({ "name": name, "state": rec.state.name() }))
    }

    /// Waits until monitor `m` is recorded as ended.
    async fn wait_ended(&self, name: &str, m: MonitorProc, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.get(name) {
                Ok(r) if r.monitor == Some(m) => {}
                _ => return true,
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn kill_locked(&self, rec: &VmRecord) -> Result<(), ApiError> {
        let Some(m) = rec.monitor else {
            return Ok(());
        };
        match self.control(rec, &Request::Kill, CALL_TIMEOUT).await {
            Ok(_) => {}
            // Gone already: the watcher records it.
            Err(ApiError::MonitorGone(_)) if !monitor::alive(&m) => {}
            Err(e) => return Err(e),
        }
        if self.wait_ended(&rec.name, m, KILL_WAIT).await {
            Ok(())
        } else {
            Err(ApiError::Internal(format!(
                "the monitor (pid {}) did not exit within {KILL_WAIT:?} of a kill",
                m.pid
            )))
        }
    }

    /// Kill now.
    pub async fn kill(&self, name: &str) -> Result<Value, ApiError> {
        let op = self.op_lock(name)?;
        let _held = op.lock().await;
        let rec = self.get(name)?;
        if !rec.state.is_live() {
            return Err(ApiError::WrongState(format!(
                "VM `{name}` is {}, not running",
                rec.state.name()
            )));
        }
        self.kill_locked(&rec).await?;
        self.describe(name).await
    }

    /// Shutdown (ACPI power button), then Kill on `unsupported` or after `timeout`.
    pub async fn stop(&self, name: &str, timeout: Duration) -> Result<Value, ApiError> {
        let op = self.op_lock(name)?;
        let _held = op.lock().await;
        let rec = self.get(name)?;
        let Some(m) = rec.monitor.filter(|_| rec.state.is_live()) else {
            return Err(ApiError::WrongState(format!(
                "VM `{name}` is {}, not running",
                rec.state.name()
            )));
        };
        let mut method = "shutdown";
        match self.control(&rec, &Request::Shutdown, CALL_TIMEOUT).await {
            Ok(_) => {
                if !self.wait_ended(name, m, timeout).await {
                    method = "kill after timeout";
                    self.kill_locked(&self.get(name)?).await?;
                }
            }
            Err(ApiError::Monitor { monitor_code, .. })
                if monitor_code == bulwark_channel::error_code::UNSUPPORTED =>
            {
                method = "kill (no power button)";
                self.kill_locked(&rec).await?;
            }
            // A paused guest cannot see the button: the forced path.
            Err(ApiError::Monitor { monitor_code, .. })
                if monitor_code == bulwark_channel::error_code::WRONG_STATE =>
            {
                method = "kill (paused)";
                self.kill_locked(&rec).await?;
            }
            Err(e) => return Err(e),
        }
        let mut out = self.describe(name).await?;
        out["stopped_by"] = json!(method);
        Ok(out)
    }

    /// Removes a VM; a live one only with `force` (killed first).
    pub async fn delete(&self, name: &str, force: bool) -> Result<Value, ApiError> {
        let op = self.op_lock(name)?;
        let _held = op.lock().await;
        let rec = self.get(name)?;
        if rec.state.is_live() {
            if !force {
                return Err(ApiError::WrongState(format!(
                    "VM `{name}` is {}; stop it first or delete with ?force=true",
                    rec.state.name()
                )));
            }
            self.kill_locked(&rec).await?;
        }
        let rec = self.get(name)?;
        self.store.remove(&rec)?;
        self.lock().remove(name);
        let dir = self.vm_dir(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(vm = %name, error = %e, dir = %dir.display(), "cannot remove the VM directory");
        }
        info!(vm = %name, "deleted");
        Ok(json!({ "name": name, "deleted": true }))
    }

    /// A record and, if live, the monitor's own report.
    pub async fn describe(&self, name: &str) -> Result<Value, ApiError> {
        let rec = self.get(name)?;
        let mut live_error = None;
        let live = if rec.state.is_live() {
            match self.control(&rec, &Request::Describe, CALL_TIMEOUT).await {
                Ok(Response::Info(i)) => Some(i),
                Ok(_) => None,
                Err(e) => {
                    live_error = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        let mut out = self.describe_json(&rec, live.as_ref());
        if let Some(e) = live_error {
            out["live_error"] = json!(e);
        }
        Ok(out)
    }

    /// The describe document.
    pub fn describe_json(&self, rec: &VmRecord, live: Option<&VmInfo>) -> Value {
        let summary = rec.spec.check().ok();
        let state = match live.map(|i| i.state) {
            Some(bulwark_channel::RunState::Paused) => "paused",
            Some(_) => "running",
            None => rec.state.name(),
        };
        let uptime_ms = live
            .map(|i| i.uptime_ms)
            .or_else(|| rec.started_ms.map(|s| now_ms().saturating_sub(s)));
        json!({
            "id": rec.id,
            "name": rec.name,
            "state": state,
            "kind": summary.map(|s| if s.kind == bulwark_spec::VmKind::Function { "function" } else { "linux" }),
            "vcpus": summary.map(|s| s.vcpus),
            "memory": summary.map(|s| s.memory),
            "created_ms": rec.created_ms,
            "started_ms": rec.started_ms,
            "uptime_ms": uptime_ms,
            "monitor": rec.monitor,
            "reason": rec.reason,
            "last_exit": rec.last_exit,
            "spec": rec.spec,
            "live": live,
        })
    }

    /// Every VM, briefly.
    pub fn list(&self) -> Value {
        let vms = self.lock();
        let list: Vec<Value> = vms
            .values()
            .map(|e| {
                let d = self.describe_json(&e.rec, None);
                json!({
                    "name": d["name"], "id": d["id"], "state": d["state"], "kind": d["kind"],
                    "vcpus": d["vcpus"], "memory": d["memory"], "uptime_ms": d["uptime_ms"],
                })
            })
            .collect();
        json!({ "vms": list })
    }

    /// Records of all VMs with the live report of the running ones (for /metrics).
    pub async fn snapshot_all(&self) -> Vec<(VmRecord, Option<VmInfo>)> {
        let recs: Vec<VmRecord> = self.lock().values().map(|e| e.rec.clone()).collect();
        let mut out = Vec::with_capacity(recs.len());
        for rec in recs {
            let live = if rec.state.is_live() {
                match self
                    .control(&rec, &Request::Describe, Duration::from_secs(1))
                    .await
                {
                    Ok(Response::Info(i)) => Some(i),
                    _ => None,
                }
            } else {
                None
            };
            out.push((rec, live));
        }
        out
    }

    /// The guest agent's socket of a live VM.
    fn agent_socket(&self, name: &str) -> Result<PathBuf, ApiError> {
        let rec = self.get(name)?;
        let Some(v) = &rec.spec.vsock else {
            return Err(ApiError::NoAgent(format!(
                "VM `{name}` has no vsock device in its spec, so it has no guest agent; add `vsock = {{ socket = \"/abs/path\" }}`"
            )));
        };
        if !rec.state.is_live() {
            return Err(ApiError::WrongState(format!(
                "VM `{name}` is {}, not running",
                rec.state.name()
            )));
        }
        Ok(v.socket.clone())
    }

    fn agent_error(e: bulwark_agent::ClientError) -> ApiError {
        let msg = bulwark_agent::error_chain(&e);
        match e {
            bulwark_agent::ClientError::Connect { .. }
            | bulwark_agent::ClientError::HandshakeClosed { .. }
            | bulwark_agent::ClientError::HandshakeRejected { .. }
            | bulwark_agent::ClientError::HandshakeIo { .. } => ApiError::NoAgent(msg),
            _ => ApiError::Agent(msg),
        }
    }

    /// Runs a command in the guest through its agent.
    pub async fn exec(&self, name: &str, body: ExecBody) -> Result<Value, ApiError> {
        if body.argv.is_empty() {
            return Err(ApiError::InvalidRequest("argv must not be empty".into()));
        }
        let sock = self.agent_socket(name)?;
        let res = tokio::task::spawn_blocking(move || {
            let mut s = bulwark_agent::client::connect_vsock_uds(&sock, AGENT_PORT)?;
            let argv: Vec<&str> = body.argv.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> = body
                .env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let timeout =
                (body.timeout_ms > 0).then(|| Duration::from_millis(body.timeout_ms.into()));
            bulwark_agent::client::exec(&mut s, &argv, &env, body.stdin.as_bytes(), timeout)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("exec task failed: {e}")))?
        .map_err(Self::agent_error)?;
        Ok(json!({
            "status": res.status,
            "stdout": String::from_utf8_lossy(&res.stdout),
            "stderr": String::from_utf8_lossy(&res.stderr),
            "truncated": res.truncated,
        }))
    }

    /// Lists the guest's processes through its agent.
    pub async fn ps(&self, name: &str) -> Result<Value, ApiError> {
        let sock = self.agent_socket(name)?;
        let procs = tokio::task::spawn_blocking(move || {
            let mut s = bulwark_agent::client::connect_vsock_uds(&sock, AGENT_PORT)?;
            bulwark_agent::client::ps(&mut s)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("ps task failed: {e}")))?
        .map_err(Self::agent_error)?;
        let list: Vec<Value> = procs
            .iter()
            .map(|p| {
                json!({ "pid": p.pid, "ppid": p.ppid, "uid": p.uid, "comm": p.comm,
                        "state": char::from(p.state).to_string() })
            })
            .collect();
        Ok(json!({ "procs": list }))
    }

    /// Reads the guest kernel from outside (the monitor refuses unless the VM's spec allows
    /// it). The answer goes to the owner; the daemon keeps nothing of it.
    pub async fn introspect(
        &self,
        name: &str,
        view: bulwark_channel::IntrospectView,
        symbol: Option<String>,
    ) -> Result<Value, ApiError> {
        let rec = self.get(name)?;
        match self
            .control(
                &rec,
                &Request::Introspect { view, symbol },
                INTROSPECT_TIMEOUT,
            )
            .await?
        {
            Response::Introspection(r) => Ok(json!(r)),
            other => Err(ApiError::Internal(format!(
                "the monitor answered an introspection with {other:?}"
            ))),
        }
    }

    /// The guest agent's processes against the kernel's task list read from outside, in
    /// [`CROSSVIEW_ROUNDS`] rounds (see [`crate::crossview`]).
    pub async fn crossview(&self, name: &str) -> Result<Value, ApiError> {
        let sock = self.agent_socket(name)?;
        let agent_ps = || {
            let sock = sock.clone();
            async move {
                tokio::task::spawn_blocking(move || {
                    let mut s = bulwark_agent::client::connect_vsock_uds(&sock, AGENT_PORT)?;
                    bulwark_agent::client::ps(&mut s)
                })
                .await
                .map_err(|e| ApiError::Internal(format!("ps task failed: {e}")))?
                .map_err(Self::agent_error)
            }
        };
        let mut lists = vec![agent_ps().await?];
        let mut kernel = Vec::new();
        let mut partial = None;
        for _ in 0..CROSSVIEW_ROUNDS {
            let rec = self.get(name)?;
            let r = match self
                .control(
                    &rec,
                    &Request::Introspect {
                        view: bulwark_channel::IntrospectView::Processes,
                        symbol: None,
                    },
                    INTROSPECT_TIMEOUT,
                )
                .await?
            {
                Response::Introspection(r) => r,
                other => {
                    return Err(ApiError::Internal(format!(
                        "the monitor answered an introspection with {other:?}"
                    )));
                }
            };
            partial = partial.or(r.partial);
            kernel.push(r.processes);
            lists.push(agent_ps().await?);
        }
        let rounds: Vec<crate::crossview::Round<'_>> = kernel
            .iter()
            .enumerate()
            .map(|(i, k)| crate::crossview::Round {
                before: &lists[i],
                kernel: k,
                after: &lists[i + 1],
            })
            .collect();
        let mut v = json!(crate::crossview::compare(&rounds));
        if let Some(p) = partial {
            v["partial"] = json!(p);
        }
        Ok(v)
    }

    fn snapshot_path(&self, rec: &VmRecord, snap: &str) -> PathBuf {
        self.vm_dir(&rec.id)
            .join("snapshots")
            .join(format!("{snap}.bwsnap"))
    }

    /// Asks the monitor to write an encrypted snapshot.
    pub async fn snapshot(
        &self,
        name: &str,
        key: &str,
        snap: Option<String>,
    ) -> Result<Value, ApiError> {
        if !valid_key(key) {
            return Err(ApiError::InvalidRequest(
                "key must be 64 hex digits (256 bits)".into(),
            ));
        }
        let snap = snap.unwrap_or_else(|| format!("snap-{}", now_ms()));
        if !valid_name(&snap) {
            return Err(ApiError::InvalidName(format!(
                "bad snapshot name `{}`: use 1 to 63 of a-z, 0-9 and '-'",
                snap.chars().take(80).collect::<String>()
            )));
        }
        let rec = self.get(name)?;
        let path = self.snapshot_path(&rec, &snap);
        if let Some(parent) = path.parent() {
            mkdir_private(parent).map_err(|e| {
                ApiError::Internal(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let req = Request::Snapshot {
            path: path.display().to_string(),
            key: key.to_string(),
            leave_paused: false,
        };
        match self.control(&rec, &req, SNAPSHOT_TIMEOUT).await? {
            Response::Snapshot { bytes, paused_ms } => {
                Ok(json!({ "name": snap, "bytes": bytes, "paused_ms": paused_ms }))
            }
            other => Err(ApiError::Monitor {
                monitor_code: "unexpected".into(),
                message: format!("the monitor answered a snapshot with {other:?}"),
            }),
        }
    }

    /// Starts a stopped VM again from one of its snapshots.
    pub async fn restore(
        self: &Arc<Self>,
        name: &str,
        snap: &str,
        key: &str,
        lazy: bool,
    ) -> Result<Value, ApiError> {
        if !valid_key(key) {
            return Err(ApiError::InvalidRequest(
                "key must be 64 hex digits (256 bits)".into(),
            ));
        }
        if !valid_name(snap) {
            return Err(ApiError::InvalidName(format!(
                "bad snapshot name `{}`",
                snap.chars().take(80).collect::<String>()
            )));
        }
        let rec = self.get(name)?;
        let path = self.snapshot_path(&rec, snap);
        if !path.is_file() {
            return Err(ApiError::NotFound(format!(
                "VM `{name}` has no snapshot `{snap}`"
            )));
        }
        self.start(
            name,
            Some(RestoreFrom {
                path,
                key: key.to_string(),
                lazy,
            }),
        )
        .await
    }

    /// The console socket of a live VM.
    pub fn console_socket(&self, name: &str) -> Result<PathBuf, ApiError> {
        let rec = self.get(name)?;
        if !rec.state.is_live() {
            return Err(ApiError::WrongState(format!(
                "VM `{name}` is {}, not running",
                rec.state.name()
            )));
        }
        Ok(self.vm_dir(&rec.id).join(CONSOLE_SOCKET))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_are_checked() {
        for good in ["a", "web-1", "0x", &"a".repeat(63)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
        assert!(valid_key(&"aB".repeat(32)));
        assert!(!valid_key(&"g".repeat(64)));
        assert!(!valid_key("00"));
    }
}
