//! An in-process broker on 127.0.0.1:0 with its own data directory.

use std::path::Path;
use std::time::{Duration, Instant};

use tally_broker::{BrokerConfig, BrokerError};
use tally_client::Client;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestBroker {
    pub address: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), BrokerError>>>,
}

/// A config with small limits so rolls, retention and compaction happen in tests.
pub fn test_config(data_dir: &Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: data_dir.to_path_buf(),
        retention_check_interval_ms: 100,
        log_cleaner_backoff_ms: 100,
        offsets_topic_num_partitions: 3,
        group_consumer_min_session_timeout_ms: 500,
        ..BrokerConfig::default()
    }
}

impl TestBroker {
    pub async fn start(data_dir: &Path) -> TestBroker {
        Self::start_with(test_config(data_dir)).await
    }

    pub async fn start_with(config: BrokerConfig) -> TestBroker {
        Self::start_at(config, "127.0.0.1:0").await
    }

    /// Starts on a given address (to restart a broker where clients expect
    /// it), and waits until it serves: registered with its controller and
    /// unfenced (a clean shutdown fenced the previous incarnation).
    pub async fn start_at(config: BrokerConfig, address: &str) -> TestBroker {
        let listener = tokio::net::TcpListener::bind(address).await.expect("bind");
        Self::start_on(config, listener).await
    }

    /// Starts on a bound listener (a cluster's voters know their addresses
    /// before any starts) and waits until it serves.
    pub async fn start_on(config: BrokerConfig, listener: tokio::net::TcpListener) -> TestBroker {
        let node_id = config.node_id;
        let address = listener.local_addr().expect("addr").to_string();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(tally_broker::run(config, listener, async move {
            let _ = rx.await;
        }));
        let broker = TestBroker { address, stop: Some(tx), task: Some(task) };
        // A broker that failed to start (tests of that) has nothing to wait for.
        let Ok(client) = Client::builder().bootstrap([broker.address.clone()]).connect().await else {
            return broker;
        };
        wait_for(Duration::from_secs(20), async || {
            let cluster = client.admin().describe_cluster().await;
            if !cluster.is_ok_and(|c| c.brokers.iter().any(|b| b.id == node_id && !b.fenced)) {
                return false;
            }
            // And its topics have their leaders back (a single broker leads them all).
            let Ok(topics) = client.admin().list_topics().await else { return false };
            for t in topics {
                let Ok(d) = client.admin().describe_topic(&t.name).await else { return false };
                if d.partitions.iter().any(|p| p.leader.is_none()) {
                    return false;
                }
            }
            true
        })
        .await;
        broker
    }

    pub async fn client(&self) -> Client {
        Client::builder().bootstrap([self.address.clone()]).connect().await.expect("connect")
    }

    /// Graceful shutdown; returns the broker's result.
    pub async fn stop(mut self) -> Result<(), BrokerError> {
        let _ = self.stop.take().expect("running").send(());
        self.task.take().expect("running").await.expect("broker task")
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn wait_for(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A raw gRPC client of the `Tally` service at `address` (connects on the
/// first call).
pub fn raw_client(address: &str) -> tally_proto::v1::tally_client::TallyClient<tally_proto::connection::Connection> {
    let connection = tally_proto::connection::Connection::lazy(address, Default::default()).expect("address");
    tally_proto::v1::tally_client::TallyClient::new(connection)
}

/// A TCP forwarder in front of a broker that counts the bytes clients send
/// through it: a test sees a request reach the broker's socket.
pub struct CountingProxy {
    /// Where clients connect.
    pub address: String,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Forwards connections on `listener` to `target`.
    pub fn start(listener: tokio::net::TcpListener, target: String) -> CountingProxy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = listener.local_addr().expect("addr").to_string();
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = sent.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let (target, counter) = (target.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                    let (mut from_client, mut to_client) = inbound.into_split();
                    let (mut from_broker, mut to_broker) = outbound.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 << 10];
                        while let Ok(n) = from_client.read(&mut buf).await {
                            if n == 0 || to_broker.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            counter.fetch_add(n as u64, std::sync::atomic::Ordering::SeqCst);
                        }
                    };
                    let down = tokio::io::copy(&mut from_broker, &mut to_client);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        CountingProxy { address, sent, task }
    }

    /// Bytes forwarded from clients to the broker so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
