//! `regatta`: runs a Regatta node. `regatta leader --dev` starts a
//! single-node leader cluster on 127.0.0.1, serving Regatta's and etcd's
//! APIs on `--api.address`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand};
use regatta_multiraft::PeerAddress;
use regatta_raft::NodeId;
use regatta_server::{Node, NodeConfig};

/// mimalloc rather than the system allocator: see
/// `docs/decisions/0008-mimalloc.md`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod backup;
mod bench;
mod client;
mod config;

/// Regatta: a geo-distributed key-value store with etcd's v3 API.
///
/// A leader cluster takes writes; follower clusters in other locations
/// replicate it and serve reads locally. Every table is its own Raft group. etcdctl and etcd clients
/// work against `--api.address`; the etcd API uses the table named by
/// `--etcd.table`.
#[derive(Parser, Debug)]
#[command(name = "regatta", version, about, long_about = None, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs a node of the leader cluster, which accepts writes.
    Leader(LeaderArgs),
    /// Runs a node of a follower cluster: it replicates every table of the
    /// leader cluster at `--replication.leader-address`, serves reads
    /// locally and forwards writes to the leader cluster.
    Follower(FollowerArgs),
    /// Prints the version.
    Version,
    /// Reads and writes keys of a table through the regatta.v1 API.
    Kv {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: client::KvCommand,
    },
    /// Creates, lists and deletes tables.
    Table {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: client::TableCommand,
    },
    /// Lists and changes the cluster's members.
    Member {
        #[command(flatten)]
        connection: client::Connection,
        #[command(subcommand)]
        command: client::MemberCommand,
    },
    /// Prints a node's status: each table's leader, term, commit and
    /// applied index and size, and on a follower cluster its replication
    /// lag.
    Status {
        #[command(flatten)]
        connection: client::Connection,
    },
    /// Load generator over the etcd v3 API (for Regatta or etcd).
    Bench(bench::BenchArgs),
    /// Copies every table (or `--table`) into a directory: one file per
    /// table and a manifest with their SHA-256 checksums (admin).
    Backup(backup::BackupArgs),
    /// Checks a backup's checksums, then replaces the leader cluster's
    /// tables with it; changes nothing without
    /// `--yes-i-know-this-overwrites-data` (admin).
    Restore(backup::RestoreArgs),
    /// Makes a follower cluster's table (or `--all`) install a fresh copy
    /// of the leader cluster's; reads see the old copy until it is in
    /// (admin).
    Reset(backup::ResetArgs),
}

