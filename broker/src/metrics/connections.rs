//! The gRPC listener's connection and traffic counts: a TCP stream that
//! counts itself while open, and adds the bytes each read and write moved
//! to two process-wide totals.
//!
//! The counts are process-wide, like the recorder they are exported through
//! (a test running several brokers in one process sees their sum); a
//! deployment runs one broker per process. Counting costs one relaxed
//! atomic add per completed read or write call, never per byte: the reads
//! and writes are hyper's, of buffers of up to tens of KiB.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connections open right now (all brokers of the process).
static OPEN: AtomicI64 = AtomicI64::new(0);

/// Bytes read from gRPC connections since the process started.
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// Bytes written to gRPC connections since the process started.
static SENT: AtomicU64 = AtomicU64::new(0);

/// Connections open to the gRPC listeners of this process.
pub fn open_connections() -> i64 {
    OPEN.load(Ordering::Relaxed)
}

/// Bytes received on the gRPC listeners' connections of this process
/// (clients' and peers' requests, including replica fetches), TCP payload
/// only.
pub fn received_bytes() -> u64 {
    RECEIVED.load(Ordering::Relaxed)
}

/// Bytes sent on the gRPC listeners' connections of this process (answers,
/// including the records of replica fetches), TCP payload only.
pub fn sent_bytes() -> u64 {
    SENT.load(Ordering::Relaxed)
}

/// A gRPC connection, counted in [`open_connections`] until dropped, its
/// traffic in [`received_bytes`] and [`sent_bytes`].
#[derive(Debug)]
pub struct CountedStream {
    inner: TcpStream,
}

impl CountedStream {
    /// Counts `inner` as open.
    pub fn new(inner: TcpStream) -> CountedStream {
        OPEN.fetch_add(1, Ordering::Relaxed);
        CountedStream { inner }
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connected for CountedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            count(&RECEIVED, buf.filled().len().saturating_sub(before));
        }
        polled
    }
}

/// Adds `bytes` to `total` (nothing for an empty call: no atomic op).
fn count(total: &AtomicU64, bytes: usize) {
    if bytes > 0 {
        total.fetch_add(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Counts what a completed write wrote in [`SENT`], and passes the result on.
fn counted_write(polled: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = polled {
        count(&SENT, n);
    }
    polled
}

impl AsyncWrite for CountedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        counted_write(Pin::new(&mut self.inner).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        counted_write(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A connected pair: the accepted end counted, the other plain.
    async fn pair() -> (CountedStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (CountedStream::new(accepted), peer)
    }

    // The totals are process-wide and other tests may serve at the same
    // time: each check is on a lower bound of the change.
    #[tokio::test]
    async fn reads_and_writes_add_their_bytes_to_the_totals() {
        let (mut counted, mut peer) = pair().await;
        let (received, sent) = (received_bytes(), sent_bytes());
        peer.write_all(&[7u8; 3000]).await.unwrap();
        let mut got = vec![0u8; 3000];
        counted.read_exact(&mut got).await.unwrap();
        assert!(received_bytes() - received >= 3000);

        counted.write_all(&[1u8; 1000]).await.unwrap();
        // One vectored write (it may be short), the rest plainly.
        let tail = [[2u8; 200].as_slice(), [3u8; 300].as_slice()].concat();
        let written = counted.write_vectored(&[IoSlice::new(&tail[..200]), IoSlice::new(&tail[200..])]).await.unwrap();
        assert!(written > 0);
        counted.write_all(&tail[written..]).await.unwrap();
        counted.flush().await.unwrap();
        let mut echoed = vec![0u8; 1500];
        peer.read_exact(&mut echoed).await.unwrap();
        assert!(sent_bytes() - sent >= 1500);
    }
}
