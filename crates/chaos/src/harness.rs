//! The harness: a leader cluster of real `regatta` processes on 127.0.0.1
//! with a proxy on every peer link (one per ordered pair) and every client
//! link; clients that run gets, puts, compare-and-sets and deletes on a
//! small key set through etcd's API and record each operation's invoke and
//! completion; a nemesis that kills, restarts and partitions nodes; then
//! the checker over the history.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regatta_server::proto::etcdserverpb as pb;
use serde::Serialize;
use tonic::transport::Channel;

use crate::checker::{self, Op, Operation, Outcome, Value, Verdict};
use crate::proxy::Proxy;

/// Faults the nemesis may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGKILL a node, restart it later.
    Kill,
    /// Cut every link to and from a node, heal later.
    Partition,
    /// Delay every chunk on the links to and from a node by 50 ms.
    Slow,
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The `regatta` binary.
    pub binary: PathBuf,
    /// A scratch directory.
    pub dir: PathBuf,
    /// Nodes (3 or 5).
    pub nodes: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Keys the clients use.
    pub keys: u64,
    /// How long the workload runs.
    pub duration: Duration,
    /// The faults to draw from.
    pub faults: Vec<Fault>,
    /// The seed of every random choice.
    pub seed: u64,
}

/// What a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The faults injected, with their times in ms.
    pub schedule: Vec<(u64, String)>,
    /// Operations that completed ok.
    pub ok: usize,
    /// Operations that definitely failed.
    pub fail: usize,
    /// Operations whose outcome is unknown.
    pub info: usize,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Acknowledged puts missing from the final state.
    pub lost_writes: usize,
    /// The whole history.
    pub history: Vec<Operation>,
}

/// The longest a client waits for one operation.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn free_address() -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.local_addr()
}

struct Node {
    id: u64,
    raft: SocketAddr,
    api: SocketAddr,
    members: String,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, binary: &Path) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))?;
        let child = Command::new(binary)
            .args(["leader", "--log-level", "warn", "--raft.node-id"])
            .arg(self.id.to_string())
            .arg("--raft.address")
            .arg(self.raft.to_string())
            .arg("--raft.initial-members")
            .arg(&self.members)
            .arg("--api.address")
            .arg(self.api.to_string())
            .arg("--api.request-timeout-ms")
            .arg("2000")
            .arg("--data-dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cluster and its proxies.
struct Cluster {
    nodes: Vec<Node>,
    /// (from, to) → the proxy `from` uses to reach `to`.
    peer_proxies: BTreeMap<(u64, u64), Proxy>,
    /// One client proxy per node.
    client_proxies: Vec<Proxy>,
}

impl Cluster {
    async fn start(config: &RunConfig) -> std::io::Result<Cluster> {
        let count = config.nodes;
        let mut rafts = Vec::new();
        let mut apis = Vec::new();
        for _ in 0..count {
            rafts.push(free_address()?);
            apis.push(free_address()?);
        }
        let any: SocketAddr = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
        let mut peer_proxies = BTreeMap::new();
        for from in 1..=count {
            for to in 1..=count {
                if from != to {
                    let proxy = Proxy::start(any, rafts[to as usize - 1]).await?;
                    peer_proxies.insert((from, to), proxy);
                }
            }
        }
        let mut client_proxies = Vec::new();
        for api in &apis {
            client_proxies.push(Proxy::start(any, *api).await?);
        }
        let mut nodes = Vec::new();
        for id in 1..=count {
            let members = (1..=count)
                .map(|other| {
                    let address = if other == id {
                        rafts[id as usize - 1]
                    } else {
                        peer_proxies[&(id, other)].address()
                    };
                    format!("{other}={address}")
                })
                .collect::<Vec<_>>()
                .join(",");
            let mut node = Node {
                id,
                raft: rafts[id as usize - 1],
                api: apis[id as usize - 1],
                members,
                dir: config.dir.join(format!("node{id}")),
                child: None,
            };
            node.start(&config.binary)?;
            nodes.push(node);
        }
        Ok(Cluster {
            nodes,
            peer_proxies,
            client_proxies,
        })
    }

    fn slow(&self, node: u64, delay: Duration) {
        for ((from, to), proxy) in &self.peer_proxies {
            if *from == node || *to == node {
                proxy.slow(delay);
            }
        }
    }

    fn partition(&self, node: u64, cut: bool) {
        for ((from, to), proxy) in &self.peer_proxies {
            if *from == node || *to == node {
                if cut {
                    proxy.cut();
                } else {
                    proxy.heal();
                }
            }
        }
    }
}

async fn connect(address: SocketAddr) -> Option<pb::kv_client::KvClient<Channel>> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(4));
    Some(pb::kv_client::KvClient::new(endpoint.connect_lazy()))
}

