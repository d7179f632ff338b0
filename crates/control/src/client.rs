//! The API client `bulwark vm` uses: hyper's HTTP/1.1 client over the daemon's unix socket.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use crate::api::CONSOLE_PROTOCOL;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to bulwarkd at {path}; is it running? (--socket or BULWARK_SOCKET)")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with bulwarkd failed")]
    Http(#[from] hyper::Error),
    #[error("cannot build the request: {0}")]
    Request(String),
    /// The daemon answered with an error document.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("bulwarkd answered something unexpected: {0}")]
    BadAnswer(String),
}

/// A connection-per-request client.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
    token: Option<String>,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

impl ApiClient {
    pub fn new(socket: &Path, token: Option<String>) -> Self {
        Self {
            socket: socket.to_path_buf(),
            token,
        }
    }

    async fn connect(&self) -> Result<Sender, ClientError> {
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "bulwarkd");
        if !body.is_empty() {
            b = b.header(CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.token {
            b = b.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Request(e.to_string()))
    }

    /// Sends raw bytes; returns the status and the body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let mut sender = self.connect().await?;
        let resp = sender
            .send_request(self.request(method, path, body)?)
            .await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    /// Sends a JSON request; a non-2xx answer is [`ClientError::Api`].
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let (status, bytes) = self.raw(method, path, body).await?;
        if !(200..300).contains(&status) {
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let e = &v["error"];
            return Err(ClientError::Api {
                status,
                code: e["code"].as_str().unwrap_or("unknown").to_string(),
                message: e["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned()),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        if path == "/metrics" {
            return Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Attaches to a VM's console: the upgraded connection carries raw console bytes.
    pub async fn console(&self, name: &str) -> Result<TokioIo<Upgraded>, ClientError> {
        let mut sender = self.connect().await?;
        let mut req = self.request("GET", &format!("/v1/vms/{name}/console"), Vec::new())?;
        req.headers_mut().insert(
            CONNECTION,
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        req.headers_mut().insert(
            UPGRADE,
            hyper::header::HeaderValue::from_static(CONSOLE_PROTOCOL),
        );
        let resp = sender.send_request(req).await?;
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(ClientError::Api {
                status,
                code: v["error"]["code"].as_str().unwrap_or("unknown").to_string(),
                message: v["error"]["message"].as_str().unwrap_or("").to_string(),
            });
        }
        let up = hyper::upgrade::on(resp).await?;
        Ok(TokioIo::new(up))
    }
}