#[derive(Args, Debug)]
struct LeaderArgs {
    /// A YAML file with the same keys as these flags (nested or dotted);
    /// flags and REGATTA_… environment variables override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Development mode: a single-node cluster of this node, keeping its
    /// data in `--data-dir` (default ./regatta-data). Other flags keep
    /// their meaning; the cluster flags (--raft.initial-members,
    /// --raft.peer-addresses, --raft.join) are refused with it.
    #[arg(
        long,
        env = "REGATTA_DEV",
        value_parser = clap::builder::BoolishValueParser::new(),
        conflicts_with_all = ["raft_initial_members", "raft_peer_addresses", "raft_join"]
    )]
    dev: bool,

    /// This node's id: non-zero, unique in the cluster.
    #[arg(
        long = "raft.node-id",
        default_value_t = 1,
        env = "REGATTA_RAFT_NODE_ID"
    )]
    raft_node_id: u64,

    /// The cluster's id; nodes of another cluster are refused.
    #[arg(
        long = "raft.cluster-id",
        default_value_t = 1,
        env = "REGATTA_RAFT_CLUSTER_ID"
    )]
    raft_cluster_id: u64,

    /// The address this node's peers reach it on (Raft traffic), as
    /// `host:port`: an IP address or a host name, which peers resolve each
    /// time they connect (so a node whose name moves to another IP is
    /// followed). This node listens on the first address the name resolves
    /// to at start-up that it can bind, unless `--raft.listen-address` is
    /// given.
    #[arg(
        long = "raft.address",
        default_value = "127.0.0.1:5012",
        env = "REGATTA_RAFT_ADDRESS"
    )]
    raft_address: PeerAddress,

    /// Where to listen for peers, when it differs from `--raft.address`
    /// (the address peers dial, and the one `--raft.initial-members`
    /// gives this node): `0.0.0.0:5012` listens on every interface, for a
    /// node behind a NAT or in a container. Default: `--raft.address`.
    #[arg(
        long = "raft.listen-address",
        env = "REGATTA_RAFT_LISTEN_ADDRESS",
        value_parser = listen_address
    )]
    raft_listen_address: Option<SocketAddr>,

    /// Every initial member as `id=host:port`, comma-separated, this node
    /// included (the host an IP address or a name). Empty means a
    /// single-node cluster of this node.
    #[arg(
        long = "raft.initial-members",
        value_delimiter = ',',
        env = "REGATTA_RAFT_INITIAL_MEMBERS"
    )]
    raft_initial_members: Vec<String>,

    /// Where to dial nodes that are not initial members, as `id=host:port`,
    /// comma-separated: nodes added later (`regatta member add`) are
    /// otherwise dialled at the address they record for themselves. For a
    /// proxy or NAT between nodes. These nodes never bootstrap the cluster.
    #[arg(
        long = "raft.peer-addresses",
        value_delimiter = ',',
        env = "REGATTA_RAFT_PEER_ADDRESSES"
    )]
    raft_peer_addresses: Vec<String>,

    /// Join an existing cluster instead of bootstrapping a new one: first
    /// add the node (`regatta member add`), then start it with this flag
    /// and `--raft.initial-members` naming the current members and itself.
    #[arg(
        long = "raft.join",
        env = "REGATTA_RAFT_JOIN",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    raft_join: bool,

    /// On SIGTERM, hand over this node's leaderships and remove it from
    /// the cluster before exiting (for nodes that will not come back).
    /// Without it, SIGTERM only hands over leaderships, as a rolling
    /// restart wants.
    #[arg(
        long = "raft.leave-on-terminate",
        env = "REGATTA_RAFT_LEAVE_ON_TERMINATE",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    raft_leave_on_terminate: bool,

    /// Where the WAL and the tables are kept.
    #[arg(
        long = "data-dir",
        default_value = "regatta-data",
        env = "REGATTA_DATA_DIR"
    )]
    data_dir: PathBuf,

    /// Where the client APIs (Regatta's and etcd's) listen: an IP address
    /// and a port (`0.0.0.0:8443` for every interface). Clients may be
    /// given a host name instead with `--api.advertise-address`.
    #[arg(
        long = "api.address",
        default_value = "127.0.0.1:8443",
        env = "REGATTA_API_ADDRESS",
        value_parser = listen_address
    )]
    api_address: SocketAddr,

    /// The URL clients are told to use for this node's API (MemberList,
    /// which etcd clients use to find the other nodes), when it differs
    /// from `--api.address`: `http://host:port`, or `https://host:port`
    /// when the API serves TLS. Needed when `--api.address` listens on
    /// `0.0.0.0` or sits behind a NAT. Default: `--api.address` with the
    /// API's scheme.
    #[arg(long = "api.advertise-address", env = "REGATTA_API_ADVERTISE_ADDRESS")]
    api_advertise_address: Option<String>,

    /// Serve the replication API (table metadata and log streams) for
    /// follower clusters on this address; not served when unset.
    #[arg(
        long = "replication.address",
        env = "REGATTA_REPLICATION_ADDRESS",
        value_parser = listen_address
    )]
    replication_address: Option<SocketAddr>,

    /// Serve `/metrics` (Prometheus) and `/healthz` over HTTP on this
    /// address (HTTPS with `--rest.cert-filename`); not served when unset.
    #[arg(
        long = "rest.address",
        env = "REGATTA_REST_ADDRESS",
        value_parser = listen_address
    )]
    rest_address: Option<SocketAddr>,

    /// The table that backs the etcd API; created at bootstrap.
    #[arg(
        long = "etcd.table",
        default_value = "etcd",
        env = "REGATTA_ETCD_TABLE"
    )]
    etcd_table: String,

    /// The longest key accepted, in bytes (1 to 65535, the storage
    /// engine's limit).
    #[arg(
        long = "kv.key-bytes-max",
        default_value_t = 1024,
        env = "REGATTA_KV_KEY_BYTES_MAX",
        value_parser = clap::value_parser!(u64).range(1..=regatta_server::validate::KEY_BYTES_MAX_LIMIT as u64)
    )]
    kv_key_bytes_max: u64,

    /// The longest value accepted, in bytes (at most 32 MiB: snapshots
    /// carry items of up to 64 MiB).
    #[arg(
        long = "kv.value-bytes-max",
        default_value_t = 2 * 1024 * 1024,
        env = "REGATTA_KV_VALUE_BYTES_MAX",
        value_parser = clap::value_parser!(u64).range(1..=regatta_server::validate::VALUE_BYTES_MAX_LIMIT as u64)
    )]
    kv_value_bytes_max: u64,

    /// How long a request may wait for the cluster, in milliseconds.
    #[arg(
        long = "api.request-timeout-ms",
        default_value_t = 10_000,
        env = "REGATTA_API_REQUEST_TIMEOUT_MS",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    api_request_timeout_ms: u64,

    /// Compact each table's log every this many applied entries (after
    /// making the table's data durable); 0 never compacts.
    #[arg(
        long = "raft.snapshot-entries",
        default_value_t = 10_000,
        env = "REGATTA_RAFT_SNAPSHOT_ENTRIES"
    )]
    raft_snapshot_entries: u64,

    /// Entries a compaction leaves in the log, so that a follower lagging
    /// by fewer than this catches up from the log instead of a snapshot.
    #[arg(
        long = "raft.compaction-overhead",
        default_value_t = 1_000,
        env = "REGATTA_RAFT_COMPACTION_OVERHEAD"
    )]
    raft_compaction_overhead: u64,

    /// Raft workers: each steps, persists and sends for its share of the
    /// tables' groups, and applies them on an OS thread of its own. More
    /// workers use more cores under load; fewer make bigger batches (one
    /// WAL write and one frame per peer carry a whole turn). Default: half
    /// the cores, at least 1, at most 16.
    #[arg(
        long = "raft.workers",
        env = "REGATTA_RAFT_WORKERS",
        value_parser = clap::value_parser!(u64).range(1..=regatta_multiraft::WORKERS_MAX as u64)
    )]
    raft_workers: Option<u64>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long = "log-level", default_value = "info", env = "REGATTA_LOG_LEVEL")]
    log_level: tracing::Level,

    /// Log format: `text` (human-readable) or `json` (one JSON object per
    /// line, for log collectors).
    #[arg(
        long = "log-format",
        value_enum,
        default_value = "text",
        env = "REGATTA_LOG_FORMAT"
    )]
    log_format: LogFormat,

    /// A file holding the admin token (at least 16 visible ASCII
    /// characters): admin operations (tables, membership, leadership
    /// moves, backup, restore, reset) must then present it as
    /// `authorization: Bearer <token>` (`regatta … --token`).
    #[arg(
        long = "api.admin-token-file",
        env = "REGATTA_API_ADMIN_TOKEN_FILE",
        value_name = "FILE"
    )]
    api_admin_token_file: Option<PathBuf>,

    #[command(flatten)]
    tls: TlsArgs,
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// TLS on every link. Certificate, key and CA files are PEM; they are
/// re-read when they change, without a restart.
#[derive(Args, Debug, Default)]
struct TlsArgs {
    /// The client API's certificate chain; with `--api.key-filename` the
    /// client API serves TLS only.
    #[arg(
        long = "api.cert-filename",
        env = "REGATTA_API_CERT_FILENAME",
        value_name = "FILE"
    )]
    api_cert_filename: Option<PathBuf>,

    /// The private key of `--api.cert-filename`.
    #[arg(
        long = "api.key-filename",
        env = "REGATTA_API_KEY_FILENAME",
        value_name = "FILE"
    )]
    api_key_filename: Option<PathBuf>,

    /// The CAs that client certificates must chain to. Setting it turns on
    /// mutual TLS: clients without a valid certificate are refused.
    #[arg(
        long = "api.ca-filename",
        env = "REGATTA_API_CA_FILENAME",
        value_name = "FILE"
    )]
    api_ca_filename: Option<PathBuf>,

    /// Client certificate common names accepted by the client API,
    /// comma-separated; empty accepts every certificate the CA signed.
    #[arg(
        long = "api.allowed-cn",
        value_delimiter = ',',
        env = "REGATTA_API_ALLOWED_CN"
    )]
    api_allowed_cn: Vec<String>,

    /// This node's certificate towards its Raft peers; with
    /// `--raft.key-filename` and `--raft.ca-filename`, peers speak mutual
    /// TLS only (every node needs the same setting).
    #[arg(
        long = "raft.cert-filename",
        env = "REGATTA_RAFT_CERT_FILENAME",
        value_name = "FILE"
    )]
    raft_cert_filename: Option<PathBuf>,

    /// The private key of `--raft.cert-filename`.
    #[arg(
        long = "raft.key-filename",
        env = "REGATTA_RAFT_KEY_FILENAME",
        value_name = "FILE"
    )]
    raft_key_filename: Option<PathBuf>,

    /// The CAs that peers' certificates chain to.
    #[arg(
        long = "raft.ca-filename",
        env = "REGATTA_RAFT_CA_FILENAME",
        value_name = "FILE"
    )]
    raft_ca_filename: Option<PathBuf>,

    /// Peer certificate common names accepted, comma-separated; empty
    /// accepts every certificate the CA signed.
    #[arg(
        long = "raft.allowed-cn",
        value_delimiter = ',',
        env = "REGATTA_RAFT_ALLOWED_CN"
    )]
    raft_allowed_cn: Vec<String>,

    /// The name a peer's certificate must carry; by default the host (IP
    /// address or DNS name) the peer is dialled on, from
    /// `--raft.initial-members` or the peer's address record.
    #[arg(long = "raft.server-name", env = "REGATTA_RAFT_SERVER_NAME")]
    raft_server_name: Option<String>,

    /// On a leader cluster, the replication API's certificate; on a
    /// follower cluster, the client certificate presented to the leader
    /// cluster's replication API.
    #[arg(
        long = "replication.cert-filename",
        env = "REGATTA_REPLICATION_CERT_FILENAME",
        value_name = "FILE"
    )]
    replication_cert_filename: Option<PathBuf>,

    /// The private key of `--replication.cert-filename`.
    #[arg(
        long = "replication.key-filename",
        env = "REGATTA_REPLICATION_KEY_FILENAME",
        value_name = "FILE"
    )]
    replication_key_filename: Option<PathBuf>,

    /// On a leader cluster, the CAs that followers' client certificates
    /// must chain to (setting it turns on mutual TLS); on a follower
    /// cluster, the CAs that sign the leader's certificate (setting it
    /// turns on TLS towards the leader).
    #[arg(
        long = "replication.ca-filename",
        env = "REGATTA_REPLICATION_CA_FILENAME",
        value_name = "FILE"
    )]
    replication_ca_filename: Option<PathBuf>,

    /// On a leader cluster, follower certificate common names accepted by
    /// the replication API, comma-separated; empty accepts every
    /// certificate the CA signed.
    #[arg(
        long = "replication.allowed-cn",
        value_delimiter = ',',
        env = "REGATTA_REPLICATION_ALLOWED_CN"
    )]
    replication_allowed_cn: Vec<String>,

    /// The certificate chain of `/metrics` and `/healthz`; with
    /// `--rest.key-filename`, `--rest.address` serves HTTPS only.
    #[arg(
        long = "rest.cert-filename",
        env = "REGATTA_REST_CERT_FILENAME",
        value_name = "FILE"
    )]
    rest_cert_filename: Option<PathBuf>,

    /// The private key of `--rest.cert-filename`.
    #[arg(
        long = "rest.key-filename",
        env = "REGATTA_REST_KEY_FILENAME",
        value_name = "FILE"
    )]
    rest_key_filename: Option<PathBuf>,

    /// The CAs that scrapers' client certificates must chain to. Setting
    /// it turns on mutual TLS for `/metrics` and `/healthz`.
    #[arg(
        long = "rest.ca-filename",
        env = "REGATTA_REST_CA_FILENAME",
        value_name = "FILE"
    )]
    rest_ca_filename: Option<PathBuf>,

    /// Client certificate common names accepted on `--rest.address`,
    /// comma-separated; empty accepts every certificate the CA signed.
    #[arg(
        long = "rest.allowed-cn",
        value_delimiter = ',',
        env = "REGATTA_REST_ALLOWED_CN"
    )]
    rest_allowed_cn: Vec<String>,
}

