//! `bulwark exec` and `bulwark agent ps`: talk to the guest agent through a VM's vsock socket.
//!
//! Everything the agent answers is guest-controlled: output is passed through as bytes, and the
//! process table is printed with control characters escaped so a guest cannot drive the
//! user's terminal.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bulwark_agent::client;
use bulwark_agent::server::DEFAULT_VSOCK_PORT;
use clap::{Args, Subcommand};

use crate::config::parse_duration;

/// Exit status when the agent could not be reached or refused the request.
const EXIT_AGENT: u8 = 125;

#[derive(Args, Debug)]
pub struct AgentTarget {
    /// The VM's vsock socket (`bulwark run --vsock PATH`).
    #[arg(long)]
    vsock: PathBuf,
    /// The guest port the agent listens on.
    #[arg(long, default_value_t = DEFAULT_VSOCK_PORT)]
    port: u32,
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    target: AgentTarget,
    /// Kill the command (and its process group) after this long: 500ms, 10s, 2m.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Environment for the command, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// Send this process's stdin to the command.
    #[arg(long)]
    stdin: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum AgentCommand {
    /// List the guest's processes as the guest sees them (pid, ppid, uid, state, comm).
    Ps {
        #[command(flatten)]
        target: AgentTarget,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `bulwark exec`: runs the command in the guest and exits with its status, its stdout and
/// stderr on ours.
pub fn exec(args: &ExecArgs) -> ExitCode {
    let mut env = Vec::new();
    for e in &args.env {
        let Some((k, v)) = e.split_once('=') else {
            eprintln!("bulwark: --env {e}: use NAME=VALUE");
            return ExitCode::from(EXIT_AGENT);
        };
        env.push((k, v));
    }
    let mut input = Vec::new();
    if args.stdin
        && let Err(e) = std::io::Read::read_to_end(&mut std::io::stdin(), &mut input)
    {
        eprintln!("bulwark: reading stdin: {e}");
        return ExitCode::from(EXIT_AGENT);
    }
    let argv: Vec<&str> = args.command.iter().map(String::as_str).collect();
    let result = client::connect_vsock_uds(&args.target.vsock, args.target.port)
        .and_then(|mut s| client::exec(&mut s, &argv, &env, &input, args.timeout));
    match result {
        Ok(r) => {
            let _ = std::io::stdout().write_all(&r.stdout);
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(&r.stderr);
            if r.truncated {
                eprintln!(
                    "bulwark: the command's output was longer than the agent keeps; it was cut"
                );
            }
            ExitCode::from(u8::try_from(r.status).unwrap_or(255))
        }
        Err(e) => {
            eprintln!("bulwark: {}", bulwark_agent::error_chain(&e));
            ExitCode::from(EXIT_AGENT)
        }
    }
}

/// Printable form of a guest-supplied name.
fn clean(s: &str) -> String {
    s.chars().flat_map(char::escape_debug).collect()
}

pub fn agent(cmd: &AgentCommand) -> ExitCode {
    let AgentCommand::Ps { target, json } = cmd;
    let procs = match client::connect_vsock_uds(&target.vsock, target.port)
        .and_then(|mut s| client::ps(&mut s))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bulwark: {}", bulwark_agent::error_chain(&e));
            return ExitCode::from(EXIT_AGENT);
        }
    };
    let mut out = String::new();
    if *json {
        out.push('[');
        for (i, p) in procs.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&format!(
                "{{\"pid\":{},\"ppid\":{},\"uid\":{},\"state\":\"{}\",\"comm\":\"{}\"}}",
                p.pid,
                p.ppid,
                p.uid,
                clean(&char::from(p.state).to_string()),
                json_escape(&p.comm)
            ));
        }
        out.push_str("]\n");
    } else {
        out.push_str(&format!("{:>7} {:>7} {:>6} S COMM\n", "PID", "PPID", "UID"));
        for p in &procs {
            out.push_str(&format!(
                "{:>7} {:>7} {:>6} {} {}\n",
                p.pid,
                p.ppid,
                p.uid,
                clean(&char::from(p.state).to_string()),
                clean(&p.comm)
            ));
        }
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    ExitCode::SUCCESS
}

fn json_escape(s: &str) -> String {
    let mut o = String::new();
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_cannot_carry_terminal_controls() {
        assert_eq!(clean("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(json_escape("q\"\\\n\x1b"), "q\\\"\\\\\\u000a\\u001b");
    }
}
