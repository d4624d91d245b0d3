//! The message API on the `https` port: how a mailbox owner reads mail
//! without IMAP or POP3 (the only way for a receive-only domain, and what an
//! availability probe uses to see its receipts come back).
//!
//! HTTP/1.1 over TLS, HTTP Basic authentication against the mailbox
//! credentials (the same argon2 hashes and the same per-address lockout as
//! SMTP AUTH), and each caller sees only its own mailbox:
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/v1/messages` | `200`, JSON `[{"id": ..., "size": ...}]`, oldest first |
//! | `GET /api/v1/messages/{id}` | `200`, the message as `message/rfc822` |
//! | `DELETE /api/v1/messages/{id}` | `204`; the message's key is forgotten too |
//!
//! `401` without valid credentials, `429` while the address is locked out,
//! `404` for an unknown id or path, `405` for another method.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use base64::Engine as _;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Bytes,
    header::{CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch, task::JoinSet};
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;

const PREFIX: &str = "/api/v1/messages";

/// Serves the API until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    gateway: Arc<Gateway>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "message API accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let tls = tls.clone();
        let gateway = gateway.clone();
        connections.spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(30), tls.accept(stream)).await
            else {
                return;
            };
            let service = service_fn(move |request| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(respond(&gateway, peer, &request).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "message API connection ended with an error");
            }
        });
    }
    connections.abort_all();
}

async fn respond<B>(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let id = match path.strip_prefix(PREFIX) {
        Some("") => None,
        Some(rest) => match rest.strip_prefix('/') {
            Some(id) if valid_id(id) => Some(id.to_string()),
            _ => return text(StatusCode::NOT_FOUND, "no such message"),
        },
        None => return text(StatusCode::NOT_FOUND, "not found"),
    };
    let mailbox = match authenticate(gateway, peer, request).await {
        Ok(mailbox) => mailbox,
        Err(response) => return response,
    };
    match (request.method(), id) {
        (&Method::GET, None) => list(gateway, &mailbox),
        (&Method::GET, Some(id)) => match find(gateway, &mailbox, &id) {
            Some(path) => match std::fs::read(&path) {
                Ok(bytes) => with_type(StatusCode::OK, "message/rfc822", bytes),
                Err(_) => text(StatusCode::NOT_FOUND, "no such message"),
            },
            None => text(StatusCode::NOT_FOUND, "no such message"),
        },
        (&Method::DELETE, Some(id)) => match gateway.remove_message(&mailbox, &id) {
            Ok(true) => empty(StatusCode::NO_CONTENT),
            Ok(false) => text(StatusCode::NOT_FOUND, "no such message"),
            Err(e) => {
                tracing::warn!(error = %e, "deleting a message failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot delete the message",
                )
            }
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

/// The mailbox the request's Basic credentials open, or the refusal.
async fn authenticate<B>(
    gateway: &Arc<Gateway>,
    peer: SocketAddr,
    request: &Request<B>,
) -> Result<String, Response<Full<Bytes>>> {
    let ip = peer.ip();
    if let Err(wait) = gateway.auth_limiter.check(ip, Instant::now()) {
        return Err(text(
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "too many failed logins; try again in {} s",
                wait.as_secs().max(1)
            ),
        ));
    }
    let credentials = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b64| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|pair| {
            pair.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let Some((user, password)) = credentials else {
        return Err(unauthorized());
    };
    // argon2 takes tens of milliseconds by design: off the async threads.
    let verify = {
        let gateway = gateway.clone();
        tokio::task::spawn_blocking(move || {
            gateway
                .credentials
                .verify(&user, &password, &gateway.config.domain)
        })
    };
    match verify.await.ok().flatten() {
        Some(mailbox) => {
            gateway.auth_limiter.succeeded(ip);
            Ok(mailbox)
        }
        None => {
            gateway.auth_limiter.failed(ip, Instant::now());
            gateway.metrics.auth_failures.inc();
            Err(unauthorized())
        }
    }
}

fn list(gateway: &Gateway, mailbox: &str) -> Response<Full<Bytes>> {
    let messages = match gateway.mailbox_messages(mailbox) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "listing a mailbox failed");
            return text(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the mailbox");
        }
    };
    let entries: Vec<serde_json::Value> = messages
        .iter()
        .filter_map(|path| {
            let id = path.file_name()?.to_str()?.to_string();
            let size = std::fs::metadata(path).ok()?.len();
            Some(serde_json::json!({"id": id, "size": size}))
        })
        .collect();
    with_type(
        StatusCode::OK,
        "application/json",
        serde_json::Value::Array(entries).to_string().into_bytes(),
    )
}

fn find(gateway: &Gateway, mailbox: &str, id: &str) -> Option<PathBuf> {
    gateway
        .mailbox_messages(mailbox)
        .ok()?
        .into_iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(id))
}

/// A message id is a Maildir file name: no separators, no dot files.
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 255
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ',' | ':' | '='))
}

fn unauthorized() -> Response<Full<Bytes>> {
    let mut response = text(StatusCode::UNAUTHORIZED, "mailbox credentials required");
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"pec\", charset=\"UTF-8\""),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    with_type(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_maildir_names() {
        assert!(valid_id("1795460000.ab12cd34ef56.pec"));
        assert!(valid_id("a1b2.pec:2,S"));
        for bad in ["", ".hidden", "../x", "a/b", "a\\b", "%2e%2e", "x y"] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