/// A certificate and key given together, or neither.
fn identity(
    flag: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> Result<Option<regatta_server::tls::Identity>, String> {
    use regatta_server::tls::{Identity, Pem};
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(Identity {
            certificate_chain: Pem::File(cert.clone()),
            key: Pem::File(key.clone()),
        })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(format!(
            "--{flag}.cert-filename needs --{flag}.key-filename"
        )),
        (None, Some(_)) => Err(format!(
            "--{flag}.key-filename needs --{flag}.cert-filename"
        )),
    }
}

/// A TLS server configuration from the `--{flag}.*` flags, offering
/// `alpn_protocols`; `None` when no certificate is given.
fn server_tls(
    flag: &str,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    ca: &Option<PathBuf>,
    allowed_cn: &[String],
    alpn_protocols: Vec<Vec<u8>>,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
    use regatta_server::tls::{Pem, ServerTlsOptions};
    let allowed_cn: Vec<String> = allowed_cn
        .iter()
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .collect();
    let Some(identity) = identity(flag, cert, key)? else {
        if ca.is_some() {
            return Err(format!(
                "--{flag}.ca-filename needs --{flag}.cert-filename and --{flag}.key-filename"
            ));
        }
        if !allowed_cn.is_empty() {
            return Err(format!("--{flag}.allowed-cn needs mutual TLS (--{flag}.cert-filename, --{flag}.key-filename and --{flag}.ca-filename)"));
        }
        return Ok(None);
    };
    if !allowed_cn.is_empty() && ca.is_none() {
        return Err(format!(
            "--{flag}.allowed-cn needs --{flag}.ca-filename (mutual TLS)"
        ));
    }
    regatta_server::tls::server_config(&ServerTlsOptions {
        identity,
        client_ca: ca.clone().map(Pem::File),
        allowed_common_names: allowed_cn,
        alpn_protocols,
    })
    .map(Some)
    .map_err(|error| format!("--{flag}.*: {error}"))
}

