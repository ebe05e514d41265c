//! A fault-injecting TCP proxy in front of a broker's port: while cut, it
//! drops every connection through it and refuses new ones, so the broker
//! is unreachable without iptables. It can also refuse connections from one
//! source address only (a broker whose `peer_source_address` is that
//! address), which cuts that broker's own links to this one.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxy; stops when dropped.
pub struct Proxy {
    /// Where clients and peers connect.
    pub address: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    blocked: Arc<watch::Sender<BTreeSet<IpAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards connections on `listener` to `target`.
    pub fn start(listener: TcpListener, target: SocketAddr) -> Proxy {
        let address = listener.local_addr().expect("proxy address");
        let cut = Arc::new(watch::channel(false).0);
        let blocked = Arc::new(watch::channel(BTreeSet::new()).0);
        let task = tokio::spawn(accept(listener, target, cut.clone(), blocked.clone()));
        Proxy { address, cut, blocked, task }
    }

    /// Drops connections from `source` and refuses new ones from it.
    pub fn block(&self, source: IpAddr) {
        self.blocked.send_modify(|b| {
            b.insert(source);
        });
    }

    /// Lets `source` through again.
    pub fn unblock(&self, source: IpAddr) {
        self.blocked.send_modify(|b| {
            b.remove(&source);
        });
    }

    /// Drops every connection and refuses new ones until [`Proxy::heal`].
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Lets connections through again.
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    cut: Arc<watch::Sender<bool>>,
    blocked: Arc<watch::Sender<BTreeSet<IpAddr>>>,
) {
    loop {
        let Ok((inbound, from)) = listener.accept().await else { continue };
        let source = from.ip();
        if *cut.borrow() || blocked.borrow().contains(&source) {
            drop(inbound);
            continue;
        }
        let (mut cut, mut blocked) = (cut.subscribe(), blocked.subscribe());
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let mut inbound = inbound;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = cut.wait_for(|c| *c) => {}
                _ = blocked.wait_for(|b| b.contains(&source)) => {}
            }
        });
    }
}
