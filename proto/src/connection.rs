//! [`Connection`]: one HTTP/2 connection to a broker, driven by `h2`
//! directly, that tonic's generated clients call through: the client's
//! connections to brokers and the brokers' connections to each other.
//!
//! tonic's own `Channel` puts two task hops on every call: the request goes
//! through a buffer task (tower's `Buffer`) to hyper's connection task, and
//! hyper spawns a task per request to carry the response back. Each hop is
//! a wakeup, and on a small request those wakeups are most of the time not
//! spent on the network. Here the caller writes its request into the
//! connection's shared state and awaits its response itself: the only other
//! task is the one that reads and writes the socket.
//!
//! The connection opens on the first call, is opened again after it breaks,
//! pings the broker while idle so a silent peer is noticed, and enforces
//! the `grpc-timeout` a call carries. Every failure to reach the broker
//! comes back as `UNAVAILABLE`, with the address in the message.

use std::future::{Future, poll_fn};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tonic::Status;

/// How a [`Connection`] opens and watches its connection.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionSettings {
    /// Time allowed to open the TCP connection and finish the HTTP/2
    /// handshake. Default 5 s.
    pub connect_timeout: Duration,
    /// Interval between keepalive pings. Default 10 s.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection counts as
    /// dead and is closed. Default 20 s.
    pub keepalive_timeout: Duration,
    /// Local address to connect from (its port picked by the OS); `None`:
    /// the OS chooses.
    pub source: Option<IpAddr>,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            source: None,
        }
    }
}

/// HTTP/2 windows and frame size: large enough that a producer's 8 MiB
/// request and a fetch's answer flow without waiting on WINDOW_UPDATEs.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;

/// A lazily opened HTTP/2 connection to one broker. Cheap to clone; clones
/// share the connection. Implements the service tonic's clients call.
///
/// A request's body is read to its end before the request goes out: right
/// for unary calls (all of Tally's) and finite client streams, not for a
/// bidirectional stream that waits on answers before it sends more.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("address", &self.shared.address).finish_non_exhaustive()
    }
}

struct Shared {
    /// `host:port`, as given.
    address: String,
    /// `http://host:port`: the scheme and authority every request carries.
    origin: http::uri::Authority,
    settings: ConnectionSettings,
    /// The open connection, if any. Held only to clone or replace it.
    live: Mutex<Option<Live>>,
    /// Taken while opening, so concurrent first calls open one connection.
    opening: tokio::sync::Mutex<()>,
}

#[derive(Clone)]
struct Live {
    send: h2::client::SendRequest<Bytes>,
    /// Tells this connection from the one that replaces it.
    id: u64,
}

