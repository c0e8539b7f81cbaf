//! A test node for process-level tests of `regatta-multiraft` (not the
//! product binary: that is `regatta`). It runs one Raft group over TCP
//! with an in-memory key-value state machine and answers a line protocol
//! on a client port:
//!
//! - `PUT key value` → `OK` once applied, or `ERR <reason>`;
//! - `GET key` → `VAL <value>` (linearizable), or `ERR <reason>`;
//! - `LEADER` → `LEADER <id>` (0 when unknown);
//! - `ADD id` → `OK` once node `id` is a learner (promoted automatically
//!   when caught up); `REMOVE id` → `OK` once it is removed;
//! - `FIRST` → `FIRST <index>`, the first index in this node's log.
//!
//! Usage: `test_node --id 1 --dir D --raft 127.0.0.1:7001
//! --client 127.0.0.1:8001 --peers 1=127.0.0.1:7001,2=...,3=...
//! [--snapshot-every N] [--join true]`
//!
//! Compaction is off unless `--snapshot-every` is given. The state machine
//! is in memory, so a node compacting this way must not be restarted on
//! its data directory: only wiped (it then rejoins with `--join true`,
//! through a snapshot).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use regatta_multiraft::{HostConfig, NodeHost, StateMachine, TcpConfig, TcpTransport, Transport};
use regatta_raft::{ConfChange, LogIndex, NodeId};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const GROUP: GroupId = GroupId(1);

#[derive(Default)]
struct Kv {
    data: Arc<Mutex<BTreeMap<String, String>>>,
    applied: LogIndex,
}

impl StateMachine for Kv {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        let text = String::from_utf8_lossy(command);
        if let Some((key, value)) = text.split_once(' ') {
            if let Ok(mut data) = self.data.lock() {
                data.insert(key.to_string(), value.to_string());
            }
        }
        self.applied = index;
        Bytes::new()
    }
    fn read(&self, query: &Bytes) -> Bytes {
        let key = String::from_utf8_lossy(query).to_string();
        let value = self
            .data
            .lock()
            .ok()
            .and_then(|data| data.get(&key).cloned());
        Bytes::from(value.unwrap_or_default())
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }
    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = {
            let data = self
                .data
                .lock()
                .map(|data| data.clone())
                .unwrap_or_default();
            Bytes::from(
                data.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        };
        Box::new(bytes)
    }
    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        if let Ok(mut map) = self.data.lock() {
            map.clear();
            for line in String::from_utf8_lossy(data).lines() {
                if let Some((k, v)) = line.split_once(' ') {
                    map.insert(k.to_string(), v.to_string());
                }
            }
        }
        self.applied = index;
        Ok(())
    }
}

struct Arguments {
    id: u64,
    dir: String,
    raft: SocketAddr,
    client: SocketAddr,
    peers: HashMap<NodeId, regatta_multiraft::PeerAddress>,
    snapshot_every_entries: u64,
    join: bool,
}

fn parse_arguments() -> Result<Arguments, String> {
    let mut values: HashMap<String, String> = HashMap::new();
    let mut arguments = std::env::args().skip(1);
    while let Some(flag) = arguments.next() {
        let value = arguments.next().ok_or(format!("{flag} needs a value"))?;
        values.insert(flag.trim_start_matches("--").to_string(), value);
    }
    let get = |name: &str| {
        values
            .get(name)
            .cloned()
            .ok_or(format!("--{name} is required"))
    };
    let address = |name: &str| {
        get(name)?
            .parse::<SocketAddr>()
            .map_err(|e| format!("--{name}: {e}"))
    };
    let mut peers = HashMap::new();
    for pair in get("peers")?.split(',') {
        let (id, address) = pair
            .split_once('=')
            .ok_or(format!("--peers: {pair} is not id=host:port"))?;
        let id: u64 = id.parse().map_err(|e| format!("--peers: {e}"))?;
        peers.insert(
            NodeId(id),
            address.parse().map_err(|e| format!("--peers: {e}"))?,
        );
    }
    Ok(Arguments {
        id: get("id")?.parse().map_err(|e| format!("--id: {e}"))?,
        dir: get("dir")?,
        raft: address("raft")?,
        client: address("client")?,
        peers,
        snapshot_every_entries: match values.get("snapshot-every") {
            Some(value) => value
                .parse()
                .map_err(|e| format!("--snapshot-every: {e}"))?,
            None => 0,
        },
        join: match values.get("join").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(format!("--join: {other} is not true or false")),
        },
    })
}

