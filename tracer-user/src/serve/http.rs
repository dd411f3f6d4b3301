//! The HTTP side of `socktrace serve`: `/metrics` and `/healthz` on a
//! listener that is bound before the probes load, so that a busy port or a
//! bad address fails at once; over TLS and behind basic auth with
//! `--web-config` (`serve::web_config`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT, ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::exposition::Format;
use super::metrics::Metrics;
use super::web_config::WebConfig;

/// Scrapers (and anyone else) served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request headers by then (also between
/// requests on a kept-alive connection) is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most a request may send before its body (hyper's floor is 8 KiB):
/// a scrape sends a few hundred bytes; larger ones get 431.
const MAX_REQUEST_BYTES: usize = 16 * 1024;
/// A connection is closed after this long whatever it does, so that one
/// that never reads its response cannot hold a slot (a scraper that keeps
/// its connection alive opens a new one).
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// In-flight requests get this long to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// `/healthz` fails when the collector has not ticked for this long (it
/// ticks every 100 ms).
const STALE_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
pub enum ListenError {
    #[error(
        "--listen {0:?} is not an address: expected IP:PORT, e.g. 127.0.0.1:9477 or [::1]:9477"
    )]
    Parse(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

pub fn parse_listen(text: &str) -> Result<SocketAddr, ListenError> {
    text.trim()
        .parse()
        .map_err(|_| ListenError::Parse(text.to_string()))
}

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError::Bind { addr, source })
}

/// Whether the collector loop is still turning.
#[derive(Debug)]
pub struct Health {
    start: Instant,
    last_tick_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            last_tick_ms: AtomicU64::new(0),
        }
    }

    /// Called on every collector tick.
    pub fn beat(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_tick_ms.store(ms, Ordering::Relaxed);
    }

    fn is_alive(&self) -> bool {
        let last = Duration::from_millis(self.last_tick_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) < STALE_AFTER
    }
}

/// Serves until `stop` changes, then lets in-flight requests finish for
/// a moment.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    web: Arc<WebConfig>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let tls = web.tls.clone().map(TlsAcceptor::from);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of fds, most likely: wait instead of spinning.
                    log::warn!("accepting an HTTP connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            // The only change is to "stop" (or the sender is gone).
            _ = stop.changed() => break,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let service = service(metrics.clone(), health.clone(), web.clone());
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let served = match tls {
                None => serve_connection(TokioIo::new(stream), service, watcher).await,
                // The handshake gets the time the request headers get.
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(TokioIo::new(stream), service, watcher).await
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err("TLS handshake timed out".to_string()),
                },
            };
            if let Err(e) = served {
                log::debug!("HTTP connection: {e}");
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        log::debug!("HTTP connections still open at exit");
    }
}

/// What answers each request: `/metrics` and `/healthz` behind basic auth
/// if configured.
pub fn service(
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    web: Arc<WebConfig>,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send,
> + Clone
+ Send {
    service_fn(move |request: Request<hyper::body::Incoming>| {
        let (metrics, health, web) = (metrics.clone(), health.clone(), web.clone());
        async move { Ok(authorized(&request, &metrics, &health, &web).await) }
    })
}

/// One connection, plain or TLS, within the limits above.
pub async fn serve_connection<I, S>(io: I, service: S, watcher: Watcher) -> Result<(), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .serve_connection(io, service);
    match tokio::time::timeout(MAX_CONNECTION_AGE, watcher.watch(connection)).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("closed after {MAX_CONNECTION_AGE:?}")),
    }
}

/// [`respond`] to whoever basic auth admits; `/healthz` is for anyone (a
/// liveness probe has no password, and it tells nothing).
async fn authorized<B>(
    request: &Request<B>,
    metrics: &Metrics,
    health: &Health,
    web: &WebConfig,
) -> Response<Full<Bytes>> {
    if web.auth.required() && request.uri().path() != "/healthz" {
        let credentials = request
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if !web.auth.admits(credentials).await {
            let mut response = text(StatusCode::UNAUTHORIZED, "unauthorized\n");
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"socktrace\""),
            );
            return response;
        }
    }
    respond(request, metrics, health)
}

fn respond<B>(request: &Request<B>, metrics: &Metrics, health: &Health) -> Response<Full<Bytes>> {
    let method = request.method();
    if method != Method::GET && method != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let accept = request
                .headers()
                .get(ACCEPT)
                .and_then(|value| value.to_str().ok());
            let format = Format::negotiate(accept);
            match metrics.encode(format) {
                Ok(body) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        HeaderValue::from_static(format.content_type()),
                    );
                    response
                }
                Err(e) => {
                    log::warn!("encoding the metrics: {e}");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n")
                }
            }
        }
        "/healthz" if health.is_alive() => text(StatusCode::OK, "ok\n"),
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the collector has stalled\n",
        ),
        "/" => text(
            StatusCode::OK,
            "socktrace: metrics on /metrics, health on /healthz\n",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::super::metrics::Exporter;
    use super::*;

    fn get(path: &str, accept: Option<&str>) -> Request<()> {
        let mut request = Request::get(path);
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        request.body(()).unwrap()
    }

    fn content_type(response: &Response<Full<Bytes>>) -> &str {
        response.headers()[CONTENT_TYPE].to_str().unwrap()
    }

    #[test]
    fn routes_and_formats() {
        let metrics = Metrics::new(Exporter::new(10), "tracepoint");
        let health = Health::new();
        health.beat();

        let plain = respond(&get("/metrics", None), &metrics, &health);
        assert_eq!(plain.status(), StatusCode::OK);
        assert!(content_type(&plain).starts_with("text/plain; version=0.0.4"));
        let openmetrics = respond(
            &get(
                "/metrics",
                Some("application/openmetrics-text;version=1.0.0"),
            ),
            &metrics,
            &health,
        );
        assert!(content_type(&openmetrics).starts_with("application/openmetrics-text"));

        assert_eq!(
            respond(&get("/healthz", None), &metrics, &health).status(),
            StatusCode::OK
        );
        assert_eq!(
            respond(&get("/nope", None), &metrics, &health).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::post("/metrics").body(()).unwrap();
        assert_eq!(
            respond(&post, &metrics, &health).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn stalled_collector_is_unhealthy() {
        let metrics = Metrics::new(Exporter::new(10), "tracepoint");
        let health = Health {
            start: Instant::now() - 2 * STALE_AFTER,
            last_tick_ms: AtomicU64::new(0),
        };
        assert_eq!(
            respond(&get("/healthz", None), &metrics, &health).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("127.0.0.1:9477").unwrap(),
            "127.0.0.1:9477".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("[::1]:9477").is_ok());
        let error = parse_listen("localhost").unwrap_err().to_string();
        assert!(error.contains("expected IP:PORT"), "{error}");
        assert!(parse_listen("127.0.0.1:99999").is_err());
    }
}
