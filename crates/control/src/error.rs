//! The API's errors: one variant per stable error code, each with its HTTP status.
//!
//! Every non-2xx answer has the body `{"error":{"code":"...","message":"..."}}`; the codes are
//! part of the API (docs/api.md lists them) and never change meaning.

use hyper::StatusCode;
use serde_json::json;

/// Why a request failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON, or not the JSON this route takes.
    #[error("{0}")]
    BadJson(String),
    /// The body has a field this route does not know.
    #[error("{0}")]
    UnknownField(String),
    /// The VM spec does not pass `FileConfig::check` or the host's limits.
    #[error("{0}")]
    InvalidSpec(String),
    /// A VM or snapshot name does not match `[a-z0-9][a-z0-9-]{{0,62}}`.
    #[error("{0}")]
    InvalidName(String),
    /// A field has a value the route cannot use (a malformed key, a short owner token).
    #[error("{0}")]
    InvalidRequest(String),
    /// Another VM has this name.
    #[error("a VM named `{0}` exists already; pick another name or delete it first")]
    NameTaken(String),
    /// No such VM, snapshot or route.
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request does not fit the VM's state (pause a stopped VM).
    #[error("{0}")]
    WrongState(String),
    /// No token, or a token nobody holds.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid token without the role this route needs.
    #[error("{0}")]
    Forbidden(String),
    /// The body is larger than [`crate::api::MAX_BODY`].
    #[error("request body larger than {} bytes", crate::api::MAX_BODY)]
    PayloadTooLarge,
    /// The VM's monitor is gone although the VM was recorded running.
    #[error("{0}")]
    MonitorGone(String),
    /// The monitor refused or failed the request; `monitor_code` is its own code.
    #[error("the monitor answered {monitor_code}: {message}")]
    Monitor {
        monitor_code: String,
        message: String,
    },
    /// The VM has no guest agent to talk to (no vsock in its spec, or nothing answers).
    #[error("{0}")]
    NoAgent(String),
    /// The guest agent answered with an error or garbage.
    #[error("{0}")]
    Agent(String),
    /// bulwarkd itself failed (a write to its state directory, a spawn).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadJson(_) => "bad_json",
            Self::UnknownField(_) => "unknown_field",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::InvalidName(_) => "invalid_name",
            Self::InvalidRequest(_) => "invalid_request",
            Self::NameTaken(_) => "name_taken",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::WrongState(_) => "wrong_state",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::PayloadTooLarge => "payload_too_large",
            Self::MonitorGone(_) => "monitor_gone",
            Self::Monitor { .. } => "monitor_error",
            Self::NoAgent(_) => "no_agent",
            Self::Agent(_) => "agent_error",
            Self::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadJson(_)
            | Self::UnknownField(_)
            | Self::InvalidSpec(_)
            | Self::InvalidName(_)
            | Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::NameTaken(_) | Self::WrongState(_) | Self::NoAgent(_) => StatusCode::CONFLICT,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::MonitorGone(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Monitor { monitor_code, .. } => match monitor_code.as_str() {
                bulwark_channel::error_code::UNSUPPORTED => StatusCode::NOT_IMPLEMENTED,
                bulwark_channel::error_code::INVALID => StatusCode::BAD_REQUEST,
                bulwark_channel::error_code::FORBIDDEN => StatusCode::FORBIDDEN,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::Agent(_) => StatusCode::BAD_GATEWAY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        let mut err = json!({ "code": self.code(), "message": self.to_string() });
        if let Self::Monitor { monitor_code, .. } = self {
            err["monitor_code"] = json!(monitor_code);
        }
        json!({ "error": err })
    }

    /// A monitor's error answer; its `wrong_state` is ours.
    pub fn from_monitor(code: String, message: String) -> Self {
        if code == bulwark_channel::error_code::WRONG_STATE {
            Self::WrongState(message)
        } else {
            Self::Monitor {
                monitor_code: code,
                message,
            }
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        Self::Internal(crate::error_chain(&e))
    }
}