async fn serve_client(host: NodeHost, stream: tokio::net::TcpStream) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.splitn(3, ' ');
        let answer = match (words.next(), words.next(), words.next()) {
            (Some("PUT"), Some(key), Some(value)) => match host
                .propose(GROUP, Bytes::from(format!("{key} {value}")))
                .await
            {
                Ok(_) => "OK".to_string(),
                Err(error) => format!("ERR {error}"),
            },
            (Some("GET"), Some(key), None) => match host
                .read_linearizable(GROUP, Bytes::from(key.to_string()))
                .await
            {
                Ok(value) => format!("VAL {}", String::from_utf8_lossy(&value)),
                Err(error) => format!("ERR {error}"),
            },
            (Some("LEADER"), None, None) => match host.status(GROUP).await {
                Ok(status) => format!(
                    "LEADER {}",
                    status.soft_state.leader.map(|id| id.0).unwrap_or(0)
                ),
                Err(error) => format!("ERR {error}"),
            },
            (Some(verb @ ("ADD" | "REMOVE")), Some(id), None) => match id.parse::<u64>() {
                Ok(id) => {
                    let change = if verb == "ADD" {
                        ConfChange::AddLearner {
                            node: NodeId(id),
                            auto_promote: true,
                        }
                    } else {
                        ConfChange::Remove { node: NodeId(id) }
                    };
                    match host.change_membership(GROUP, change).await {
                        Ok(()) => "OK".to_string(),
                        Err(error) => format!("ERR {error}"),
                    }
                }
                Err(error) => format!("ERR node id {id}: {error}"),
            },
            (Some("FIRST"), None, None) => match host.status(GROUP).await {
                Ok(status) => format!("FIRST {}", status.first_index.0),
                Err(error) => format!("ERR {error}"),
            },
            _ => "ERR unknown command; use PUT key value, GET key, LEADER, ADD id, REMOVE id or FIRST"
                .to_string(),
        };
        if write
            .write_all(format!("{answer}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

fn main() {
    let arguments = match parse_arguments() {
        Ok(arguments) => arguments,
        Err(error) => {
            eprintln!("test_node: {error}");
            std::process::exit(2);
        }
    };
    let runtime = match regatta_multiraft::runtime::builder()
        .worker_threads(2)
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("test_node: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    runtime.block_on(async move {
        let run = async {
            let raft_listener = TcpListener::bind(arguments.raft)
                .await
                .map_err(|e| format!("bind {}: {e}", arguments.raft))?;
            let client_listener = TcpListener::bind(arguments.client)
                .await
                .map_err(|e| format!("bind {}: {e}", arguments.client))?;
            let mut tcp = TcpConfig::new(NodeId(arguments.id), 1);
            tcp.peers = arguments.peers.clone();
            let transport = TcpTransport::start(tcp, raft_listener);
            let mut config = HostConfig::new(NodeId(arguments.id), &arguments.dir);
            config.snapshot_every_entries = arguments.snapshot_every_entries;
            // Keep few entries behind a compaction, so that a node joining
            // later needs the snapshot.
            config.compaction_overhead_entries = 10;
            let wal =
                Arc::new(Wal::open(WalConfig::new(&arguments.dir)).map_err(|e| e.to_string())?);
            let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
            let host = NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current())
                .map_err(|e| e.to_string())?;
            transport.attach(&host);
            let mut voters: Vec<NodeId> = if arguments.join {
                Vec::new()
            } else {
                arguments.peers.keys().copied().collect()
            };
            voters.sort();
            host.start_group(GROUP, voters, Box::new(Kv::default()))
                .map_err(|e| e.to_string())?;
            println!("ready");
            loop {
                let (stream, _) = client_listener.accept().await.map_err(|e| e.to_string())?;
                tokio::spawn(serve_client(host.clone(), stream));
            }
            #[allow(unreachable_code)]
            Ok::<(), String>(())
        };
        if let Err(error) = run.await {
            eprintln!("test_node: {error}");
            tokio::time::sleep(Duration::from_millis(10)).await;
            std::process::exit(1);
        }
    });
}
