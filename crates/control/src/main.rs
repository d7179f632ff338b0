//! `bulwarkd`: the control-plane daemon. See `docs/api.md`.
#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bulwark_control::daemon::{Config, Daemon};
use clap::Parser;
use tracing::info;

#[derive(Parser, Debug)]
#[command(
    name = "bulwarkd",
    version,
    about = "bulwark control-plane daemon: REST API on a unix socket"
)]
struct Args {
    /// State directory (created 0700): VM records, VM directories, the operator token.
    #[arg(long, default_value = bulwark_control::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// API socket [default: STATE_DIR/bulwarkd.sock]; created mode 0600, a stale one replaced.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The `bulwark` executable that runs monitors [default: `bulwark` beside bulwarkd].
    #[arg(long)]
    monitor: Option<PathBuf>,
    /// Start monitors without their jail (less safe: for debugging only).
    #[arg(long)]
    no_jail: bool,
}

fn init_logging() {
    let level = std::env::var("BULWARK_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

async fn run(args: Args) -> anyhow::Result<()> {
    let monitor = match args.monitor {
        Some(m) => m,
        None => std::env::current_exe()
            .context("cannot find bulwarkd's own path to locate `bulwark`")?
            .with_file_name("bulwark"),
    };
    if !monitor.is_file() {
        anyhow::bail!(
            "the monitor executable {} does not exist; install `bulwark` beside bulwarkd or pass --monitor",
            monitor.display()
        );
    }
    if args.no_jail {
        tracing::warn!(
            "--no-jail: every VM's monitor runs with bulwarkd's privileges and sees the whole host; a guest that breaks out of its monitor owns this machine. Use it for debugging only."
        );
    }
    let daemon = Daemon::open(Config {
        state_dir: args.state_dir.clone(),
        monitor,
        no_jail: args.no_jail,
    })
    .await?;
    let socket = args
        .socket
        .unwrap_or_else(|| args.state_dir.join(bulwark_control::SOCKET_NAME));
    // A stale socket from an earlier run would make bind fail. The store's file lock has
    // already made sure no other bulwarkd uses this state directory.
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).context(format!(
                "cannot remove the stale socket {}",
                socket.display()
            ));
        }
    }
    let listener = bind_private(&socket)?;
    info!(socket = %socket.display(), state_dir = %args.state_dir.display(), "bulwarkd listening");
    bulwark_control::api::serve(daemon, listener).await;
    Ok(())
}

/// Binds the API socket so that it is never reachable with a wider mode than 0600: bind in a
/// fresh 0700 directory beside it, chmod, then rename into place.
fn bind_private(socket: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = socket
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = parent.join(format!(".bulwarkd-bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    let result = (|| {
        let inner = tmp.join("s");
        let listener = tokio::net::UnixListener::bind(&inner)
            .with_context(|| format!("cannot bind {}", socket.display()))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("cannot chmod {}", inner.display()))?;
        std::fs::rename(&inner, socket)
            .with_context(|| format!("cannot move the socket to {}", socket.display()))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bulwarkd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bulwarkd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
