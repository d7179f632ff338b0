//! `bulwark vm ...`: the client of bulwarkd's REST API (runs in bulwark-tools, so the HTTP
//! stack never maps into the monitor binary).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use bulwark_control::client::{ApiClient, ClientError};
use bulwark_spec::FileConfig;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Default API socket.
const DEFAULT_SOCKET: &str = "/var/lib/bulwark/bulwarkd.sock";

#[derive(Args, Debug)]
pub(crate) struct VmArgs {
    /// bulwarkd's socket [env BULWARK_SOCKET; default /var/lib/bulwark/bulwarkd.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// API token: the operator's or the VM owner's [env BULWARK_TOKEN].
    #[arg(long, global = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the API token (such as STATE_DIR/operator.token).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: VmCommand,
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Record a new VM from a config file or a payload.
    Create {
        name: String,
        /// The VM spec, as for `bulwark run --config` (relative paths are resolved).
        #[arg(long, conflicts_with = "payload")]
        config: Option<PathBuf>,
        /// A function micro-VM's payload.
        #[arg(long)]
        payload: Option<PathBuf>,
        /// Guest memory (with --payload): 16M, 1G.
        #[arg(long)]
        memory: Option<String>,
        /// vCPUs (with --payload).
        #[arg(long)]
        vcpus: Option<u32>,
        /// The payload's argument string (with --payload).
        #[arg(long)]
        arg: Option<String>,
        /// The owner's token; one is generated and printed once if absent.
        #[arg(long)]
        owner_token: Option<String>,
    },
    /// Start a VM's monitor.
    Start { name: String },
    /// Pause a running VM.
    Pause { name: String },
    /// Resume a paused VM.
    Resume { name: String },
    /// Power button, then kill after the timeout.
    Stop {
        name: String,
        /// How long the guest gets to power off: 30s, 500ms.
        #[arg(long, value_parser = bulwark_spec::parse_duration)]
        timeout: Option<Duration>,
    },
    /// End a VM now.
    Kill { name: String },
    /// Remove a VM (with --force even while it runs).
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// List VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Describe {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Attach to a VM's console (Ctrl-A d detaches on a terminal).
    Console { name: String },
    /// Run a command in a Linux guest through its agent; exits with the command's status.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// List a Linux guest's processes.
    Ps { name: String },
    /// Read a Linux guest's kernel from outside (introspection): `vmi ps NAME` lists the
    /// kernel's tasks, `vmi modules NAME` its loaded modules. The VM's spec must set
    /// `introspection = true`; the guest pauses while it is read.
    Vmi {
        #[arg(value_enum)]
        view: VmiView,
        name: String,
        #[arg(long)]
        json: bool,
        /// With protect: a write to kernel text or rodata is dropped and the VM paused before
        /// it lands (without: it is recorded, then performed).
        #[arg(long)]
        pause: bool,
        /// With trace: the kernel function to stop at [default: the exec path, bprm_execve];
        /// with untrace: the one to take out [default: all].
        #[arg(long)]
        symbol: Option<String>,
    },
    /// Write an encrypted snapshot of a running VM.
    Snapshot {
        name: String,
        /// File with the owner's key (64 hex digits).
        #[arg(long)]
        key_file: PathBuf,
        /// Snapshot name [default: snap-<time>].
        #[arg(long = "name")]
        snapshot: Option<String>,
    },
    /// Start a stopped VM from one of its snapshots.
    Restore {
        name: String,
        #[arg(long)]
        snapshot: String,
        #[arg(long)]
        key_file: PathBuf,
        /// Resume at once and restore memory as the guest touches it (a tampered memory
        /// block then stops the VM when it is needed, instead of refusing the restore).
        #[arg(long)]
        lazy: bool,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum VmiView {
    /// The guest kernel's task list.
    Ps,
    /// The guest kernel's module list.
    Modules,
    /// Cross-view: the guest agent's processes against the kernel's task list; exits 1 when
    /// a process is hidden from either.
    Xview,
    /// Measure the guest kernel (text, rodata, system call table, IDT, GDT, MSRs, CR0/CR4
    /// protections) as the integrity baseline; take it once the guest is up.
    Baseline,
    /// Measure again and list every difference from the baseline and every module hidden from
    /// the module list; exits 1 when there is one.
    Check,
    /// Guard kernel text and rodata: every guest write there exits to the monitor and is
    /// recorded with its writer (see --pause).
    Protect,
    /// The writes protect trapped; exits 1 when there is one.
    Traps,
    /// Put a breakpoint on a kernel function (KVM guest debug; see --symbol): every call is
    /// recorded with its process and, for exec, the file name. Up to four at once.
    Trace,
    /// Take a breakpoint out (--symbol), or all of them.
    Untrace,
    /// The calls the breakpoint recorded.
    Hits,
}

/// Text from the guest with its control characters escaped (quotes stay as they are).
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A task's `__state` as `ps` shows it.
fn task_state(state: u64) -> char {
    const TASK_NOLOAD: u64 = 0x400;
    match state {
        0 => 'R',
        s if s & 0x20 != 0 => 'Z',
        s if s & 0x10 != 0 => 'X',
        s if s & 0x8 != 0 => 't',
        s if s & 0x4 != 0 => 'T',
        s if s & 0x2 != 0 && s & TASK_NOLOAD != 0 => 'I',
        s if s & 0x2 != 0 => 'D',
        _ => 'S',
    }
}

/// Prints an introspection's answer as a table; a partial one ends with why.
fn print_introspection(view: VmiView, v: &Value) {
    match view {
        VmiView::Xview => {}
        VmiView::Trace | VmiView::Untrace | VmiView::Hits => {
            let t = &v["tracing"];
            let points = t["breakpoints"].as_array().cloned().unwrap_or_default();
            for b in &points {
                println!(
                    "breakpoint on {} at {:#x}",
                    s(&b["symbol"]),
                    b["address"].as_u64().unwrap_or(0)
                );
            }
            println!(
                "{}{} calls recorded; {} other debug exits{}",
                if points.is_empty() {
                    "no breakpoint; "
                } else {
                    ""
                },
                s(&t["hits"]),
                s(&t["other_exits"]),
                t["last_other"]
                    .as_str()
                    .map(|l| format!(" (last: {l})"))
                    .unwrap_or_default()
            );
            for h in v["hits"].as_array().into_iter().flatten() {
                println!(
                    "CALL vCPU {} pid {} ({}) {}: {}  {} ms ago",
                    s(&h["vcpu"]),
                    s(&h["pid"]),
                    printable(&s(&h["comm"])),
                    s(&h["symbol"]),
                    printable(&s(&h["detail"])),
                    s(&h["ago_ms"])
                );
            }
        }
        VmiView::Protect | VmiView::Traps => {
            let p = &v["protection"];
            let ranges: Vec<String> = (p["ranges"].as_array().into_iter().flatten())
                .map(|r| {
                    let at = |i: usize| r[i].as_u64().unwrap_or(0);
                    format!("{:#x}..{:#x}", at(0), at(1))
                })
                .collect();
            println!(
                "kernel text and rodata {}: {}; {} writes trapped",
                ranges.join(", "),
                match (p["armed"].as_bool(), p["pause"].as_bool()) {
                    (Some(true), Some(true)) => "guarded, a write pauses the VM before it lands",
                    (Some(true), _) => "guarded, writes are recorded and then land",
                    _ => "not guarded",
                },
                s(&p["writes"])
            );
            for t in v["traps"].as_array().into_iter().flatten() {
                println!(
                    "WRITE vCPU {} to {:#x} ({}) by {}: {} [{}] {} ms ago",
                    s(&t["vcpu"]),
                    t["address"].as_u64().unwrap_or(0),
                    printable(&s(&t["target"])),
                    printable(&s(&t["writer"])),
                    s(&t["bytes"]),
                    if t["landed"].as_bool() == Some(true) {
                        "landed"
                    } else {
                        "dropped, VM paused"
                    },
                    s(&t["ago_ms"])
                );
            }
        }
        VmiView::Baseline | VmiView::Check => {
            let m = &v["measured"];
            println!(
                "measured {} KiB of kernel text and rodata, {} system calls, {} vCPUs in {:.1} ms (guest paused {:.1} ms)",
                m["bytes"].as_u64().unwrap_or(0) >> 10,
                s(&m["syscalls"]),
                s(&m["vcpus"]),
                m["measure_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                v["paused_us"].as_u64().unwrap_or(0) as f64 / 1e3,
            );
            let findings = v["findings"].as_array().map_or(&[][..], |f| f.as_slice());
            if matches!(view, VmiView::Check) {
                if findings.is_empty() {
                    println!("no differences from the baseline");
                }
                for f in findings {
                    println!("ALERT {}: {}", s(&f["kind"]), printable(&s(&f["detail"])));
                }
            }
        }
        VmiView::Ps => {
            println!(
                "{:>7} {:>7} {:>6} S {:>10} COMMAND",
                "PID", "PPID", "UID", "START"
            );
            for p in v["processes"].as_array().into_iter().flatten() {
                let comm = s(&p["comm"]).escape_debug().to_string();
                let start = p["start_time_ns"].as_u64().unwrap_or(0);
                println!(
                    "{:>7} {:>7} {:>6} {} {:>9.2}s {}",
                    s(&p["pid"]),
                    s(&p["ppid"]),
                    s(&p["uid"]),
                    task_state(p["state"].as_u64().unwrap_or(0)),
                    start as f64 / 1e9,
                    if p["kernel_thread"].as_bool() == Some(true) {
                        format!("[{comm}]")
                    } else {
                        comm
                    }
                );
            }
        }
        VmiView::Modules => {
            println!(
                "{:<34} {:<8} {:>18} {:>8}",
                "MODULE", "STATE", "BASE", "SIZE"
            );
            for m in v["modules"].as_array().into_iter().flatten() {
                println!(
                    "{:<34} {:<8} {:>#18x} {:>8}",
                    s(&m["name"]).escape_debug().to_string(),
                    s(&m["state"]),
                    m["base"].as_u64().unwrap_or(0),
                    s(&m["size"])
                );
            }
        }
    }
    if let Some(why) = v["partial"].as_str() {
        println!("(partial: {})", why.escape_debug());
    }
}

#[derive(Debug, thiserror::Error)]
enum VmCliError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn read_trimmed(path: &Path) -> Result<String, VmCliError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| VmCliError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn token(args: &VmArgs) -> Result<Option<String>, VmCliError> {
    if let Some(t) = &args.token {
        return Ok(Some(t.clone()));
    }
    if let Some(f) = &args.token_file {
        return read_trimmed(f).map(Some);
    }
    Ok(std::env::var("BULWARK_TOKEN")
        .ok()
        .filter(|t| !t.is_empty()))
}

fn absolute(p: &Path) -> Result<PathBuf, VmCliError> {
    std::path::absolute(p).map_err(|source| VmCliError::Read {
        path: p.to_path_buf(),
        source,
    })
}

fn create_body(cmd: &VmCommand) -> Result<Value, VmCliError> {
    let VmCommand::Create {
        name,
        config,
        payload,
        memory,
        vcpus,
        arg,
        owner_token,
    } = cmd
    else {
        return Err(VmCliError::Usage("not a create command".into()));
    };
    let spec = match (config, payload) {
        (Some(c), None) => {
            FileConfig::load(&absolute(c)?).map_err(|e| VmCliError::Usage(e.to_string()))?
        }
        (None, Some(p)) => FileConfig {
            payload: Some(absolute(p)?),
            memory: memory.clone(),
            vcpus: *vcpus,
            arg: arg.clone(),
            ..FileConfig::default()
        },
        _ => {
            return Err(VmCliError::Usage(
                "give --config FILE.toml or --payload FILE".into(),
            ));
        }
    };
    let mut body = json!({ "name": name, "spec": spec });
    if let Some(t) = owner_token {
        body["owner_token"] = json!(t);
    }
    Ok(body)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn fmt_bytes(v: &Value) -> String {
    v.as_u64()
        .map(|b| format!("{}M", b >> 20))
        .unwrap_or_else(|| "-".into())
}

fn fmt_uptime(v: &Value) -> String {
    v.as_u64()
        .map(|ms| format!("{}s", ms / 1000))
        .unwrap_or_else(|| "-".into())
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

async fn run(args: VmArgs) -> Result<ExitCode, VmCliError> {
    let socket = args
        .socket
        .clone()
        .or_else(|| std::env::var_os("BULWARK_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let client = ApiClient::new(&socket, token(&args)?);
    let vm = |n: &str, rest: &str| format!("/v1/vms/{n}{rest}");
    match &args.command {
        c @ VmCommand::Create { name, .. } => {
            let v = client
                .call("POST", "/v1/vms", Some(&create_body(c)?))
                .await?;
            println!("created {name} (id {})", s(&v["id"]));
            if let Some(t) = v["owner_token"].as_str() {
                println!("owner token (shown once, keep it): {t}");
            }
        }
        VmCommand::Start { name } => {
            let v = client.call("POST", &vm(name, "/start"), None).await?;
            println!("{name}: {}", s(&v["state"]));
        }
        VmCommand::Pause { name } | VmCommand::Resume { name } => {
            let action = if matches!(args.command, VmCommand::Pause { .. }) {
                "/pause"
            } else {
                "/resume"
            };
            let v = client.call("POST", &vm(name, action), None).await?;
            println!("{name}: {}", s(&v["state"]));
        }
        VmCommand::Stop { name, timeout } => {
            let body = timeout.map(|t| json!({ "timeout_ms": t.as_millis() as u64 }));
            let v = client
                .call("POST", &vm(name, "/stop"), body.as_ref())
                .await?;
            println!(
                "{name}: {} ({}; {})",
                s(&v["state"]),
                s(&v["stopped_by"]),
                s(&v["reason"])
            );
        }
        VmCommand::Kill { name } => {
            let v = client.call("POST", &vm(name, "/kill"), None).await?;
            println!("{name}: {} ({})", s(&v["state"]), s(&v["reason"]));
        }
        VmCommand::Delete { name, force } => {
            let q = if *force { "?force=true" } else { "" };
            client.call("DELETE", &vm(name, q), None).await?;
            println!("{name}: deleted");
        }
        VmCommand::List { json } => {
            let v = client.call("GET", "/v1/vms", None).await?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "{:<24} {:<9} {:<9} {:>5} {:>8} {:>8}",
                    "NAME", "STATE", "KIND", "VCPUS", "MEMORY", "UPTIME"
                );
                for x in v["vms"].as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<9} {:<9} {:>5} {:>8} {:>8}",
                        s(&x["name"]),
                        s(&x["state"]),
                        s(&x["kind"]),
                        s(&x["vcpus"]),
                        fmt_bytes(&x["memory"]),
                        fmt_uptime(&x["uptime_ms"])
                    );
                }
            }
        }
        VmCommand::Describe { name, json } => {
            let v = client.call("GET", &vm(name, ""), None).await?;
            if *json {
                print_json(&v);
            } else {
                for (k, val) in [
                    ("name", s(&v["name"])),
                    ("id", s(&v["id"])),
                    ("state", s(&v["state"])),
                    ("kind", s(&v["kind"])),
                    ("vcpus", s(&v["vcpus"])),
                    ("memory", fmt_bytes(&v["memory"])),
                    ("uptime", fmt_uptime(&v["uptime_ms"])),
                    ("monitor pid", s(&v["monitor"]["pid"])),
                    ("reason", s(&v["reason"])),
                ] {
                    println!("{k:<12} {val}");
                }
            }
        }
        VmCommand::Console { name } => return console(&client, name).await,
        VmCommand::Exec { name, command } => {
            let v = client
                .call(
                    "POST",
                    &vm(name, "/exec"),
                    Some(&json!({ "argv": command })),
                )
                .await?;
            print!("{}", v["stdout"].as_str().unwrap_or(""));
            eprint!("{}", v["stderr"].as_str().unwrap_or(""));
            let _ = std::io::stdout().flush();
            let status = v["status"].as_i64().unwrap_or(1);
            return Ok(ExitCode::from(status.clamp(0, 255) as u8));
        }
        VmCommand::Ps { name } => {
            let v = client.call("GET", &vm(name, "/ps"), None).await?;
            println!("{:>7} {:>7} {:>6} S COMMAND", "PID", "PPID", "UID");
            for p in v["procs"].as_array().into_iter().flatten() {
                println!(
                    "{:>7} {:>7} {:>6} {} {}",
                    s(&p["pid"]),
                    s(&p["ppid"]),
                    s(&p["uid"]),
                    s(&p["state"]),
                    s(&p["comm"]).escape_debug()
                );
            }
        }
        VmCommand::Vmi {
            view: VmiView::Xview,
            name,
            json,
            ..
        } => {
            let v = client.call("GET", &vm(name, "/crossview"), None).await?;
            let flagged: Vec<&Value> = ["missing_from_task_list", "hidden_from_agent"]
                .iter()
                .flat_map(|k| v[*k].as_array().into_iter().flatten())
                .collect();
            if *json {
                print_json(&v);
            } else {
                println!(
                    "agent sees {} processes, the kernel's task list {}",
                    s(&v["agent"]),
                    s(&v["introspected"])
                );
                for f in &flagged {
                    println!(
                        "HIDDEN pid {} {}: only the {} sees it",
                        s(&f["pid"]),
                        s(&f["comm"]).escape_debug(),
                        s(&f["seen_by"])
                    );
                }
                if let Some(why) = v["partial"].as_str() {
                    println!("(partial: {})", why.escape_debug());
                }
            }
            if !flagged.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        VmCommand::Vmi {
            view,
            name,
            json,
            pause,
            symbol,
        } => {
            let wire = match view {
                VmiView::Ps => "processes",
                VmiView::Modules | VmiView::Xview => "modules",
                VmiView::Baseline => "baseline",
                VmiView::Check => "check",
                VmiView::Protect if *pause => "protect_pause",
                VmiView::Protect => "protect",
                VmiView::Traps => "traps",
                VmiView::Trace => "trace",
                VmiView::Untrace => "untrace",
                VmiView::Hits => "hits",
            };
            let mut body = json!({ "view": wire });
            if let (VmiView::Trace | VmiView::Untrace, Some(s)) = (view, symbol) {
                body["symbol"] = json!(s);
            }
            let v = client
                .call("POST", &vm(name, "/introspect"), Some(&body))
                .await?;
            if *json {
                print_json(&v);
            } else {
                print_introspection(*view, &v);
            }
            let any = |k: &str| v[k].as_array().is_some_and(|f| !f.is_empty());
            if (matches!(view, VmiView::Check) && any("findings"))
                || (matches!(view, VmiView::Traps) && any("traps"))
            {
                return Ok(ExitCode::from(1));
            }
        }
        VmCommand::Snapshot {
            name,
            key_file,
            snapshot,
        } => {
            let mut body = json!({ "key": read_trimmed(key_file)? });
            if let Some(sn) = snapshot {
                body["name"] = json!(sn);
            }
            let v = with_progress(
                &client,
                name,
                client.call("POST", &vm(name, "/snapshot"), Some(&body)),
            )
            .await?;
            println!(
                "{name}: snapshot {} written ({} bytes, paused {} ms)",
                s(&v["name"]),
                s(&v["bytes"]),
                s(&v["paused_ms"])
            );
        }
        VmCommand::Restore {
            name,
            snapshot,
            key_file,
            lazy,
        } => {
            let body =
                json!({ "snapshot": snapshot, "key": read_trimmed(key_file)?, "lazy": lazy });
            let v = with_progress(
                &client,
                name,
                client.call("POST", &vm(name, "/restore"), Some(&body)),
            )
            .await?;
            println!("{name}: {}", s(&v["state"]));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Awaits a snapshot or restore request while drawing its progress on stderr (when stderr is a
/// terminal) from `GET /v1/vms/{name}/progress`.
async fn with_progress<T>(
    client: &ApiClient,
    name: &str,
    request: impl std::future::Future<Output = T>,
) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return request.await;
    }
    tokio::pin!(request);
    let started = std::time::Instant::now();
    let mut drawn = false;
    loop {
        tokio::select! {
            out = &mut request => {
                if drawn {
                    eprint!("\r\x1b[2K");
                }
                return out;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {
                let path = format!("/v1/vms/{name}/progress");
                let Ok(p) = client.call("GET", &path, None).await else {
                    continue;
                };
                let (Some(op), Some(done), Some(total)) =
                    (p["operation"].as_str(), p["done"].as_u64(), p["total"].as_u64())
                else {
                    continue;
                };
                eprint!("\r\x1b[2K{}", progress_bar(op, done, total, started.elapsed()));
                drawn = true;
            }
        }
    }
}

/// `snapshot [#########...........]  45%  460/1024 MiB  2.1 s`
fn progress_bar(op: &str, done: u64, total: u64, elapsed: std::time::Duration) -> String {
    const WIDTH: u64 = 30;
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH);
    format!(
        "{op} [{}{}] {:>3.0}% {}/{} MiB {:.1} s",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        frac * 100.0,
        done >> 20,
        total >> 20,
        elapsed.as_secs_f64()
    )
}

/// Splices stdin/stdout with the console until the connection ends (or Ctrl-A d on a
/// terminal). At the end of stdin the sending half closes and output is read to the end.
async fn console(client: &ApiClient, name: &str) -> Result<ExitCode, VmCliError> {
    let conn = client.console(name).await?;
    let raw = bulwark_monitor::tty::RawTerminal::enable_if_tty()
        .ok()
        .flatten();
    let tty = raw.is_some();
    if tty {
        eprint!("[bulwark: attached to {name}; Ctrl-A d detaches]\r\n");
    }
    let (mut rd, mut wr) = tokio::io::split(conn);
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut filter = bulwark_monitor::tty::EscapeFilter::new(b'd');
    let mut inbuf = vec![0u8; 4096];
    let mut outbuf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            n = stdin.read(&mut inbuf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let _ = wr.shutdown().await;
                }
                Ok(n) => {
                    let (data, detach) = if tty { filter.filter(&inbuf[..n]) } else { (inbuf[..n].to_vec(), false) };
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                    if detach {
                        break;
                    }
                }
            },
            n = rd.read(&mut outbuf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if stdout.write_all(&outbuf[..n]).await.is_err() {
                        break;
                    }
                    let _ = stdout.flush().await;
                }
            },
        }
    }
    drop(raw);
    if tty {
        eprintln!("\n[bulwark: detached from {name}]");
    }
    Ok(ExitCode::SUCCESS)
}

/// `bulwark vm ...`.
pub(crate) fn vm(args: VmArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwark vm: cannot start the runtime: {e}");
            return ExitCode::from(125);
        }
    };
    let code = match rt.block_on(run(args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulwark vm: {e}");
            ExitCode::FAILURE
        }
    };
    // The stdin reader may sit in a blocking read; do not wait for it.
    rt.shutdown_background();
    code
}

#[cfg(test)]
mod tests {
    use super::progress_bar;
    use std::time::Duration;

    #[test]
    fn progress_bar_fills_in_proportion_and_never_overflows() {
        let t = Duration::from_millis(2100);
        assert_eq!(
            progress_bar("snapshot", 0, 1 << 30, t),
            format!("snapshot [{}]   0% 0/1024 MiB 2.1 s", ".".repeat(30))
        );
        assert_eq!(
            progress_bar("restore", 460 << 20, 1 << 30, t),
            format!(
                "restore [{}{}]  45% 460/1024 MiB 2.1 s",
                "#".repeat(13),
                ".".repeat(17)
            )
        );
        let full = format!("restore [{}] 100% 1024/1024 MiB 2.1 s", "#".repeat(30));
        assert_eq!(progress_bar("restore", 1 << 30, 1 << 30, t), full);
        // A report past its total (or of nothing) is drawn full, not past the bar.
        assert_eq!(
            progress_bar("restore", 2 << 30, 1 << 30, t),
            full.replace("1024/1024", "2048/1024")
        );
        assert!(progress_bar("snapshot", 0, 0, t).contains(&"#".repeat(30)));
    }
}
