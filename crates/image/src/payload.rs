//! `bulwark payload build`: compiles C or assembly into a payload with the host's C compiler.
//!
//! The result is a static, non-PIE ELF linked at 0x100000 (where the monitor loads payloads) by
//! the SDK's link script, which puts `_start` (section `.text.start`) first, or with `flat` a raw
//! binary of the same code, entered at its first byte. The SDK header and start-up code are embedded
//! in the binary and written to a temporary directory for each build, so the tool works from any
//! directory with nothing installed but `cc`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const SDK_HEADER: &str = include_str!("../sdk/bulwark.h");
pub const SDK_CRT0: &str = include_str!("../sdk/crt0.S");
pub const SDK_LINK_SCRIPT: &str = include_str!("../sdk/payload.ld");
/// Link address of payloads (the monitor's `PAYLOAD_ADDR`).
pub const LINK_ADDR: u64 = 0x10_0000;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no source files given; pass .c, .S or .s files")]
    NoSources,
    #[error("{0}: unknown source kind; use .c for C or .S/.s for assembly")]
    UnknownKind(PathBuf),
    #[error("{0}: no such source file")]
    MissingSource(PathBuf),
    #[error("cannot run `{tool}`: install it (Debian: apt-get install {package})")]
    ToolMissing {
        tool: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{tool}` failed:\n{stderr}")]
    ToolFailed { tool: String, stderr: String },
    #[error("cannot prepare the build directory")]
    Io(#[from] std::io::Error),
}

/// What to build.
#[derive(Clone, Debug)]
pub struct BuildSpec {
    pub sources: Vec<PathBuf>,
    pub output: PathBuf,
    /// Emit a flat binary instead of an ELF.
    pub flat: bool,
    /// Link in the C start-up code (`_start` calls `bw_main`). Off for assembly that defines
    /// its own `_start`.
    pub crt0: bool,
    /// Extra compiler flags.
    pub cflags: Vec<String>,
}

impl BuildSpec {
    /// Defaults: ELF output; crt0 when any source is C.
    pub fn new(sources: Vec<PathBuf>, output: PathBuf) -> Self {
        let crt0 = sources
            .iter()
            .any(|s| s.extension().is_some_and(|e| e == "c"));
        Self {
            sources,
            output,
            flat: false,
            crt0,
            cflags: Vec::new(),
        }
    }
}

fn run(cmd: &mut Command, package: &'static str) -> Result<(), BuildError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    tracing::debug!(?cmd, "running");
    let out = cmd.output().map_err(|source| BuildError::ToolMissing {
        tool: tool.clone(),
        package,
        source,
    })?;
    if !out.status.success() {
        return Err(BuildError::ToolFailed {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> std::io::Result<Self> {
        let base = std::env::temp_dir();
        for n in 0..1000u32 {
            let p = base.join(format!("bulwark-payload-{}-{n}", std::process::id()));
            match std::fs::create_dir(&p) {
                Ok(()) => return Ok(Self(p)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free scratch directory name"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the payload described by `spec`.
pub fn build(spec: &BuildSpec) -> Result<(), BuildError> {
    if spec.sources.is_empty() {
        return Err(BuildError::NoSources);
    }
    for s in &spec.sources {
        let ext = s.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !matches!(ext, "c" | "S" | "s") {
            return Err(BuildError::UnknownKind(s.clone()));
        }
        if !s.exists() {
            return Err(BuildError::MissingSource(s.clone()));
        }
    }
    let scratch = Scratch::new()?;
    std::fs::write(scratch.0.join("bulwark.h"), SDK_HEADER)?;
    let script = scratch.0.join("payload.ld");
    std::fs::write(&script, SDK_LINK_SCRIPT)?;
    let mut sources: Vec<PathBuf> = spec.sources.clone();
    if spec.crt0 {
        let crt0 = scratch.0.join("crt0.S");
        std::fs::write(&crt0, SDK_CRT0)?;
        sources.insert(0, crt0);
    }
    let elf = if spec.flat {
        scratch.0.join("payload.elf")
    } else {
        spec.output.clone()
    };
    let mut cc = Command::new("cc");
    cc.args([
        "-static",
        "-nostdlib",
        "-ffreestanding",
        "-fno-pie",
        "-no-pie",
        "-fno-stack-protector",
        "-fno-asynchronous-unwind-tables",
        "-fcf-protection=none",
        "-mno-red-zone",
        "-O2",
        "-Wall",
    ]);
    cc.arg("-I").arg(&scratch.0);
    cc.arg("-Wl,-T").arg(&script);
    cc.args([
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=4096",
        "-Wl,-z,noexecstack",
    ]);
    cc.args(&spec.cflags);
    cc.arg("-o").arg(&elf);
    cc.args(sources.iter().map(|s| OsString::from(s.as_os_str())));
    run(&mut cc, "gcc")?;
    if spec.flat {
        let mut objcopy = Command::new("objcopy");
        objcopy.args(["-O", "binary"]).arg(&elf).arg(&spec.output);
        run(&mut objcopy, "binutils")?;
    }
    Ok(())
}

/// Where `bulwark payload build` writes by default: `SRC` with its extension replaced.
pub fn default_output(src: &Path, flat: bool) -> PathBuf {
    src.with_extension(if flat { "bin" } else { "elf" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_rejects_unknown_and_missing_sources() {
        let spec = BuildSpec::new(vec![], "x".into());
        assert!(matches!(build(&spec), Err(BuildError::NoSources)));
        let spec = BuildSpec::new(vec!["a.rs".into()], "x".into());
        assert!(matches!(build(&spec), Err(BuildError::UnknownKind(_))));
        let spec = BuildSpec::new(vec!["/nonexistent/a.c".into()], "x".into());
        assert!(matches!(build(&spec), Err(BuildError::MissingSource(_))));
    }

    #[test]
    fn build_c_payload_links_at_payload_address() {
        let dir = Scratch::new().unwrap();
        let src = dir.0.join("p.c");
        std::fs::write(
            &src,
            "#include <bulwark.h>\nint bw_main(bw_u32 v, bw_u32 n, const struct bw_info *i) { bw_puts(\"x\"); return 3; }\n",
        )
        .unwrap();
        let out = dir.0.join("p.elf");
        build(&BuildSpec::new(vec![src.clone()], out.clone())).unwrap();
        let elf = std::fs::read(&out).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert!(
            (LINK_ADDR..LINK_ADDR + 0x10_0000).contains(&entry),
            "{entry:#x}"
        );
        let mut flat = BuildSpec::new(vec![src], dir.0.join("p.bin"));
        flat.flat = true;
        build(&flat).unwrap();
        let bin = std::fs::read(dir.0.join("p.bin")).unwrap();
        assert!(!bin.is_empty() && bin.len() < elf.len());
    }

    #[test]
    fn build_reports_compiler_errors() {
        let dir = Scratch::new().unwrap();
        let src = dir.0.join("bad.c");
        std::fs::write(&src, "int bw_main( {").unwrap();
        let err = build(&BuildSpec::new(vec![src], dir.0.join("o"))).unwrap_err();
        assert!(matches!(err, BuildError::ToolFailed { .. }), "{err}");
    }
}
