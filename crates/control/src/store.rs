//! The VM records, in one redb file (`STATE_DIR/bulwarkd.redb`).
//!
//! Two tables: `vms` maps a VM id to its record (JSON), `names` maps a name to its id, so a
//! name is unique by construction. Every change is one ACID write transaction, durable when
//! `put`/`remove` return.

use std::path::{Path, PathBuf};

use bulwark_spec::FileConfig;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const NAMES: TableDefinition<&str, &str> = TableDefinition::new("names");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
    #[error("state database write failed (disk full or read-only?)")]
    Db(#[from] redb::Error),
    #[error("state database record {id} is not valid: {error}")]
    Record { id: String, error: String },
    #[error("the name `{0}` is taken")]
    NameTaken(String),
}

/// Desired or last known state of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded, never started.
    Created,
    Running,
    Paused,
    /// The monitor ended and wrote how (exit.json).
    Stopped,
    /// The monitor could not start or died without saying why.
    Failed,
}

impl VmState {
    pub const ALL: [VmState; 5] = [
        Self::Created,
        Self::Running,
        Self::Paused,
        Self::Stopped,
        Self::Failed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Failed => "failed",
        }
    }

    /// Whether a monitor process should exist.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

/// The monitor process of a live VM. `start_time` (field 22 of `/proc/PID/stat`, clock ticks
/// since boot) tells a recycled pid from ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorProc {
    pub pid: u32,
    pub start_time: u64,
}

/// `exit.json` as the monitor writes it. Unknown fields are tolerated (a newer monitor may add
/// some); missing ones take defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ExitRecord {
    pub reason: String,
    pub status: u8,
    pub clean: bool,
    pub setup_error: bool,
    pub elapsed_ms: u64,
    pub exits: u64,
}

/// One VM as bulwarkd keeps it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// 16 random hex digits; names the VM's directory.
    pub id: String,
    pub name: String,
    pub spec: FileConfig,
    /// SHA-256 (hex) of the owner's token; the token itself is never stored.
    pub owner_hash: String,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    pub state: VmState,
    /// When the current monitor was started (Unix ms), while live.
    pub started_ms: Option<u64>,
    pub monitor: Option<MonitorProc>,
    /// How the last run ended.
    pub last_exit: Option<ExitRecord>,
    /// Why the VM is `failed`, or the last run's end in words.
    pub reason: Option<String>,
}

/// The open database.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Db(e.into())
}

impl Store {
    /// Opens or creates the database; redb locks the file, so a second bulwarkd on the same
    /// state directory fails here.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open = |source: redb::Error| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = Database::create(path).map_err(|e| open(e.into()))?;
        // Create both tables so that readers never see them missing.
        let txn = db.begin_write().map_err(|e| open(e.into()))?;
        txn.open_table(VMS).map_err(|e| open(e.into()))?;
        txn.open_table(NAMES).map_err(|e| open(e.into()))?;
        txn.commit().map_err(|e| open(e.into()))?;
        Ok(Self { db })
    }

    /// Every record.
    pub fn load_all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(db)?;
        let table = txn.open_table(VMS).map_err(db)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(db)? {
            let (k, v) = row.map_err(db)?;
            let rec = serde_json::from_slice(v.value()).map_err(|e| StoreError::Record {
                id: k.value().to_string(),
                error: e.to_string(),
            })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Inserts a new record; fails if its name is taken.
    pub fn insert(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut names = txn.open_table(NAMES).map_err(db)?;
            if names.get(rec.name.as_str()).map_err(db)?.is_some() {
                return Err(StoreError::NameTaken(rec.name.clone()));
            }
            names
                .insert(rec.name.as_str(), rec.id.as_str())
                .map_err(db)?;
            let mut vms = txn.open_table(VMS).map_err(db)?;
            let bytes = serde_json::to_vec(rec).unwrap_or_default();
            vms.insert(rec.id.as_str(), bytes.as_slice()).map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    /// Replaces an existing record (same id and name).
    pub fn update(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut vms = txn.open_table(VMS).map_err(db)?;
            let bytes = serde_json::to_vec(rec).unwrap_or_default();
            vms.insert(rec.id.as_str(), bytes.as_slice()).map_err(db)?;
        }
        txn.commit().map_err(db)
    }

    /// Removes a record and frees its name.
    pub fn remove(&self, rec: &VmRecord) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut vms = txn.open_table(VMS).map_err(db)?;
            vms.remove(rec.id.as_str()).map_err(db)?;
            let mut names = txn.open_table(NAMES).map_err(db)?;
            names.remove(rec.name.as_str()).map_err(db)?;
        }
        txn.commit().map_err(db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, name: &str) -> VmRecord {
        VmRecord {
            id: id.into(),
            name: name.into(),
            spec: FileConfig::from_json(r#"{"payload":"/p.elf"}"#).unwrap(),
            owner_hash: "00".repeat(32),
            created_ms: 1,
            state: VmState::Created,
            started_ms: None,
            monitor: None,
            last_exit: None,
            reason: None,
        }
    }

    #[test]
    fn store_records_survive_reopen_and_names_stay_unique() {
        let dir = std::env::temp_dir().join(format!("bulwark-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        {
            let s = Store::open(&path).unwrap();
            s.insert(&rec("a1", "one")).unwrap();
            assert!(matches!(
                s.insert(&rec("a2", "one")),
                Err(StoreError::NameTaken(_))
            ));
            let mut r = rec("a1", "one");
            r.state = VmState::Running;
            s.update(&r).unwrap();
            s.insert(&rec("b1", "two")).unwrap();
            s.remove(&rec("b1", "two")).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let all = s.load_all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].state, VmState::Running);
        s.insert(&rec("b2", "two")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
