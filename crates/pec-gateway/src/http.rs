//! The gateway's HTTP endpoints for Kubernetes and Prometheus: `/healthz`
//! (the process answers), `/readyz` (it can take mail now) and `/metrics`.
//!
//! It touches only the listener it is given, the metrics it renders and the
//! readiness it asks; it never reads mail, keys or credentials.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Bytes,
    header::{ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

use crate::metrics::Metrics;

/// The content type of every response but `/metrics`.
const TEXT: &str = "text/plain; charset=utf-8";

/// A client that has not sent its request headers by then is dropped, so
/// idle or slow connections cannot pile up.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the gateway can do its work right now (clamd answers, the HSM
/// session is open, the spool is writable, …).
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else the reason, e.g. `clamd unreachable`, shown to
    /// whoever probes `/readyz`. Called on every probe, so it should read
    /// state that is kept current elsewhere rather than do slow checks.
    fn ready(&self) -> Result<(), String>;
}

/// Serves the endpoints on `listener` until `shutdown` becomes true (or its
/// sender is dropped): then it stops accepting, asks open connections to
/// finish their current request, and returns.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<dyn Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopping(&mut shutdown) => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Usually out of file descriptors; retrying at once would
                // spin, and giving up would take the probes down for good.
                tracing::warn!(error = %e, "http accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let readiness = readiness.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&request, &metrics, readiness.as_ref());
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping(&mut shutdown) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

/// Resolves once `shutdown` is true, or can never become true.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

fn respond<B>(
    request: &Request<B>,
    metrics: &Metrics,
    readiness: &dyn Readiness,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return text(StatusCode::NOT_FOUND, "not found".to_owned());
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed".to_owned(),
        );
        response
            .headers_mut()
            .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok".to_owned()),
        "/readyz" => match readiness.ready() {
            Ok(()) => text(StatusCode::OK, "ready".to_owned()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, reason),
        },
        _ => match metrics.encode() {
            Ok((body, content_type)) => with_type(StatusCode::OK, content_type, body),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}"),
            ),
        },
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_type(status, TEXT, body)
}

fn with_type(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Mutex};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        task::JoinHandle,
    };

    use super::*;

    /// A readiness the test sets by hand.
    #[derive(Default)]
    struct Switch(Mutex<Option<String>>);

    impl Readiness for Switch {
        fn ready(&self) -> Result<(), String> {
            match &*self.0.lock().unwrap() {
                None => Ok(()),
                Some(reason) => Err(reason.clone()),
            }
        }
    }

    struct Server {
        addr: SocketAddr,
        switch: Arc<Switch>,
        stop: watch::Sender<bool>,
        task: JoinHandle<()>,
    }

    async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let switch = Arc::new(Switch::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(
            listener,
            Arc::new(Metrics::new()),
            switch.clone(),
            stopped,
        ));
        Server {
            addr,
            switch,
            stop,
            task,
        }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    async fn request(addr: SocketAddr, method: &str, path: &str) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').unwrap();
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> Reply {
        request(addr, "GET", path).await
    }

    #[tokio::test]
    async fn healthz_answers_ok() {
        let server = start().await;
        let reply = get(server.addr, "/healthz").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body, "ok");
        assert_eq!(reply.header("content-type"), Some(TEXT));
    }

    #[tokio::test]
    async fn readyz_follows_the_readiness_and_gives_the_reason() {
        let server = start().await;
        let reply = get(server.addr, "/readyz").await;
        assert_eq!((reply.status, reply.body.as_str()), (200, "ready"));
        *server.switch.0.lock().unwrap() = Some("clamd unreachable".to_owned());
        let reply = get(server.addr, "/readyz").await;
        assert_eq!(reply.status, 503);
        assert_eq!(reply.body, "clamd unreachable");
        assert_eq!(reply.header("content-type"), Some(TEXT));
        *server.switch.0.lock().unwrap() = None;
        assert_eq!(get(server.addr, "/readyz").await.status, 200);
    }

    #[tokio::test]
    async fn metrics_are_served_in_prometheus_text_format() {
        let server = start().await;
        let reply = get(server.addr, "/metrics").await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        assert!(
            reply.body.contains("pec_gateway_build_info"),
            "{}",
            reply.body
        );
    }

    #[tokio::test]
    async fn an_unknown_path_is_404_and_a_wrong_method_405() {
        let server = start().await;
        let reply = get(server.addr, "/nope").await;
        assert_eq!(reply.status, 404);
        assert!(reply.header("content-type").is_some());
        let reply = request(server.addr, "POST", "/healthz").await;
        assert_eq!(reply.status, 405);
        assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        assert!(reply.header("content-type").is_some());
    }

    #[tokio::test]
    async fn shutdown_stops_the_server() {
        let server = start().await;
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        server.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.task)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(server.addr).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_closes_idle_keep_alive_connections() {
        let server = start().await;
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        server.stop.send(true).unwrap();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0))), "{closed:?}");
    }
}