/// Whether a failed write may still have taken effect.
fn write_outcome(status: &tonic::Status) -> Outcome {
    // The connection was never made: the request never left.
    let message = format!("{status:?}");
    if message.contains("tcp connect error") || message.contains("Connection refused") {
        return Outcome::Fail;
    }
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::ResourceExhausted
        | tonic::Code::NotFound
        | tonic::Code::OutOfRange
        | tonic::Code::Unimplemented => Outcome::Fail,
        _ => Outcome::Info,
    }
}

async fn run_op(client: &mut pb::kv_client::KvClient<Channel>, key: &str, op: &Op) -> Outcome {
    match op {
        Op::Get => match client
            .range(pb::RangeRequest {
                key: key.into(),
                ..pb::RangeRequest::default()
            })
            .await
        {
            Ok(response) => Outcome::Read(
                response
                    .into_inner()
                    .kvs
                    .first()
                    .map(|kv| String::from_utf8_lossy(&kv.value).to_string()),
            ),
            Err(_) => Outcome::Fail,
        },
        Op::Put(value) => match client
            .put(pb::PutRequest {
                key: key.into(),
                value: value.clone().into_bytes(),
                ..pb::PutRequest::default()
            })
            .await
        {
            Ok(_) => Outcome::Done,
            Err(status) => write_outcome(&status),
        },
        Op::Delete => match client
            .delete_range(pb::DeleteRangeRequest {
                key: key.into(),
                ..pb::DeleteRangeRequest::default()
            })
            .await
        {
            Ok(_) => Outcome::Done,
            Err(status) => write_outcome(&status),
        },
        Op::Cas { expected, new } => {
            use pb::compare::{CompareResult, CompareTarget, TargetUnion};
            let compare = match expected {
                Some(value) => pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Value as i32,
                    key: key.into(),
                    range_end: Vec::new(),
                    target_union: Some(TargetUnion::Value(value.clone().into_bytes())),
                },
                None => pb::Compare {
                    result: CompareResult::Equal as i32,
                    target: CompareTarget::Version as i32,
                    key: key.into(),
                    range_end: Vec::new(),
                    target_union: Some(TargetUnion::Version(0)),
                },
            };
            let request = pb::TxnRequest {
                compare: vec![compare],
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: key.into(),
                        value: new.clone().into_bytes(),
                        ..pb::PutRequest::default()
                    })),
                }],
                failure: Vec::new(),
            };
            match client.txn(request).await {
                Ok(response) => Outcome::Swapped(response.into_inner().succeeded),
                Err(status) => write_outcome(&status),
            }
        }
    }
}