impl Connection {
    /// A connection to `address` (`host:port`, optionally `http://`) that
    /// opens on first use. Nothing is resolved or connected here; an error
    /// means the address is malformed.
    pub fn lazy(address: &str, settings: ConnectionSettings) -> Result<Connection, String> {
        let host_port = address.strip_prefix("http://").unwrap_or(address);
        if host_port.contains("://") {
            return Err(format!("bad address `{address}`: only plain `host:port` (or http://) is supported"));
        }
        let origin = host_port.parse::<http::uri::Authority>().map_err(|e| format!("bad address `{address}`: {e}"))?;
        if origin.port_u16().is_none() {
            return Err(format!("bad address `{address}`: it needs a port"));
        }
        Ok(Connection {
            shared: Arc::new(Shared {
                address: host_port.to_string(),
                origin,
                settings,
                live: Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// The open connection, opening one if there is none.
    async fn live(&self) -> Result<Live, Status> {
        if let Some(live) = self.shared.current() {
            return Ok(live);
        }
        let _opening = self.shared.opening.lock().await;
        if let Some(live) = self.shared.current() {
            return Ok(live);
        }
        let live = open(&self.shared).await?;
        *self.shared.live.lock().unwrap_or_else(PoisonError::into_inner) = Some(live.clone());
        Ok(live)
    }

    /// A connection that is ready for one more stream: when the current one
    /// has broken (found out before anything was sent on it), a new one.
    async fn ready(&self) -> Result<h2::client::SendRequest<Bytes>, Status> {
        let live = self.live().await?;
        let mut send = live.send;
        match poll_fn(|cx| send.poll_ready(cx)).await {
            Ok(()) => Ok(send),
            Err(_) => {
                self.shared.forget(live.id);
                let mut send = self.live().await?.send;
                poll_fn(|cx| send.poll_ready(cx)).await.map_err(|e| self.shared.broke(&e))?;
                Ok(send)
            }
        }
    }

    async fn call(self, request: http::Request<tonic::body::Body>) -> Result<http::Response<ResponseBody>, Status> {
        let timeout = grpc_timeout(request.headers());
        let exchange = self.exchange(request);
        let response = match timeout {
            Some(limit) => tokio::time::timeout(limit, exchange).await.map_err(|_| {
                Status::deadline_exceeded(format!("no answer from {} within {limit:?}", self.shared.address))
            })??,
            None => exchange.await?,
        };
        let (parts, body) = response.into_parts();
        Ok(http::Response::from_parts(parts, ResponseBody { body, shared: self.shared.clone(), trailers: false }))
    }

    /// Sends `request` and waits for the response head.
    async fn exchange(
        &self,
        request: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<h2::RecvStream>, Status> {
        let (mut parts, mut body) = request.into_parts();
        let path = parts.uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = http::Uri::builder()
            .scheme(http::uri::Scheme::HTTP)
            .authority(self.shared.origin.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| Status::internal(format!("cannot build the request URI: {e}")))?;
        // A unary call's body is one encoded message, ready at once: read
        // it whole, so the request goes out as HEADERS and DATA(END_STREAM)
        // without a task to pump it. (Tally's RPCs are all unary; a
        // streaming body would be read to its end before the response is
        // awaited.)
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut trailers = None;
        while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            let frame = frame?;
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => chunks.push(data),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        let mut send = self.ready().await?;
        let head = http::Request::from_parts(parts, ());
        let end_at_head = chunks.is_empty() && trailers.is_none();
        let (response, mut stream) = send.send_request(head, end_at_head).map_err(|e| self.shared.broke(&e))?;
        let last = chunks.len();
        for (i, data) in chunks.into_iter().enumerate() {
            stream.send_data(data, i + 1 == last && trailers.is_none()).map_err(|e| self.shared.broke(&e))?;
        }
        if let Some(trailers) = trailers {
            stream.send_trailers(trailers).map_err(|e| self.shared.broke(&e))?;
        }
        response.await.map_err(|e| self.shared.broke(&e))
    }
}

impl Shared {
    fn current(&self) -> Option<Live> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Drops connection `id` so the next call opens a new one.
    fn forget(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if live.as_ref().is_some_and(|l| l.id == id) {
            *live = None;
        }
    }

    /// The status for an `h2` failure. A stream the broker reset keeps the
    /// code its reason maps to (gRPC's HTTP/2 mapping); anything else means
    /// the connection is gone, which is `UNAVAILABLE`.
    fn broke(&self, e: &h2::Error) -> Status {
        if e.is_reset() && e.is_remote() {
            let code = match e.reason() {
                Some(h2::Reason::REFUSED_STREAM) => tonic::Code::Unavailable,
                Some(h2::Reason::CANCEL) => tonic::Code::Cancelled,
                Some(h2::Reason::ENHANCE_YOUR_CALM) => tonic::Code::ResourceExhausted,
                _ => tonic::Code::Internal,
            };
            return Status::new(code, format!("{} reset the stream: {e}", self.address));
        }
        Status::unavailable(format!("connection to {} broke: {e}", self.address))
    }
}

/// Opens a connection and spawns the task that drives it.
async fn open(shared: &Arc<Shared>) -> Result<Live, Status> {
    static IDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let address = &shared.address;
    let unreachable = |what: String| Status::unavailable(format!("cannot connect to {address}: {what}"));
    let settings = &shared.settings;
    let handshake = async {
        let tcp = connect_tcp(address, settings.source).await.map_err(|e| unreachable(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .handshake::<_, Bytes>(tcp)
            .await
            .map_err(|e| unreachable(format!("HTTP/2 handshake failed: {e}")))
    };
    let (send, mut connection) = tokio::time::timeout(settings.connect_timeout, handshake)
        .await
        .map_err(|_| unreachable(format!("timed out after {:?}", settings.connect_timeout)))??;
    let id = IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let pings = connection.ping_pong();
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    let owner = Arc::downgrade(shared);
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection to a broker ended");
                }
            }
            () = keepalive(pings, interval, timeout) => tracing::debug!("a broker stopped answering pings; closing its connection"),
        }
        if let Some(shared) = Weak::upgrade(&owner) {
            shared.forget(id);
        }
    });
    Ok(Live { send, id })
}

/// The TCP connection to `address` (resolved here), from `source` when set.
async fn connect_tcp(address: &str, source: Option<IpAddr>) -> std::io::Result<tokio::net::TcpStream> {
    let Some(source) = source else { return tokio::net::TcpStream::connect(address).await };
    let mut last = None;
    for to in tokio::net::lookup_host(address).await? {
        let socket = match to {
            SocketAddr::V4(_) if source.is_ipv4() => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) if source.is_ipv6() => tokio::net::TcpSocket::new_v6()?,
            _ => continue,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(to).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, format!("no address of the family of {source}"))
    }))
}

