//! The operator's HTTP endpoints: `/metrics`, `/healthz` and `/readyz`.
//!
//! Served by every replica, leader or not, so each can be scraped and probed.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone)]
pub struct Probe {
    /// Set once the replica has reached the API server.
    pub ready: Arc<AtomicBool>,
    /// The metrics to render.
    pub metrics: Metrics,
}

/// Binds `addr` and returns the bound address and the serving future.
pub async fn serve(
    addr: SocketAddr,
    probe: Probe,
) -> std::io::Result<(SocketAddr, impl Future<Output = ()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let serve = async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let probe = probe.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let probe = probe.clone();
                    async move { Ok::<_, Infallible>(route(&req, &probe)) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "http connection ended with an error");
                }
            });
        }
    };
    Ok((bound, serve))
}

fn route<B>(req: &Request<B>, probe: &Probe) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/metrics" => match probe.metrics.render() {
            Ok(text) => with_type(reply(StatusCode::OK, text), METRICS_CONTENT_TYPE),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        "/healthz" => reply(StatusCode::OK, "ok".into()),
        "/readyz" if probe.ready.load(Ordering::Relaxed) => reply(StatusCode::OK, "ok".into()),
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "API server not reached yet".into(),
        ),
        _ => reply(StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// The Prometheus text format; Prometheus 3 refuses a scrape without it.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    with_type(resp, "text/plain; charset=utf-8")
}

fn with_type(mut resp: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(ready: bool) -> Probe {
        Probe {
            ready: Arc::new(AtomicBool::new(ready)),
            metrics: Metrics::new().expect("metrics"),
        }
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).expect("request")
    }

    #[test]
    fn readyz_waits_for_the_api_server() {
        assert_eq!(
            route(&get("/readyz"), &probe(false)).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            route(&get("/readyz"), &probe(true)).status(),
            StatusCode::OK
        );
    }

    #[test]
    fn every_answer_names_its_content_type() {
        let content_type = |path: &str| {
            route(&get(path), &probe(true))
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            content_type("/metrics").as_deref(),
            Some(METRICS_CONTENT_TYPE)
        );
        for path in ["/healthz", "/readyz", "/nope"] {
            assert_eq!(
                content_type(path).as_deref(),
                Some("text/plain; charset=utf-8"),
                "{path}"
            );
        }
    }

    #[test]
    fn serves_metrics_and_health() {
        assert_eq!(
            route(&get("/metrics"), &probe(false)).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&get("/healthz"), &probe(false)).status(),
            StatusCode::OK
        );
        assert_eq!(
            route(&get("/nope"), &probe(false)).status(),
            StatusCode::NOT_FOUND
        );
    }
}
