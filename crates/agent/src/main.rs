//! `bulwark-agent`: the guest agent binary. See the library docs for the protocol.
//!
//! ```text
//! bulwark-agent [--vsock-port N]    listen on AF_VSOCK port N (default 52), any local CID
//! bulwark-agent --unix PATH         listen on a unix socket instead (tests on a host)
//! ```
//!
//! Prints one line to stderr once listening, then serves until killed.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use bulwark_agent::error_chain;
use bulwark_agent::server::{DEFAULT_VSOCK_PORT, ListenAddr, Listener};

const USAGE: &str = "usage: bulwark-agent [--vsock-port N (default 52)] [--unix PATH]";

fn main() -> ExitCode {
    let addr = match parse_args(std::env::args().skip(1)) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("bulwark-agent: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let listener = match Listener::bind(&addr) {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("bulwark-agent: {}", error_chain(&error));
            return ExitCode::FAILURE;
        }
    };
    eprintln!("bulwark-agent: listening on {}", listener.addr());
    listener.serve()
}

/// Parses the command line; `Ok(None)` for `--help`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<ListenAddr>, String> {
    let mut port = None;
    let mut unix = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--vsock-port" => {
                let value = args.next().ok_or("--vsock-port needs a port number")?;
                let parsed = value
                    .parse::<u32>()
                    .map_err(|e| format!("--vsock-port {value:?}: {e}"))?;
                port = Some(parsed);
            }
            "--unix" => {
                let value = args.next().ok_or("--unix needs a socket path")?;
                unix = Some(PathBuf::from(value));
            }
            "-h" | "--help" => return Ok(None),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (port, unix) {
        (Some(_), Some(_)) => Err("--vsock-port and --unix are exclusive".into()),
        (_, Some(path)) => Ok(Some(ListenAddr::Unix(path))),
        (port, None) => Ok(Some(ListenAddr::Vsock {
            port: port.unwrap_or(DEFAULT_VSOCK_PORT),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Option<ListenAddr>, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parse_args_defaults_to_vsock_port_52() {
        assert_eq!(parse(&[]), Ok(Some(ListenAddr::Vsock { port: 52 })));
        assert_eq!(
            parse(&["--vsock-port", "1024"]),
            Ok(Some(ListenAddr::Vsock { port: 1024 }))
        );
        assert_eq!(
            parse(&["--unix", "/tmp/a.sock"]),
            Ok(Some(ListenAddr::Unix("/tmp/a.sock".into())))
        );
        assert_eq!(parse(&["--help"]), Ok(None));
    }

    #[test]
    fn parse_args_bad_input_is_an_error() {
        for bad in [
            &["--vsock-port"][..],
            &["--vsock-port", "x"],
            &["--unix"],
            &["--vsock-port", "1", "--unix", "/a"],
            &["--bogus"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