/// Mutual TLS between Raft peers, from the `--raft.*` flags.
fn peer_tls(tls: &TlsArgs) -> Result<Option<regatta_multiraft::PeerTls>, String> {
    use regatta_server::tls::Pem;
    let identity = identity("raft", &tls.raft_cert_filename, &tls.raft_key_filename)?;
    match (identity, &tls.raft_ca_filename) {
        (None, None) => {
            if tls
                .raft_allowed_cn
                .iter()
                .any(|name| !name.trim().is_empty())
            {
                return Err("--raft.allowed-cn needs --raft.cert-filename, --raft.key-filename and --raft.ca-filename".into());
            }
            Ok(None)
        }
        (Some(_), None) => Err(
            "--raft.cert-filename needs --raft.ca-filename: peers always authenticate each other"
                .into(),
        ),
        (None, Some(_)) => {
            Err("--raft.ca-filename needs --raft.cert-filename and --raft.key-filename".into())
        }
        (Some(identity), Some(ca)) => regatta_multiraft::PeerTls::new(
            identity,
            Pem::File(ca.clone()),
            tls.raft_allowed_cn
                .iter()
                .map(|name| name.trim().to_string())
                .filter(|name| !name.is_empty())
                .collect(),
            tls.raft_server_name.as_deref(),
        )
        .map(Some)
        .map_err(|error| format!("--raft.*: {error}")),
    }
}

#[derive(Args, Debug)]
struct FollowerArgs {
    #[command(flatten)]
    node: LeaderArgs,

    /// The leader cluster's replication API (its nodes'
    /// `--replication.address`), as host:port or an http(s):// URL. Give
    /// several, separated by commas, to keep replicating when one node is
    /// down: the follower uses one at a time and moves to the next when
    /// it cannot be reached or is behind.
    #[arg(
        long = "replication.leader-address",
        env = "REGATTA_REPLICATION_LEADER_ADDRESS"
    )]
    replication_leader_address: String,

    /// How often the tables are compared with the leader cluster's, in
    /// milliseconds (at least 10).
    #[arg(
        long = "replication.metadata-interval-ms",
        default_value_t = 1_000,
        env = "REGATTA_REPLICATION_METADATA_INTERVAL_MS",
        value_parser = clap::value_parser!(u64).range(10..)
    )]
    replication_metadata_interval_ms: u64,

    /// Leader snapshots installed at once on this node, at most (at
    /// least 1).
    #[arg(
        long = "replication.max-snapshot-installs",
        default_value_t = 2,
        env = "REGATTA_REPLICATION_MAX_SNAPSHOT_INSTALLS",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    replication_max_snapshot_installs: usize,

    /// Snapshot bytes received per second on this node, over all
    /// installs; 0 for no limit.
    #[arg(
        long = "replication.snapshot-bytes-per-second",
        default_value_t = 0,
        env = "REGATTA_REPLICATION_SNAPSHOT_BYTES_PER_SECOND"
    )]
    replication_snapshot_bytes_per_second: u64,

    /// The name the leader's replication certificate must carry; by
    /// default the host of each `--replication.leader-address`.
    #[arg(
        long = "replication.server-name",
        env = "REGATTA_REPLICATION_SERVER_NAME"
    )]
    replication_server_name: Option<String>,
}

