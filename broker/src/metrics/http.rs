//! The `/metrics` endpoint: HTTP/1.1 on its own listener, gauges read at
//! each scrape, then the recorder rendered in Prometheus's text format.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::sample::Sampler;

/// Scrapers served at once; more wait for a slot.
const MAX_CONNECTIONS: usize = 32;

/// How long a connection may take to send a request's headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The running endpoint; stops when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Serves `/metrics` on `listener` with gauges read by `sampler`.
    pub fn start(listener: TcpListener, handle: PrometheusHandle, sampler: Arc<Sampler>) -> std::io::Result<Self> {
        let address = listener.local_addr()?;
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let task = tokio::spawn(async move {
            loop {
                let Ok(permit) = slots.clone().acquire_owned().await else { return };
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener cannot accept");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (handle, sampler) = (handle.clone(), sampler.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (handle, sampler) = (handle.clone(), sampler.clone());
                        async move { Ok::<_, Infallible>(respond(&req, &handle, &sampler).await) }
                    });
                    // A connection that sends no request within the limit
                    // is closed, so idle ones cannot hold every slot.
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "metrics connection ended");
                    }
                    drop(permit);
                });
            }
        });
        Ok(MetricsServer { address, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn respond(
    req: &Request<hyper::body::Incoming>,
    handle: &PrometheusHandle,
    sampler: &Sampler,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(v) = content_type.parse() {
            response.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        response
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            sampler.refresh().await;
            reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", handle.render())
        }
        (&Method::GET, "/") => {
            reply(StatusCode::OK, "text/plain; charset=utf-8", "Tally broker metrics: GET /metrics\n".into())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found: try GET /metrics\n".into()),
    }
}