/// Pings every `interval`; returns when a ping goes unanswered for
/// `timeout` (never, without a `PingPong`).
async fn keepalive(pings: Option<h2::PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut pings) = pings else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection ended: its own future reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// The `grpc-timeout` header's value (`<digits><unit>`, at most 8 digits).
fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl tower_service::Service<http::Request<tonic::body::Body>> for Connection {
    type Response = http::Response<ResponseBody>;
    type Error = Status;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Status>> + Send>>;

    /// Always ready: readiness is awaited inside the call, on the connection.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.clone().call(request))
    }
}

/// A response's body: its DATA frames, then its trailers (where gRPC puts
/// the status). Releases flow-control window as the data is taken.
pub struct ResponseBody {
    body: h2::RecvStream,
    shared: Arc<Shared>,
    /// The trailers were asked for: the data has ended.
    trailers: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if !this.trailers {
            match std::task::ready!(this.body.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Failing to release only means the stream has ended.
                    let _ = this.body.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(this.shared.broke(&e)))),
                None => this.trailers = true,
            }
        }
        match std::task::ready!(this.body.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(this.shared.broke(&e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let h = |v: &'static str| {
            let mut m = http::HeaderMap::new();
            m.insert("grpc-timeout", http::HeaderValue::from_static(v));
            grpc_timeout(&m)
        };
        assert_eq!(h("30S"), Some(Duration::from_secs(30)));
        assert_eq!(h("1500m"), Some(Duration::from_millis(1500)));
        assert_eq!(h("2M"), Some(Duration::from_secs(120)));
        assert_eq!(h("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(h("7u"), Some(Duration::from_micros(7)));
        assert_eq!(h("9n"), Some(Duration::from_nanos(9)));
        assert_eq!(h("10x"), None);
        assert_eq!(h("S"), None);
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    #[test]
    fn an_address_needs_a_port_and_no_other_scheme() {
        let t = ConnectionSettings::default;
        assert!(Connection::lazy("127.0.0.1:9092", t()).is_ok());
        assert!(Connection::lazy("http://localhost:9092", t()).is_ok());
        assert!(Connection::lazy("https://localhost:9092", t()).unwrap_err().contains("only plain"));
        assert!(Connection::lazy("localhost", t()).unwrap_err().contains("port"));
    }

    fn request(timeout: Option<&'static str>) -> http::Request<tonic::body::Body> {
        let mut b = http::Request::builder().method("POST").uri("/t.S/M").header("content-type", "application/grpc");
        if let Some(t) = timeout {
            b = b.header("grpc-timeout", t);
        }
        b.body(tonic::body::Body::empty()).unwrap()
    }

    /// Serves HTTP/2 on a local port: `answer` decides, per connection
    /// number, whether its requests get an answer (`true`) or the
    /// connection stops being served after its first request (`false`).
    async fn server(answer: fn(usize) -> bool) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            for n in 0.. {
                let (tcp, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(tcp).await.unwrap();
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        if !answer(n) {
                            // Not polled from here on: no answers, no pongs.
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        let head = http::Response::builder().status(200).body(()).unwrap();
                        let mut stream = respond.send_response(head, false).unwrap();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        stream.send_trailers(trailers).unwrap();
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_call_nobody_answers_ends_at_its_grpc_timeout() {
        let address = server(|_| false).await;
        let mut c = Connection::lazy(&address, ConnectionSettings::default()).unwrap();
        let started = std::time::Instant::now();
        let Err(e) = tower_service::Service::call(&mut c, request(Some("200m"))).await else { panic!("answered") };
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_peer_that_stops_answering_pings_is_dropped_and_the_next_call_reconnects() {
        let address = server(|n| n > 0).await;
        let settings = ConnectionSettings {
            keepalive_interval: Duration::from_millis(100),
            keepalive_timeout: Duration::from_millis(200),
            ..ConnectionSettings::default()
        };
        let mut c = Connection::lazy(&address, settings).unwrap();
        // No grpc-timeout: only the keepalive can end this call.
        let call = tower_service::Service::call(&mut c, request(None));
        let Err(e) = tokio::time::timeout(Duration::from_secs(10), call).await.expect("keepalive ended it") else {
            panic!("answered")
        };
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(e.message().contains(&address), "{e}");
        // The next call opens a new connection, which is served.
        let answer = tower_service::Service::call(&mut c, request(Some("5S"))).await.expect("served");
        assert_eq!(answer.status(), http::StatusCode::OK);
    }

    #[tokio::test]
    async fn a_broker_that_is_not_there_is_unavailable_with_its_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        drop(listener);
        let mut c = Connection::lazy(&address, ConnectionSettings::default()).unwrap();
        let request = http::Request::builder().uri("/x").body(tonic::body::Body::empty()).unwrap();
        let Err(e) = tower_service::Service::call(&mut c, request).await else { panic!("answered") };
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains(&address), "{e}");
    }
}