/// `1=127.0.0.1:5012,2=node2:5012,...` (the value of `--<flag>`) into a
/// map.
fn parse_members(flag: &str, values: &[String]) -> Result<BTreeMap<NodeId, PeerAddress>, String> {
    let mut members = BTreeMap::new();
    for value in values.iter().filter(|v| !v.is_empty()) {
        let (id, address) = value
            .split_once('=')
            .ok_or_else(|| format!("--{flag}: {value:?} is not id=host:port"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("--{flag}: {id:?} is not a node id"))?;
        if id == 0 {
            return Err(format!("--{flag}: node ids must be non-zero"));
        }
        let address: PeerAddress = address
            .trim()
            .parse()
            .map_err(|error| format!("--{flag}: node {id}: {error}"))?;
        if members.insert(NodeId(id), address).is_some() {
            return Err(format!("--{flag}: node {id} appears twice"));
        }
    }
    Ok(members)
}

/// A listening address: an IP address and a port. Names are refused, as
/// etcd refuses them in its listen URLs: a name may stand for several
/// addresses, or for none of this host's.
fn listen_address(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?} is not an IP address and port, such as 127.0.0.1:8443 or \
             0.0.0.0:8443 (listening addresses are not resolved; advertise a name \
             with --api.advertise-address or --raft.address)"
        )
    })
}

/// The value of `--api.advertise-address`, checked: `http://host:port`,
/// or `https://` when the API serves TLS; a trailing `/` is dropped.
fn advertised_url(value: &str, tls: bool) -> Result<String, String> {
    let flag = "--api.advertise-address";
    let expected = if tls { "https" } else { "http" };
    let (scheme, rest) = value
        .split_once("://")
        .ok_or_else(|| format!("{flag} {value:?}: not a URL; expected {expected}://host:port"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "{flag} {value:?}: the scheme must be http or https, not {scheme:?}"
        ));
    }
    if scheme != expected {
        let why = if tls {
            "the API serves TLS (--api.cert-filename)"
        } else {
            "the API serves plain text (no --api.cert-filename)"
        };
        return Err(format!(
            "{flag} {value:?}: {why}, so clients need {expected}://"
        ));
    }
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    // The port follows the last ':' after an IPv6 address's brackets.
    let host_end = authority.rfind(']').map_or(0, |end| end + 1);
    let Some(colon) = authority[host_end..].rfind(':').map(|at| host_end + at) else {
        return Err(format!(
            "{flag} {value:?}: no port; expected {expected}://host:port"
        ));
    };
    let (host, port) = (&authority[..colon], &authority[colon + 1..]);
    let port_ok = !port.is_empty()
        && port.bytes().all(|byte| byte.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|port| port != 0);
    let host_ok = match host.strip_prefix('[') {
        Some(inside) => inside
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'.')
        }
    };
    if !port_ok || !host_ok {
        return Err(format!(
            "{flag} {value:?}: expected {expected}://host:port (a host name or IP address, \
             IPv6 in brackets, and a port from 1 to 65535; no path)"
        ));
    }
    let unspecified = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    if unspecified {
        return Err(format!(
            "{flag} {value:?}: {host} is a listening address, not one clients can reach"
        ));
    }
    Ok(format!("{scheme}://{host}:{port}"))
}

fn node_config(args: &LeaderArgs) -> Result<NodeConfig, String> {
    if args.raft_node_id == 0 {
        return Err("--raft.node-id must be non-zero".into());
    }
    let node_id = NodeId(args.raft_node_id);
    let mut config = NodeConfig::single(&args.data_dir, args.raft_address.clone());
    config.node_id = node_id;
    config.cluster_id = args.raft_cluster_id;
    config.members = [(node_id, args.raft_address.clone())].into();
    if args.dev {
    } else {
        let members = parse_members("raft.initial-members", &args.raft_initial_members)?;
        let peer_addresses = parse_members("raft.peer-addresses", &args.raft_peer_addresses)?;
        if let Some(id) = peer_addresses.keys().find(|id| members.contains_key(id)) {
            return Err(format!(
                "--raft.peer-addresses names node {}, which --raft.initial-members already places",
                id.0
            ));
        }
        if peer_addresses.contains_key(&node_id) {
            return Err(format!(
                "--raft.peer-addresses names this node ({}); its address is --raft.address",
                node_id.0
            ));
        }
        config.peer_addresses = peer_addresses;
        if !members.is_empty() {
            match members.get(&node_id) {
                Some(address) if *address == args.raft_address => {}
                Some(address) => {
                    return Err(format!(
                        "--raft.initial-members gives node {} the address {address}, but --raft.address is {}",
                        node_id.0, args.raft_address
                    ))
                }
                None => {
                    return Err(format!(
                        "--raft.initial-members does not include this node ({})",
                        node_id.0
                    ))
                }
            }
            config.members = members;
        }
        config.bootstrap = !args.raft_join;
    }
    config.listen_address = args.raft_listen_address;
    // What MemberList and etcd clients' endpoint sync see: https when the
    // client API serves TLS.
    let tls = args.tls.api_cert_filename.is_some();
    let client_url = match &args.api_advertise_address {
        Some(url) => advertised_url(url, tls)?,
        None => {
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{}", args.api_address)
        }
    };
    config.client_urls.insert(node_id, client_url);
    config.etcd_table = args.etcd_table.clone();
    config.key_bytes_max = args.kv_key_bytes_max as usize;
    config.value_bytes_max = args.kv_value_bytes_max as usize;
    config.request_timeout = Duration::from_millis(args.api_request_timeout_ms.max(1));
    config.snapshot_every_entries = args.raft_snapshot_entries;
    config.compaction_overhead_entries = args.raft_compaction_overhead;
    if let Some(workers) = args.raft_workers {
        config.workers = workers as usize;
    }
    Ok(config)
}

