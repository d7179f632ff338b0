//! Saving and restoring device state for snapshots: a narrow trait apart from the bus and
//! transport traits. A device's state is its own encoding (JSON of a private struct), kept
//! opaque by the monitor and checked by the device when it is restored.

/// Why a device refused a saved state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saved {device} state is malformed: {why}")]
    Malformed { device: &'static str, why: String },
    #[error("saved {device} state does not fit this device: {why}")]
    Mismatch { device: &'static str, why: String },
}

/// A device whose state can be saved while the VM is paused and put back into a freshly built
/// device of the same configuration.
pub trait DeviceState {
    /// The state now. Called with the vCPUs parked.
    fn save_state(&self) -> Vec<u8>;
    /// Puts saved state back, before any vCPU runs.
    fn restore_state(&self, data: &[u8]) -> Result<(), StateError>;
}

/// Decodes a device's JSON state.
pub(crate) fn decode<T: for<'de> serde::Deserialize<'de>>(
    device: &'static str,
    data: &[u8],
) -> Result<T, StateError> {
    serde_json::from_slice(data).map_err(|e| StateError::Malformed {
        device,
        why: e.to_string(),
    })
}

/// Encodes a device's JSON state.
pub(crate) fn encode<T: serde::Serialize>(state: &T) -> Vec<u8> {
    serde_json::to_vec(state).unwrap_or_default()
}