/// Runs the workload and the nemesis, then checks the history.
pub async fn run(config: RunConfig) -> std::io::Result<Report> {
    std::fs::create_dir_all(&config.dir)?;
    let cluster = Arc::new(Mutex::new(Cluster::start(&config).await?));
    let client_addresses: Vec<SocketAddr> = cluster
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .client_proxies
        .iter()
        .map(Proxy::address)
        .collect();
    // Let the cluster elect and create the etcd table.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    let history: Arc<Mutex<Vec<Operation>>> = Arc::default();
    let mut workers = Vec::new();
    for process in 0..config.clients {
        let address = client_addresses[(process % client_addresses.len() as u64) as usize];
        let (history, keys, duration) = (Arc::clone(&history), config.keys, config.duration);
        let mut rng = Rng(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (process + 1));
        workers.push(tokio::spawn(async move {
            let Some(mut client) = connect(address).await else {
                return;
            };
            let mut written = 0u64;
            while started.elapsed() < duration {
                let key = format!("k{}", rng.next() % keys.max(1));
                written += 1;
                let value = format!("{process}-{written}");
                let op = match rng.next() % 10 {
                    0..=3 => Op::Get,
                    4..=6 => Op::Put(value),
                    7 => Op::Delete,
                    _ => Op::Cas {
                        expected: (!rng.next().is_multiple_of(4))
                            .then(|| format!("{process}-{}", written.saturating_sub(1))),
                        new: value,
                    },
                };
                let call = started.elapsed().as_micros() as u64;
                let outcome =
                    match tokio::time::timeout(OPERATION_TIMEOUT, run_op(&mut client, &key, &op))
                        .await
                    {
                        Ok(outcome) => outcome,
                        // No answer: a write's outcome is unknown, a read's
                        // does not matter.
                        Err(_) if op == Op::Get => Outcome::Fail,
                        Err(_) => Outcome::Info,
                    };
                let ret = started.elapsed().as_micros() as u64;
                let failed = matches!(outcome, Outcome::Fail | Outcome::Info);
                history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Operation {
                        process,
                        key,
                        op,
                        call,
                        ret,
                        outcome,
                    });
                if failed {
                    // Do not flood a node that is down or cut off.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }
    // The nemesis: a fault every 2 s, healed 1 s later.
    let mut schedule = Vec::new();
    let mut rng = Rng(config.seed ^ 0xA5A5_5A5A_1234_5678);
    while started.elapsed() + Duration::from_secs(2) < config.duration && !config.faults.is_empty()
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let fault = config.faults[(rng.next() % config.faults.len() as u64) as usize];
        let node = 1 + rng.next() % config.nodes;
        let at = started.elapsed().as_millis() as u64;
        schedule.push((at, format!("{fault:?} node {node}")));
        match fault {
            Fault::Kill => {
                cluster.lock().unwrap_or_else(|p| p.into_inner()).nodes[node as usize - 1].kill();
            }
            Fault::Partition => cluster
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .partition(node, true),
            Fault::Slow => cluster
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .slow(node, Duration::from_millis(50)),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = started.elapsed().as_millis() as u64;
        schedule.push((at, format!("heal node {node}")));
        let mut guard = cluster.lock().unwrap_or_else(|p| p.into_inner());
        match fault {
            Fault::Kill => {
                let binary = config.binary.clone();
                guard.nodes[node as usize - 1].start(&binary)?;
            }
            Fault::Partition => guard.partition(node, false),
            Fault::Slow => guard.slow(node, Duration::ZERO),
        }
    }
    for worker in workers {
        let _ = worker.await;
    }

    // Heal everything, then read the final state linearizably.
    {
        let guard = cluster.lock().unwrap_or_else(|p| p.into_inner());
        for node in 1..=config.nodes {
            guard.partition(node, false);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut finals: BTreeMap<String, Value> = BTreeMap::new();
    if let Some(mut client) = connect(client_addresses[0]).await {
        for key in 0..config.keys {
            let key = format!("k{key}");
            for _ in 0..20 {
                let read =
                    tokio::time::timeout(OPERATION_TIMEOUT, run_op(&mut client, &key, &Op::Get))
                        .await;
                if let Ok(Outcome::Read(value)) = read {
                    finals.insert(key.clone(), value);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let history = std::mem::take(&mut *history.lock().unwrap_or_else(|p| p.into_inner()));
    let count =
        |wanted: fn(&Outcome) -> bool| history.iter().filter(|o| wanted(&o.outcome)).count();
    let ok = count(|o| matches!(o, Outcome::Read(_) | Outcome::Done | Outcome::Swapped(_)));
    let fail = count(|o| *o == Outcome::Fail);
    let info = count(|o| *o == Outcome::Info);
    let lost = if finals.len() as u64 == config.keys {
        checker::lost_writes(&history, &finals)
    } else {
        0
    };
    let verdict = checker::check(&history);
    Ok(Report {
        seed: config.seed,
        schedule,
        ok,
        fail,
        info,
        verdict,
        lost_writes: lost,
        history,
    })
}