/// Whether a linearizable read of `group` succeeds on `node` now: its
/// state machine holds everything the leader had committed.
async fn caught_up(node: &Node, group: regatta_wal::GroupId) -> bool {
    let probe = regatta_kv::command::Query::Range(regatta_kv::command::RangeRequest {
        range: regatta_kv::command::KeyRange {
            key: b"ready-probe".to_vec(),
            range_end: Vec::new(),
        },
        limit: 1,
        keys_only: true,
        count_only: true,
        bytes_max: 0,
    });
    node.read(group, &probe, true).await.is_ok()
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

async fn run_follower(args: FollowerArgs) -> Result<(), String> {
    if args.node.replication_address.is_some() {
        return Err(
            "--replication.address is for leader clusters; a follower cluster replicates from \
             --replication.leader-address and serves no replication API"
                .into(),
        );
    }
    let addresses: Vec<String> = args
        .replication_leader_address
        .split(',')
        .map(|address| address.trim().to_string())
        .collect();
    if addresses.iter().any(String::is_empty) {
        return Err(format!(
            "--replication.leader-address {:?}: an address is empty",
            args.replication_leader_address
        ));
    }
    let tls = &args.node.tls;
    if tls
        .replication_allowed_cn
        .iter()
        .any(|name| !name.trim().is_empty())
    {
        return Err("--replication.allowed-cn is for leader clusters, which check their followers' certificates".into());
    }
    let identity = identity(
        "replication",
        &tls.replication_cert_filename,
        &tls.replication_key_filename,
    )?;
    let client_tls = match (&tls.replication_ca_filename, identity) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err("--replication.cert-filename needs --replication.ca-filename, which verifies the leader cluster".into())
        }
        (Some(ca), identity) => Some(
            regatta_server::tls::ClientTls::new(
                &regatta_server::tls::ClientTlsOptions {
                    ca: regatta_server::tls::Pem::File(ca.clone()),
                    identity,
                    alpn_protocols: Vec::new(),
                },
                args.replication_server_name.clone(),
            )
            .map_err(|error| format!("--replication.*: {error}"))?,
        ),
    };
    // Check the addresses now, so that a typo fails at start.
    for address in &addresses {
        regatta_server::tls::endpoint(address, client_tls.as_ref())
            .map_err(|error| format!("--replication.leader-address: {error}"))?;
    }
    let mut follower = regatta_replication::FollowerConfig::with_addresses(addresses);
    follower.tls = client_tls;
    follower.metadata_interval =
        Duration::from_millis(args.replication_metadata_interval_ms.max(10));
    follower.snapshot_installs_max = args.replication_max_snapshot_installs.max(1);
    follower.snapshot_bytes_per_second_max = args.replication_snapshot_bytes_per_second;
    run_node(args.node, Some(follower)).await
}

async fn run_leader(args: LeaderArgs) -> Result<(), String> {
    run_node(args, None).await
}

async fn run_node(
    args: LeaderArgs,
    follower: Option<regatta_replication::FollowerConfig>,
) -> Result<(), String> {
    let mut config = node_config(&args)?;
    if follower.is_some() {
        config.role = regatta_server::ClusterRole::Follower;
    }
    config.peer_tls = peer_tls(&args.tls)?;
    config.admin_token = admin_token(&args)?;
    let api_tls = server_tls(
        "api",
        &args.tls.api_cert_filename,
        &args.tls.api_key_filename,
        &args.tls.api_ca_filename,
        &args.tls.api_allowed_cn,
        regatta_server::tls::grpc_alpn(),
    )?;
    let replication_tls = replication_tls(&args, follower.is_some())?;
    let api = bind(args.api_address, "--api.address").await?;
    tracing::info!(
        node = config.node_id.0,
        data_dir = %config.data_dir.display(),
        raft = %args.raft_address,
        api = %args.api_address,
        role = if follower.is_some() { "follower" } else { "leader" },
        "starting regatta node"
    );
    warn_of_unreachable_addresses(&args, &config);
    let replication_listener = match args.replication_address {
        Some(address) => Some(bind(address, "--replication.address").await?),
        None => None,
    };
    let (rest_listener, rest_tls) = rest_endpoint(&args).await?;
    let node = Node::start(config)
        .await
        .map_err(|error| error.to_string())?;
    let stop_rest = rest_listener.map(|listener| serve_rest(&node, listener, rest_tls));
    let puller = match follower {
        Some(follower) => {
            tracing::info!(leader = %follower.leader_urls.join(","), "replicating the leader cluster");
            Some(
                regatta_replication::start_follower(std::sync::Arc::clone(&node), follower)
                    .map_err(|error| error.to_string())?,
            )
        }
        None => None,
    };
    let replication =
        replication_listener.map(|listener| serve_replication(&node, listener, replication_tls));
    announce_ready(&node, &args);
    let shutdown = shut_down_when_told(&node, args.raft_leave_on_terminate);
    let served = regatta_server::serve(std::sync::Arc::clone(&node), api, api_tls, shutdown).await;
    tracing::info!("shutting down");
    let services = Services {
        stop_rest,
        replication,
        puller,
    };
    services.stop(&node).await;
    served.map_err(|error| error.to_string())
}

/// The REST listener (`--rest.address`) and its TLS, which needs it.
async fn rest_endpoint(
    args: &LeaderArgs,
) -> Result<
    (
        Option<tokio::net::TcpListener>,
        Option<std::sync::Arc<rustls::ServerConfig>>,
    ),
    String,
> {
    let rest_tls = server_tls(
        "rest",
        &args.tls.rest_cert_filename,
        &args.tls.rest_key_filename,
        &args.tls.rest_ca_filename,
        &args.tls.rest_allowed_cn,
        vec![b"http/1.1".to_vec()],
    )?;
    if rest_tls.is_some() && args.rest_address.is_none() {
        return Err("--rest.cert-filename and --rest.key-filename need --rest.address".into());
    }
    let rest_listener = match args.rest_address {
        Some(address) => Some(bind(address, "--rest.address").await?),
        None => None,
    };
    Ok((rest_listener, rest_tls))
}

/// What a node runs beside its API, stopped with it.
struct Services {
    stop_rest: Option<tokio::sync::oneshot::Sender<()>>,
    replication: Option<ReplicationServer>,
    puller: Option<regatta_replication::Follower>,
}

impl Services {
    /// Stops them and the node. Stopping the node ends the open log
    /// streams; then the replication server can finish.
    async fn stop(self, node: &Node) {
        if let Some(stop) = self.stop_rest {
            let _ = stop.send(());
        }
        let replication = self.replication.map(|(stop, task)| {
            let _ = stop.send(());
            task
        });
        if let Some(puller) = self.puller {
            puller.stop().await;
        }
        node.stop().await;
        if let Some(mut replication) = replication {
            match tokio::time::timeout(Duration::from_secs(5), &mut replication).await {
                Ok(Ok(Err(error))) => tracing::error!("{error}"),
                Ok(Err(error)) => tracing::error!("the replication API task failed: {error}"),
                Ok(Ok(Ok(()))) => {}
                Err(_) => replication.abort(),
            }
        }
    }
}

/// Serves `/metrics` and `/healthz` until the returned sender is used.
fn serve_rest(
    node: &std::sync::Arc<Node>,
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    if let Ok(address) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%address, scheme, "serving /metrics and /healthz");
    }
    tokio::spawn(regatta_server::serve_rest(
        std::sync::Arc::clone(node),
        listener,
        tls,
        async move {
            let _ = stopped.await;
        },
    ));
    stop
}

/// The replication API's task, which serves until the returned sender is
/// used.
type ReplicationServer = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), String>>,
);

/// Serves the leader cluster's replication API.
fn serve_replication(
    node: &std::sync::Arc<Node>,
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> ReplicationServer {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "serving the replication API");
    }
    let task = tokio::spawn(regatta_replication::serve(
        std::sync::Arc::clone(node),
        listener,
        tls,
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, task)
}

/// Binds a listening address, naming its `flag` when that fails.
async fn bind(
    address: std::net::SocketAddr,
    flag: &str,
) -> Result<tokio::net::TcpListener, String> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| format!("{flag} {address}: {error}"))
}

/// The admin token from `--api.admin-token-file`, if given.
fn admin_token(args: &LeaderArgs) -> Result<Option<regatta_server::auth::AdminToken>, String> {
    let Some(file) = &args.api_admin_token_file else {
        return Ok(None);
    };
    let token = std::fs::read_to_string(file)
        .map_err(|error| format!("--api.admin-token-file {}: {error}", file.display()))?;
    regatta_server::auth::AdminToken::new(&token)
        .map(Some)
        .map_err(|error| format!("--api.admin-token-file {}: {error}", file.display()))
}

/// TLS for the replication API a leader cluster's node serves; none on
/// a follower cluster, and refused without `--replication.address`.
fn replication_tls(
    args: &LeaderArgs,
    on_follower: bool,
) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
    if on_follower {
        return Ok(None);
    }
    let tls = &args.tls;
    if args.replication_address.is_none() {
        if tls.replication_cert_filename.is_some()
            || tls.replication_key_filename.is_some()
            || tls.replication_ca_filename.is_some()
        {
            return Err("--replication.cert-filename, --replication.key-filename and --replication.ca-filename need --replication.address".into());
        }
        return Ok(None);
    }
    server_tls(
        "replication",
        &tls.replication_cert_filename,
        &tls.replication_key_filename,
        &tls.replication_ca_filename,
        &tls.replication_allowed_cn,
        regatta_server::tls::grpc_alpn(),
    )
}

/// Warns of listening addresses that others would be given but could not
/// reach (every interface, 0.0.0.0 or [::]).
fn warn_of_unreachable_addresses(args: &LeaderArgs, config: &regatta_server::NodeConfig) {
    if args.api_address.ip().is_unspecified() && args.api_advertise_address.is_none() {
        tracing::warn!(
            api = %args.api_address,
            "--api.address listens on every interface, and MemberList gives clients that \
             address, which they cannot reach from elsewhere: set --api.advertise-address"
        );
    }
    let raft_unspecified = args
        .raft_address
        .socket_addr()
        .is_some_and(|address| address.ip().is_unspecified());
    if raft_unspecified && (config.members.len() > 1 || args.raft_join) {
        tracing::warn!(
            raft = %args.raft_address,
            "--raft.address is the address peers dial, and this one reaches no host: give a \
             routable --raft.address, and listen on every interface with --raft.listen-address"
        );
    }
}

/// Says when the cluster can serve, so that a user knows when to connect:
/// once a linearizable read would answer here (a joining node is ready
/// only once it has caught up, not when it first hears of a leader).
fn announce_ready(node: &std::sync::Arc<Node>, args: &LeaderArgs) {
    let node = std::sync::Arc::clone(node);
    // The URL this node gives clients (`--api.advertise-address`).
    let api_address = node
        .config()
        .client_urls
        .get(&node.config().node_id)
        .cloned()
        .unwrap_or_else(|| args.api_address.to_string());
    tokio::spawn(async move {
        let started = std::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let etcd_table = node.config().etcd_table.clone();
            let Ok(group) = node.table_group(&etcd_table) else {
                continue;
            };
            if node.facts(group).leader != 0 && caught_up(&node, group).await {
                tracing::info!(
                    api = %api_address,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "ready: try `etcdctl --endpoints={api_address} put hello world`"
                );
                return;
            }
        }
    });
}

/// Completes when the API should stop serving: on SIGTERM or Ctrl-C
/// (after leaving the cluster with `--raft.leave-on-terminate`), or once
/// this node was removed; then hands over the leaderships it still
/// holds. The API keeps serving meanwhile, so that clients see no gap.
fn shut_down_when_told(
    node: &std::sync::Arc<Node>,
    leave: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let node = std::sync::Arc::clone(node);
    let mut removed = node.removed();
    let removed = async move {
        let _ = removed.wait_for(|removed| *removed).await.is_ok();
    };
    async move {
        // Whether to hand over the leaderships this node still holds.
        let hand_over = tokio::select! {
            _ = shutdown_signal() => {
                if leave {
                    tracing::info!("leaving the cluster (--raft.leave-on-terminate)");
                    match node.leave(Duration::from_secs(30)).await {
                        Ok(()) => tracing::info!("left the cluster"),
                        Err(error) => tracing::error!(%error, "leaving the cluster failed"),
                    }
                    false
                } else {
                    true
                }
            }
            _ = removed => {
                tracing::warn!("this node was removed from the cluster: shutting down; wipe its data directory before adding it again");
                // Table groups drop a member after the metadata group
                // does, each by its leader: a table this node still leads
                // gets a new leader now rather than after an election
                // timeout.
                true
            }
        };
        if hand_over {
            let held = node.drain(Duration::from_secs(5)).await;
            tracing::info!(still_leading = held, "handed over leaderships");
        }
    }
}

/// The long flag names of subcommand `name` (`leader` or `follower`),
/// which a config file may set.
fn node_keys(name: &str) -> std::collections::BTreeSet<String> {
    let command = Cli::command();
    command
        .find_subcommand(name)
        .map(|leader| {
            leader
                .get_arguments()
                .filter_map(|argument| argument.get_long().map(str::to_string))
                .filter(|name| name != "config" && name != "help")
                .collect()
        })
        .unwrap_or_default()
}

/// Which node subcommand's keys a config file may set: the first
/// argument that is not `--config` or its file (which may come before
/// it) names it.
fn node_subcommand(arguments: &[String]) -> &'static str {
    let mut words = arguments.iter().skip(1);
    while let Some(word) = words.next() {
        if word == "--config" {
            words.next();
        } else if !word.starts_with("--config=") {
            return if word == "follower" {
                "follower"
            } else {
                "leader"
            };
        }
    }
    "leader"
}

/// Fail-stop, for a node only (a client command's panic is its own): a
/// panic on any thread (a storage engine's background thread included)
/// may leave shared state poisoned, and a node that lingers half-alive
/// serves nothing. Report it, then abort, so that the supervisor restarts
/// the node and it recovers from disk.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("regatta: a thread panicked; aborting so the node restarts from its data");
        std::process::abort();
    }));
}

/// Logs to stderr at the node's `--log-level` and `--log-format`; a
/// client command logs warnings only, as text.
fn start_logging(command: &Command) {
    let (level, format) = match command {
        Command::Leader(args) => (args.log_level, args.log_format),
        Command::Follower(args) => (args.node.log_level, args.node.log_format),
        _ => (tracing::Level::WARN, LogFormat::Text),
    };
    let logs = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().with_ansi(false).init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().collect();
    let subcommand = node_subcommand(&arguments);
    let arguments = match config::expand(arguments, &node_keys(subcommand)) {
        Ok(arguments) => arguments,
        Err(error) => {
            eprintln!("regatta: {error}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(arguments);
    if matches!(cli.command, Command::Leader(_) | Command::Follower(_)) {
        abort_on_panic();
    }
    start_logging(&cli.command);
    let runtime = match regatta_multiraft::runtime::builder().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("regatta: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Leader(args) => runtime.block_on(run_leader(args)),
        Command::Follower(args) => runtime.block_on(run_follower(args)),
        Command::Version => {
            println!("regatta {}", env!("CARGO_PKG_VERSION"));
            println!("etcd API {}", regatta_server::ETCD_API_VERSION);
            Ok(())
        }
        Command::Kv {
            connection,
            command,
        } => runtime.block_on(client::kv(&connection, command)),
        Command::Table {
            connection,
            command,
        } => runtime.block_on(client::table(&connection, command)),
        Command::Status { connection } => runtime.block_on(client::node_status(&connection)),
        Command::Member {
            connection,
            command,
        } => runtime.block_on(client::member(&connection, command)),
        Command::Bench(args) => runtime.block_on(bench::run(args)),
        Command::Backup(args) => runtime.block_on(backup::backup(args)),
        Command::Restore(args) => runtime.block_on(backup::restore(args)),
        Command::Reset(args) => runtime.block_on(backup::reset(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("regatta: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::advertised_url;

    #[test]
    fn advertised_urls_are_normalised_or_refused() {
        for (value, tls, url) in [
            (
                "http://node-1.example:8443",
                false,
                "http://node-1.example:8443",
            ),
            ("HTTP://10.0.0.7:8443/", false, "http://10.0.0.7:8443"),
            (
                "https://[2001:db8::7]:8443",
                true,
                "https://[2001:db8::7]:8443",
            ),
        ] {
            assert_eq!(advertised_url(value, tls).as_deref(), Ok(url), "{value}");
        }
        for (value, tls) in [
            ("http://node-1:8443", true),
            ("https://node-1:8443", false),
            ("http://user@node-1:8443", false),
            ("http://node-1:8443?x=1", false),
            ("http://node-1:65536", false),
            ("http://[2001:db8::7:8443", false),
        ] {
            assert!(advertised_url(value, tls).is_err(), "{value} was accepted");
        }
    }
}
