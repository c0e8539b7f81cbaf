//! The TCP peer transport (`docs/transport-format.md`): one outbound
//! connection per peer carrying every group's messages, batched per flush;
//! bounded queues that drop Raft messages (counted) rather than block;
//! reconnect with capped exponential back-off; CRC-checked frames.
//!
//! With [`PeerTls`], every connection is TLS 1.2/1.3 with mutual
//! authentication: each side presents a certificate signed by the
//! cluster's CA, optionally limited to allowed common names; certificates
//! are reloaded when their files change (`crate::tls`).
//!
//! A snapshot travels on a connection of its own, as a header frame and
//! chunks of at most `snapshot_chunk_bytes`, optionally paced to
//! `snapshot_bytes_per_second_max`; the receiver answers one byte once it
//! has handed the whole snapshot to its host.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use regatta_raft::{Message, NodeId, MESSAGE_KIND_NAMES};
use regatta_wal::GroupId;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::address::{PeerAddress, Resolver};
use crate::error::{Error, UnsentCause};
use crate::host::{NodeHost, WeakNodeHost};
use crate::snapshot::SnapshotData;
use crate::tls::{ClientTlsOptions, Identity, Pem, ServerTlsOptions};
use crate::transport::Transport;
use crate::wire::{decode_batch, encode_batch, encode_message, peer_understands};

const HANDSHAKE_MAGIC: &[u8; 8] = b"RGRAFTv1";
/// The transport format this build speaks; it also accepts connections
/// from `FORMAT_VERSION_MIN` on (a rolling upgrade), and dials older peers
/// at the version they answer to.
const FORMAT_VERSION: u32 = 3;
/// The oldest transport format this build accepts and dials (version 1
/// lacks `ProposeRefused`, version 2 `ReadRefused`).
const FORMAT_VERSION_MIN: u32 = 1;
const HANDSHAKE_BYTES: usize = 28;
const ANSWER_ACCEPTED: u8 = 0;
const ANSWER_WRONG_CLUSTER: u8 = 1;
const ANSWER_WRONG_VERSION: u8 = 2;
/// The dialling node was removed from the cluster (`refuse_removed`).
const ANSWER_REMOVED: u8 = 3;
const FRAME_MESSAGE_BATCH: u8 = 1;
const FRAME_SNAPSHOT_HEADER: u8 = 2;
const FRAME_SNAPSHOT_CHUNK: u8 = 3;
/// The receiver's answer once a whole snapshot reached its host.
const ANSWER_SNAPSHOT_DELIVERED: u8 = 0;
/// How often a peer that stays unreachable for one reason is logged.
const CONNECT_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// TLS for peer connections, with mutual authentication: each side
/// presents a certificate signed by the cluster's CA (see [`crate::tls`]
/// for reloading and allowed common names).
#[derive(Clone)]
pub struct PeerTls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    /// The name checked in a peer's certificate; `None` checks the IP
    /// address or the host name the peer is dialled on.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl PeerTls {
    /// Mutual TLS with `identity` (this node's certificate and key), the
    /// cluster CA `ca`, and optionally only peers whose certificate's
    /// common name is in `allowed_common_names`. A peer's certificate must
    /// name `server_name`, or when `None` the IP address or host name it
    /// is dialled on.
    pub fn new(
        identity: Identity,
        ca: Pem,
        allowed_common_names: Vec<String>,
        server_name: Option<&str>,
    ) -> Result<PeerTls, Error> {
        let server = crate::tls::server_config(&ServerTlsOptions {
            identity: identity.clone(),
            client_ca: Some(ca.clone()),
            allowed_common_names,
            alpn_protocols: Vec::new(),
        })?;
        let client = crate::tls::client_config(&ClientTlsOptions {
            ca,
            identity: Some(identity),
            alpn_protocols: Vec::new(),
        })?;
        let server_name = match server_name {
            Some(name) => Some(crate::tls::server_name(name, None)?),
            None => None,
        };
        Ok(PeerTls {
            server,
            client,
            server_name,
        })
    }

    /// TLS from PEM held in memory: the cluster CA, this node's
    /// certificate chain and private key, and the name every node's
    /// certificate carries.
    pub fn from_pem(
        ca_pem: &[u8],
        certificate_chain_pem: &[u8],
        key_pem: &[u8],
        server_name: &str,
    ) -> Result<PeerTls, Error> {
        PeerTls::new(
            Identity {
                certificate_chain: Pem::Inline(certificate_chain_pem.to_vec()),
                key: Pem::Inline(key_pem.to_vec()),
            },
            Pem::Inline(ca_pem.to_vec()),
            Vec::new(),
            Some(server_name),
        )
    }
}

/// A connection, plain or TLS.
trait PeerStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerStream for T {}

type BoxedStream = Box<dyn PeerStream>;

/// An incoming connection after its handshake, read through a buffer: one
/// read usually holds several frames (and their headers).
type IncomingStream = tokio::io::BufReader<BoxedStream>;

/// The read buffer of an incoming connection.
const INCOMING_BUFFER_BYTES: usize = 64 * 1024;

/// Configuration of the TCP transport. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct TcpConfig {
    /// This node.
    pub node_id: NodeId,
    /// Peers refuse connections from another cluster.
    pub cluster_id: u64,
    /// Where to reach each peer.
    pub peers: HashMap<NodeId, PeerAddress>,
    /// Messages queued per peer; beyond, messages are dropped and counted.
    /// Default 16,384.
    pub peer_queue_messages_max: usize,
    /// The largest frame sent or accepted. Default 64 MiB.
    pub frame_bytes_max: u32,
    /// First reconnect delay, doubled up to `reconnect_delay_max`.
    /// Default 10 ms.
    pub reconnect_delay_min: Duration,
    /// Longest reconnect delay. Default 1 s.
    pub reconnect_delay_max: Duration,
    /// TLS with mutual authentication, or plain TCP when `None`.
    pub tls: Option<PeerTls>,
    /// Snapshot data per chunk frame; must be below `frame_bytes_max`.
    /// Default 1 MiB.
    pub snapshot_chunk_bytes: u32,
    /// The largest snapshot accepted (written to the host's snapshot
    /// directory as it arrives).
    /// Default 4 GiB.
    pub snapshot_bytes_max: u64,
    /// Pacing of each outgoing snapshot, or unpaced when `None`. Default
    /// `None`.
    pub snapshot_bytes_per_second_max: Option<u64>,
    /// Incoming snapshots received at once; more are refused (the leader
    /// retries later). Bounds disk use to this many × `snapshot_bytes_max`.
    /// Default 4.
    pub incoming_snapshots_max: usize,
    /// The longest one step of a snapshot stream may take (connecting,
    /// writing or reading one chunk, waiting for the confirmation) before
    /// the stream is abandoned: reported as not delivered, so the leader
    /// retries, and the receiver's slot is freed. Default 10 s.
    pub snapshot_idle_timeout: Duration,
    /// The longest a dial may take: resolving the peer's name, each TCP
    /// connect to one of its addresses, and the TLS and Regatta handshakes
    /// each get this long, so that an address that drops packets does not
    /// hold the next one back for the kernel's minutes. Default 3 s.
    pub connect_timeout: Duration,
    /// Looks up peers given by name, at every dial; `None` (the default)
    /// asks the system's resolver.
    pub resolver: Option<Resolver>,
    /// Incoming connections open at once, at most; one past it is closed
    /// at once (and counted), so that idle connections cannot use up the
    /// process's file descriptors. Default 1,024.
    pub incoming_connections_max: usize,
    /// A frame whose length has arrived must be complete within this plus
    /// its length at `frame_bytes_per_second_min`; otherwise the
    /// connection is closed (and the frame counted as refused), so that a
    /// peer that announces a large frame and stalls, or trickles it, holds
    /// nothing for long. Default 10 s.
    pub frame_body_timeout_min: Duration,
    /// See `frame_body_timeout_min`. Low, so that a slow link still
    /// carries a full frame (64 MiB in about 17 minutes). Default 64 KiB/s.
    pub frame_bytes_per_second_min: u64,
    /// An incoming snapshot must arrive, as a whole, within
    /// `snapshot_idle_timeout` plus its announced size at this rate, or
    /// its slot is freed (a peer trickling chunks just inside the idle
    /// timeout would otherwise hold it for ever). Set it below any
    /// sender's `snapshot_bytes_per_second_max`. Default 64 KiB/s.
    pub snapshot_bytes_per_second_min: u64,
}

/// How long an incoming connection may take for its TLS and Regatta
/// handshakes.
const ACCEPT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A frame's body is read into a buffer that grows as bytes arrive, from
/// at most this: the length alone never allocates.
const FRAME_BODY_INITIAL_BYTES_MAX: usize = 64 * 1024;
/// TCP keepalive on every peer connection: a peer that vanished without a
/// reset (power loss, a partition that drops packets) is noticed within
/// about a minute, and quiesced groups are woken (`wake_all`).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// Sets TCP keepalive (`KEEPALIVE_IDLE`, `KEEPALIVE_INTERVAL`); best
/// effort.
fn keep_alive(stream: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

impl TcpConfig {
    /// Defaults for `node_id` in `cluster_id`.
    pub fn new(node_id: NodeId, cluster_id: u64) -> TcpConfig {
        TcpConfig {
            node_id,
            cluster_id,
            peers: HashMap::new(),
            peer_queue_messages_max: 16_384,
            frame_bytes_max: 64 * 1024 * 1024,
            reconnect_delay_min: Duration::from_millis(10),
            reconnect_delay_max: Duration::from_secs(1),
            tls: None,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_bytes_max: 4 * 1024 * 1024 * 1024,
            snapshot_bytes_per_second_max: None,
            incoming_snapshots_max: 4,
            snapshot_idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            resolver: None,
            incoming_connections_max: 1024,
            frame_body_timeout_min: Duration::from_secs(10),
            frame_bytes_per_second_min: 64 * 1024,
            snapshot_bytes_per_second_min: 64 * 1024,
        }
    }
}

/// Counters, for status and metrics.
#[derive(Debug, Default)]
pub struct TcpStats {
    /// Messages dropped because a peer's queue was full.
    pub dropped_messages: AtomicU64,
    /// Frames sent.
    pub frames_sent: AtomicU64,
    /// Messages sent.
    pub messages_sent: AtomicU64,
    /// Messages sent, by kind (`regatta_raft::MESSAGE_KIND_NAMES`).
    pub messages_sent_by_kind: [AtomicU64; MESSAGE_KIND_NAMES.len()],
    /// Connections that failed or broke.
    pub connection_failures: AtomicU64,
    /// Frames refused (checksum, size, type, decoding).
    pub frames_refused: AtomicU64,
    /// Incoming connections refused at the TLS or Regatta handshake.
    pub handshakes_refused: AtomicU64,
    /// Incoming connections closed at once because
    /// `incoming_connections_max` were open.
    pub connections_refused: AtomicU64,
    /// Snapshots the receiver confirmed.
    pub snapshots_sent: AtomicU64,
    /// Snapshot chunk frames sent.
    pub snapshot_chunks_sent: AtomicU64,
    /// Snapshots received whole and handed to the host.
    pub snapshots_received: AtomicU64,
    /// Incoming snapshots refused because `incoming_snapshots_max` were
    /// already being received.
    pub snapshots_refused: AtomicU64,
    /// Dials a peer refused because this node was removed from the
    /// cluster (`TcpTransport::refuse_removed` on the peer).
    pub removal_notices: AtomicU64,
}

/// How long after a node's removal is first seen its dials are still
/// taken: a node removed while it runs learns of it through Raft, and
/// meanwhile hands its leaderships over (`drain`, up to 5 s), which needs
/// its messages to go through.
const REMOVED_REFUSAL_GRACE: Duration = Duration::from_secs(10);

/// Node ids removed from the cluster, with when this node first saw each
/// removed: their dials are refused after `REMOVED_REFUSAL_GRACE`.
#[derive(Default)]
struct RemovedIds {
    since: std::sync::RwLock<BTreeMap<NodeId, tokio::time::Instant>>,
    /// Whether `since` holds any id: the check on every incoming frame
    /// takes no lock in the usual case.
    any: AtomicBool,
}

impl RemovedIds {
    /// Keeps exactly `ids`, each with when it was first seen.
    fn set(&self, ids: BTreeSet<NodeId>) {
        {
            let since = self.since.read().unwrap_or_else(|p| p.into_inner());
            if since.len() == ids.len() && ids.iter().all(|id| since.contains_key(id)) {
                return;
            }
        }
        let mut since = self.since.write().unwrap_or_else(|p| p.into_inner());
        let now = tokio::time::Instant::now();
        since.retain(|id, _| ids.contains(id));
        for id in ids {
            since.entry(id).or_insert(now);
        }
        self.any.store(!since.is_empty(), Ordering::Release);
    }

    /// Whether `node`'s dials are refused now.
    fn refuses(&self, node: NodeId) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.since
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .is_some_and(|since| since.elapsed() >= REMOVED_REFUSAL_GRACE)
    }
}

/// One peer: where it listens, its outbound queue and the task that
/// writes it.
struct Peer {
    address: PeerAddress,
    queue: Arc<PeerQueue>,
    writer: tokio::task::AbortHandle,
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.queue.close();
        self.writer.abort();
    }
}

/// A peer's outbound messages, at most `messages_max`. Senders append a
/// turn's messages under one lock; the writer takes all of them at once.
/// One lock and one wake-up per batch, not per message.
struct PeerQueue {
    messages: Mutex<Vec<(GroupId, Message)>>,
    messages_max: usize,
    /// Set when the writer has work (a stored permit: never lost).
    ready: Notify,
    closed: AtomicBool,
    /// The last attempt to connect failed: forwarded requests are not
    /// queued meanwhile (they would only be dropped at the next failure).
    unreachable: AtomicBool,
}

impl PeerQueue {
    fn new(messages_max: usize) -> PeerQueue {
        PeerQueue {
            messages: Mutex::new(Vec::new()),
            messages_max,
            ready: Notify::new(),
            closed: AtomicBool::new(false),
            unreachable: AtomicBool::new(false),
        }
    }

    /// Queues what fits; returns the messages that did not.
    fn push(&self, batch: &mut Vec<(GroupId, Message)>) -> Vec<(GroupId, Message)> {
        let mut dropped = Vec::new();
        {
            let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
            let room = self.messages_max.saturating_sub(messages.len());
            if batch.len() > room {
                dropped = batch.split_off(room);
            }
            if messages.is_empty() {
                std::mem::swap(&mut *messages, batch);
            } else {
                messages.append(batch);
            }
        }
        self.ready.notify_one();
        dropped
    }

    /// Moves everything queued into `into` (empty if nothing is).
    fn take(&self, into: &mut Vec<(GroupId, Message)>) {
        let mut messages = self.messages.lock().unwrap_or_else(|p| p.into_inner());
        if into.is_empty() {
            std::mem::swap(&mut *messages, into);
        } else {
            into.append(&mut messages);
        }
    }

    /// Drops everything queued, and returns it.
    fn clear(&self) -> Vec<(GroupId, Message)> {
        std::mem::take(&mut *self.messages.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until something may be queued; false once the queue closed.
    async fn wait(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        self.ready.notified().await;
        !self.is_closed()
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
    }
}

/// The TCP transport of one node.
pub struct TcpTransport {
    config: TcpConfig,
    /// The peers, starting with `config.peers`; changed by `set_peer` and
    /// `remove_peer` as the cluster's membership changes.
    peers: std::sync::RwLock<HashMap<NodeId, Peer>>,
    host: Arc<OnceLock<WeakNodeHost>>,
    stats: Arc<TcpStats>,
    removed: Arc<RemovedIds>,
    /// Every task this transport spawned, for `shutdown`.
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl TcpTransport {
    /// Starts serving `listener` and connecting to the peers. Incoming
    /// messages wait for [`TcpTransport::attach`] (they are dropped until a
    /// host is attached, as if lost).
    pub fn start(config: TcpConfig, listener: TcpListener) -> Arc<TcpTransport> {
        if let Some(paced) = config.snapshot_bytes_per_second_max {
            if paced < config.snapshot_bytes_per_second_min {
                tracing::warn!(
                    paced,
                    minimum = config.snapshot_bytes_per_second_min,
                    "snapshots are paced below the rate receivers with this configuration \
                     require: large ones will be cut off"
                );
            }
        }
        let host: Arc<OnceLock<WeakNodeHost>> = Arc::new(OnceLock::new());
        let stats = Arc::new(TcpStats::default());
        let removed: Arc<RemovedIds> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let mut spawned = Vec::new();
        let acceptor = accept_loop(
            config.clone(),
            listener,
            Arc::clone(&host),
            Arc::clone(&stats),
            Arc::clone(&removed),
            Arc::clone(&tasks),
        );
        spawned.push(tokio::spawn(acceptor).abort_handle());
        tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(spawned);
        let transport = Arc::new(TcpTransport {
            config: config.clone(),
            peers: std::sync::RwLock::new(HashMap::new()),
            host,
            stats,
            removed,
            tasks,
        });
        for (peer, address) in &config.peers {
            transport.set_peer(*peer, address.clone());
        }
        transport
    }

    /// Sends to `peer` at `address` from now on: a new peer gets a queue
    /// and a writer; a peer that moved gets a new writer (messages queued
    /// for the old address are dropped; Raft retransmits). This node
    /// itself is ignored.
    pub fn set_peer(&self, peer: NodeId, address: PeerAddress) {
        if peer == self.config.node_id {
            return;
        }
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if peers
            .get(&peer)
            .is_some_and(|known| known.address == address)
        {
            return;
        }
        let queue = Arc::new(PeerQueue::new(self.config.peer_queue_messages_max));
        let writer = tokio::spawn(peer_writer(
            self.config.clone(),
            address.clone(),
            Arc::clone(&queue),
            Arc::clone(&self.stats),
            Arc::clone(&self.host),
        ))
        .abort_handle();
        {
            let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            tasks.retain(|task| !task.is_finished());
            tasks.push(writer.clone());
        }
        // A replaced peer's writer stops as the old `Peer` drops.
        peers.insert(
            peer,
            Peer {
                address,
                queue,
                writer,
            },
        );
    }

    /// Stops sending to `peer` (it left the cluster).
    pub fn remove_peer(&self, peer: NodeId) {
        // Its writer stops as the `Peer` drops.
        self.peers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&peer);
    }

    /// From now on, refuses the dials of these nodes, removed from the
    /// cluster, with an answer that tells them so (a node removed while
    /// it was down learns it when it comes back, and stops).
    /// An id is refused only `REMOVED_REFUSAL_GRACE` after it first
    /// appears here, and no longer once it is left out.
    pub fn refuse_removed(&self, ids: BTreeSet<NodeId>) {
        self.removed.set(ids);
    }

    /// Whether a peer refused this node's dial because this node was
    /// removed from the cluster.
    pub fn told_removed(&self) -> bool {
        self.stats.removal_notices.load(Ordering::Relaxed) > 0
    }

    /// The peers this node sends to, with their addresses.
    pub fn peer_addresses(&self) -> HashMap<NodeId, PeerAddress> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, peer)| (*id, peer.address.clone()))
            .collect()
    }

    /// Hands incoming messages to `host` from now on. Held weakly: the
    /// host owns the transport, not the other way round.
    pub fn attach(&self, host: &NodeHost) {
        let _ = self.host.set(host.downgrade());
    }

    /// Stops every task: the listener closes, connections drop (a crash,
    /// as far as peers can tell).
    pub fn shutdown(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Counters.
    pub fn stats(&self) -> &TcpStats {
        &self.stats
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }
}

impl Transport for TcpTransport {
    /// A snapshot travels on a connection of its own, so that a large one
    /// never holds up heartbeats; it is delivered only when the receiver
    /// confirms it, and the outcome is reported to this node's host.
    fn send_snapshot(&self, group: GroupId, message: Message, data: SnapshotData) {
        let to = message.to;
        let report = {
            let host = Arc::clone(&self.host);
            move |delivered: bool| {
                if let Some(host) = host.get().and_then(WeakNodeHost::upgrade) {
                    host.report_snapshot(group, to, delivered);
                }
            }
        };
        let address = self
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&to)
            .map(|peer| peer.address.clone());
        let Some(address) = address else {
            report(false);
            return;
        };
        let config = self.config.clone();
        let stats = Arc::clone(&self.stats);
        let task = tokio::spawn(async move {
            let delivered = send_snapshot_stream(&config, &address, group, &message, &data, &stats)
                .await
                .is_ok();
            if delivered {
                stats.snapshots_sent.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.connection_failures.fetch_add(1, Ordering::Relaxed);
            }
            report(delivered);
        });
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(task.abort_handle());
    }

    fn send(&self, messages: Vec<(GroupId, Message)>) {
        // Split by receiver, keeping each receiver's order; one queue push
        // per peer. Almost always all to one peer or split in few.
        let mut by_peer: Vec<(NodeId, Vec<(GroupId, Message)>)> = Vec::new();
        for (group, message) in messages {
            let to = message.to;
            match by_peer.iter_mut().find(|(peer, _)| *peer == to) {
                Some((_, batch)) => batch.push((group, message)),
                None => by_peer.push((to, vec![(group, message)])),
            }
        }
        let mut unsent = Vec::new();
        {
            let peers = self.peers.read().unwrap_or_else(|p| p.into_inner());
            for (to, mut batch) in by_peer {
                let Some(peer) = peers.get(&to) else {
                    self.stats
                        .dropped_messages
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    unsent.push((batch, UnsentCause::UnknownPeer));
                    continue;
                };
                if peer.queue.unreachable.load(Ordering::Acquire) {
                    let (forwarded, rest): (Vec<_>, Vec<_>) = batch
                        .into_iter()
                        .partition(|(_, message)| message.body.is_forward());
                    batch = rest;
                    if !forwarded.is_empty() {
                        self.stats
                            .dropped_messages
                            .fetch_add(forwarded.len() as u64, Ordering::Relaxed);
                        unsent.push((forwarded, UnsentCause::Unreachable));
                    }
                }
                let dropped = peer.queue.push(&mut batch);
                if !dropped.is_empty() {
                    self.stats
                        .dropped_messages
                        .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                    unsent.push((dropped, UnsentCause::QueueFull));
                }
            }
        }
        for (dropped, cause) in unsent {
            report_unsent(&self.host, &dropped, cause);
        }
    }
}

/// Sends one peer's queue: connect, handshake, then one frame per wake-up
/// holding everything queued; on any failure, reconnect with back-off (the
/// messages of a failed frame are lost; Raft retransmits).
async fn peer_writer(
    config: TcpConfig,
    address: PeerAddress,
    queue: Arc<PeerQueue>,
    stats: Arc<TcpStats>,
    host: Arc<OnceLock<WeakNodeHost>>,
) {
    let mut delay = config.reconnect_delay_min;
    let mut pending: Vec<(GroupId, Message)> = Vec::new();
    // The last failure logged, and when: a peer that stays down is logged
    // when the reason changes and at most once a minute otherwise.
    let mut logged: Option<(String, tokio::time::Instant)> = None;
    loop {
        let (mut stream, version) = match connect(&config, &address).await {
            Ok(connected) => {
                queue.unreachable.store(false, Ordering::Release);
                delay = config.reconnect_delay_min;
                if logged.take().is_some() {
                    tracing::info!(peer = %address, "peer reachable again");
                }
                connected
            }
            Err(error) => {
                if error
                    .get_ref()
                    .is_some_and(|inner| inner.is::<RemovedByPeer>())
                {
                    stats.removal_notices.fetch_add(1, Ordering::Relaxed);
                }
                let reason = error.to_string();
                let now = tokio::time::Instant::now();
                let due = logged.as_ref().is_none_or(|(last, at)| {
                    *last != reason || now.duration_since(*at) >= CONNECT_FAILURE_LOG_INTERVAL
                });
                if due {
                    tracing::warn!(peer = %address, error = %reason, "cannot reach peer");
                    logged = Some((reason, now));
                }
                queue.unreachable.store(true, Ordering::Release);
                // Do not let the queue fill with stale messages meanwhile.
                let dropped = queue.clear();
                report_unsent(&host, &dropped, UnsentCause::Unreachable);
                stats.connection_failures.fetch_add(1, Ordering::Relaxed);
                if queue.is_closed() {
                    return;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(config.reconnect_delay_max);
                continue;
            }
        };
        let sent = send_until_broken(&config, &mut stream, version, &queue, &mut pending, &stats);
        if !sent.await {
            return;
        }
        // What a broken connection was writing may or may not have
        // arrived; it is not sent again.
        report_unsent(&host, &pending, UnsentCause::ConnectionBroke);
        pending.clear();
        // Lost after being connected: wake once; retries while the peer
        // stays down do not wake anything again.
        stats.connection_failures.fetch_add(1, Ordering::Relaxed);
        wake_groups(&host);
    }
}

/// Tells the host about messages it handed over and this transport did
/// not send (see `NodeHost::report_unsent`).
fn report_unsent(
    host: &OnceLock<WeakNodeHost>,
    messages: &[(GroupId, Message)],
    cause: UnsentCause,
) {
    if messages.is_empty() {
        return;
    }
    if let Some(host) = host.get().and_then(WeakNodeHost::upgrade) {
        host.report_unsent(messages, cause);
    }
}

/// A lost peer may have been a leader: quiesced groups must tick again to
/// notice.
fn wake_groups(host: &OnceLock<WeakNodeHost>) {
    if let Some(host) = host.get().and_then(WeakNodeHost::upgrade) {
        host.wake_all();
    }
}

/// Sends frames until the connection breaks (true) or the queue closes
/// (false). The peer never writes after the handshake, so a readable
/// socket means end of file: the peer is gone even if we had nothing to
/// send.
async fn send_until_broken(
    config: &TcpConfig,
    stream: &mut BoxedStream,
    version: u32,
    queue: &PeerQueue,
    pending: &mut Vec<(GroupId, Message)>,
    stats: &TcpStats,
) -> bool {
    let mut probe = [0u8; 1];
    loop {
        queue.take(pending);
        if pending.is_empty() {
            tokio::select! {
                open = queue.wait() => if !open {
                    return false;
                },
                _ = stream.read(&mut probe) => return true,
            }
            // Let this turn's other senders queue theirs, so that they
            // leave in this frame rather than in one each.
            tokio::task::yield_now().await;
            continue;
        }
        if version < FORMAT_VERSION {
            // An older peer closes the connection on a kind it does not
            // know: what it cannot decode is dropped here (and counted).
            let before = pending.len();
            pending.retain(|(_, message)| peer_understands(version, message));
            let unknown = (before - pending.len()) as u64;
            stats.dropped_messages.fetch_add(unknown, Ordering::Relaxed);
            if pending.is_empty() {
                continue;
            }
        }
        let count = pending.len() as u64;
        let mut by_kind = [0u64; MESSAGE_KIND_NAMES.len()];
        for (_, message) in pending.iter() {
            by_kind[message.body.kind_index()] += 1;
        }
        let (frames, oversized) = encode_frames(pending, config.frame_bytes_max as usize);
        stats
            .dropped_messages
            .fetch_add(oversized, Ordering::Relaxed);
        // `pending` is kept until the frames are written: on a broken
        // connection, the caller reports what they held.
        for frame in &frames {
            if stream.write_all(frame).await.is_err() {
                return true;
            }
        }
        if stream.flush().await.is_err() {
            return true;
        }
        pending.clear();
        stats
            .frames_sent
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
        stats
            .messages_sent
            .fetch_add(count - oversized, Ordering::Relaxed);
        // Counted as handed to the socket: the rare message too large for
        // a frame (dropped, and counted there) is included.
        for (counter, sent) in stats.messages_sent_by_kind.iter().zip(by_kind) {
            if sent > 0 {
                counter.fetch_add(sent, Ordering::Relaxed);
            }
        }
    }
}

/// Dials `address` at this build's transport format, or, while the peer
/// answers that it does not speak it, at each older one in turn down to
/// `FORMAT_VERSION_MIN`. Returns the stream and the version the peer
/// accepted.
async fn connect(config: &TcpConfig, address: &PeerAddress) -> std::io::Result<(BoxedStream, u32)> {
    let mut version = FORMAT_VERSION;
    loop {
        match connect_at(config, address, version).await {
            Ok(stream) => return Ok((stream, version)),
            Err(error)
                if error.kind() == std::io::ErrorKind::Unsupported
                    && version > FORMAT_VERSION_MIN =>
            {
                version -= 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Dials `address` at transport format `version`: a name is resolved on
/// every call, and each address it stands for is tried in the resolver's
/// order, each step bounded by `connect_timeout`.
async fn connect_at(
    config: &TcpConfig,
    address: &PeerAddress,
    version: u32,
) -> std::io::Result<BoxedStream> {
    let limit = config.connect_timeout;
    let timed_out = |what: String| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} took longer than {limit:?}"),
        )
    };
    let resolved = tokio::time::timeout(limit, address.resolve_with(config.resolver.as_ref()))
        .await
        .map_err(|_| timed_out(format!("resolving {address}")))??;
    let mut tcp = None;
    let mut last_error = None;
    for candidate in resolved {
        match tokio::time::timeout(limit, TcpStream::connect(candidate)).await {
            Ok(Ok(stream)) => {
                tcp = Some(stream);
                break;
            }
            Ok(Err(error)) => {
                last_error = Some(std::io::Error::new(
                    error.kind(),
                    format!("connect to {candidate}: {error}"),
                ))
            }
            Err(_) => last_error = Some(timed_out(format!("connecting to {candidate}"))),
        }
    }
    let Some(tcp) = tcp else {
        return Err(last_error.unwrap_or_else(|| {
            std::io::Error::other(format!("{address} resolves to no address"))
        }));
    };
    tokio::time::timeout(limit, handshake(config, address, tcp, version))
        .await
        .map_err(|_| timed_out(format!("the handshake with {address}")))?
}

/// The TLS (when configured) and Regatta handshakes on a connected socket.
async fn handshake(
    config: &TcpConfig,
    address: &PeerAddress,
    tcp: TcpStream,
    version: u32,
) -> std::io::Result<BoxedStream> {
    tcp.set_nodelay(true)?;
    keep_alive(&tcp);
    let mut stream: BoxedStream = match &config.tls {
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.client));
            let name = match &tls.server_name {
                Some(name) => name.clone(),
                None => address.tls_server_name().ok_or_else(|| {
                    std::io::Error::other(format!("{address}: not a valid TLS server name"))
                })?,
            };
            Box::new(connector.connect(name, tcp).await?)
        }
        None => Box::new(tcp),
    };
    let mut handshake = Vec::with_capacity(HANDSHAKE_BYTES);
    handshake.extend_from_slice(HANDSHAKE_MAGIC);
    handshake.extend_from_slice(&version.to_le_bytes());
    handshake.extend_from_slice(&config.cluster_id.to_le_bytes());
    handshake.extend_from_slice(&config.node_id.0.to_le_bytes());
    stream.write_all(&handshake).await?;
    stream.flush().await?;
    let answer = stream.read_u8().await?;
    if answer == ANSWER_WRONG_VERSION {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("peer refused the handshake: it does not speak transport format {version}"),
        ));
    }
    if answer == ANSWER_REMOVED {
        return Err(std::io::Error::other(RemovedByPeer));
    }
    if answer != ANSWER_ACCEPTED {
        return Err(std::io::Error::other(format!(
            "peer refused the handshake ({answer})"
        )));
    }
    Ok(stream)
}

/// A peer's answer to this node's dial: this node was removed from the
/// cluster.
#[derive(Debug)]
struct RemovedByPeer;

impl std::fmt::Display for RemovedByPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the peer refused the handshake: this node was removed from the cluster")
    }
}

impl std::error::Error for RemovedByPeer {}

/// Streams one snapshot: connect, a header frame (data length, then the
/// message as a batch of one), chunk frames, then wait for the receiver's
/// confirmation.
async fn send_snapshot_stream(
    config: &TcpConfig,
    address: &PeerAddress,
    group: GroupId,
    message: &Message,
    data: &SnapshotData,
    stats: &TcpStats,
) -> std::io::Result<()> {
    let chunk_bytes = config
        .snapshot_chunk_bytes
        .clamp(1, config.frame_bytes_max.saturating_sub(1).max(1)) as usize;
    let mut header = vec![FRAME_SNAPSHOT_HEADER];
    header.extend_from_slice(&data.len().to_le_bytes());
    encode_batch(&[(group, message.clone())], &mut header);
    if header.len() > config.frame_bytes_max as usize {
        return Err(std::io::Error::other(
            "snapshot message over frame_bytes_max",
        ));
    }
    let idle = config.snapshot_idle_timeout;
    let mut file = tokio::fs::File::open(data.path()).await?;
    let (mut stream, _) = within(idle, connect(config, address)).await?;
    within(
        idle,
        write_frame_parts(&mut stream, &header[..1], &header[1..]),
    )
    .await?;
    let started = tokio::time::Instant::now();
    let mut sent_bytes: u64 = 0;
    let mut chunk = vec![0u8; chunk_bytes];
    while sent_bytes < data.len() {
        let wanted = (data.len() - sent_bytes).min(chunk_bytes as u64) as usize;
        let chunk = &mut chunk[..wanted];
        file.read_exact(chunk).await?;
        within(
            idle,
            write_frame_parts(&mut stream, &[FRAME_SNAPSHOT_CHUNK], chunk),
        )
        .await?;
        stats.snapshot_chunks_sent.fetch_add(1, Ordering::Relaxed);
        sent_bytes += chunk.len() as u64;
        if let Some(rate) = config.snapshot_bytes_per_second_max.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(sent_bytes as f64 / rate as f64);
            tokio::time::sleep_until(started + due).await;
        }
    }
    within(idle, stream.flush()).await?;
    if within(idle, stream.read_u8()).await? != ANSWER_SNAPSHOT_DELIVERED {
        return Err(std::io::Error::other("snapshot refused"));
    }
    Ok(())
}

/// Runs `operation`, failing with `TimedOut` when it takes over `limit`.
async fn within<T>(
    limit: Duration,
    operation: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "a snapshot stream step took longer than snapshot_idle_timeout",
        )),
    }
}

/// Writes one frame whose body is `kind` followed by `data`, without
/// copying `data`.
async fn write_frame_parts(
    stream: &mut BoxedStream,
    kind: &[u8],
    data: &[u8],
) -> std::io::Result<()> {
    let length = (kind.len() + data.len()) as u32;
    let checksum = crc32c::crc32c_append(crc32c::crc32c(kind), data);
    let mut prefix = Vec::with_capacity(8 + kind.len());
    prefix.extend_from_slice(&length.to_le_bytes());
    prefix.extend_from_slice(&checksum.to_le_bytes());
    prefix.extend_from_slice(kind);
    stream.write_all(&prefix).await?;
    stream.write_all(data).await
}

/// Encodes `messages` as message-batch frames of at most `body_bytes_max`
/// each: usually one frame; more when the batch is larger. A single
/// message over the limit is dropped; the count of those is returned.
fn encode_frames(messages: &[(GroupId, Message)], body_bytes_max: usize) -> (Vec<Vec<u8>>, u64) {
    let mut body = vec![FRAME_MESSAGE_BATCH];
    encode_batch(messages, &mut body);
    if body.len() <= body_bytes_max {
        return (vec![seal_frame(&body)], 0);
    }
    // Too large as one frame: pack message by message.
    let mut frames = Vec::new();
    let mut oversized = 0;
    let mut packed: Vec<u8> = Vec::new();
    let mut packed_count: u32 = 0;
    let mut one = Vec::new();
    for (group, message) in messages {
        one.clear();
        encode_message(*group, message, &mut one);
        if 5 + one.len() > body_bytes_max {
            oversized += 1;
            continue;
        }
        if 5 + packed.len() + one.len() > body_bytes_max {
            frames.push(batch_frame(packed_count, &packed));
            packed.clear();
            packed_count = 0;
        }
        packed.extend_from_slice(&one);
        packed_count += 1;
    }
    if packed_count > 0 {
        frames.push(batch_frame(packed_count, &packed));
    }
    (frames, oversized)
}

/// A message-batch frame of `count` already encoded messages.
fn batch_frame(count: u32, messages: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + messages.len());
    body.push(FRAME_MESSAGE_BATCH);
    body.extend_from_slice(&count.to_le_bytes());
    body.extend_from_slice(messages);
    seal_frame(&body)
}

/// Prefixes a frame body with its length and checksum.
fn seal_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 8);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

async fn accept_loop(
    config: TcpConfig,
    listener: TcpListener,
    host: Arc<OnceLock<WeakNodeHost>>,
    stats: Arc<TcpStats>,
    removed: Arc<RemovedIds>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
) {
    let snapshot_slots = Arc::new(tokio::sync::Semaphore::new(config.incoming_snapshots_max));
    let connection_slots = Arc::new(tokio::sync::Semaphore::new(
        config.incoming_connections_max.max(1),
    ));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(slot) = Arc::clone(&connection_slots).try_acquire_owned() else {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        keep_alive(&stream);
        let connection = tokio::spawn(serve_connection(
            config.clone(),
            stream,
            Arc::clone(&host),
            Arc::clone(&stats),
            Arc::clone(&removed),
            Arc::clone(&snapshot_slots),
            slot,
        ));
        let mut tasks = tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|task| !task.is_finished());
        tasks.push(connection.abort_handle());
    }
}

/// Accepts one connection (TLS first, when configured), then reads the
/// peer's frames until the connection ends or a frame is bad.
async fn serve_connection(
    config: TcpConfig,
    tcp: TcpStream,
    host: Arc<OnceLock<WeakNodeHost>>,
    stats: Arc<TcpStats>,
    removed: Arc<RemovedIds>,
    snapshot_slots: Arc<tokio::sync::Semaphore>,
    _slot: tokio::sync::OwnedSemaphorePermit,
) {
    let stream: BoxedStream = match &config.tls {
        Some(tls) => {
            let accept = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.server)).accept(tcp);
            match tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(stream)) => Box::new(stream),
                Ok(Err(_)) | Err(_) => {
                    stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        None => Box::new(tcp),
    };
    serve_stream(config, stream, host, stats, &removed, snapshot_slots).await;
}

async fn serve_stream(
    config: TcpConfig,
    mut stream: BoxedStream,
    host: Arc<OnceLock<WeakNodeHost>>,
    stats: Arc<TcpStats>,
    removed: &RemovedIds,
    snapshot_slots: Arc<tokio::sync::Semaphore>,
) {
    let Some(sender) = accept_handshake(&config, &mut stream, removed).await else {
        stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut stream: IncomingStream =
        tokio::io::BufReader::with_capacity(INCOMING_BUFFER_BYTES, stream);
    loop {
        let Some(body) = read_frame(&config, &mut stream, &stats).await else {
            return;
        };
        // A node removed since its handshake: closed, so that it dials
        // again and hears why.
        if removed.refuses(sender) {
            return;
        }
        if body[0] == FRAME_SNAPSHOT_HEADER {
            let Ok(_slot) = snapshot_slots.try_acquire() else {
                stats.snapshots_refused.fetch_add(1, Ordering::Relaxed);
                return;
            };
            receive_snapshot(
                &config,
                &mut stream,
                Bytes::from(body),
                sender,
                &host,
                &stats,
            )
            .await;
            return;
        }
        let Some(messages) = checked_batch(body, sender) else {
            stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if let Some(host) = host.get().and_then(WeakNodeHost::upgrade) {
            host.deliver(messages);
        }
    }
}

/// Reads and answers a dialling peer's handshake: the sender's id when it
/// is accepted; `None` (the caller counts the refusal) when it was bad,
/// of another version or cluster, from a removed node, or the answer
/// could not be written.
async fn accept_handshake(
    config: &TcpConfig,
    stream: &mut BoxedStream,
    removed: &RemovedIds,
) -> Option<NodeId> {
    let mut handshake = [0u8; HANDSHAKE_BYTES];
    let read = tokio::time::timeout(ACCEPT_HANDSHAKE_TIMEOUT, stream.read_exact(&mut handshake));
    if !matches!(read.await, Ok(Ok(_))) || &handshake[0..8] != HANDSHAKE_MAGIC {
        return None;
    }
    let version = u32::from_le_bytes([handshake[8], handshake[9], handshake[10], handshake[11]]);
    let mut cluster = [0u8; 8];
    cluster.copy_from_slice(&handshake[12..20]);
    let mut sender = [0u8; 8];
    sender.copy_from_slice(&handshake[20..28]);
    let sender = NodeId(u64::from_le_bytes(sender));
    let answer = if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        ANSWER_WRONG_VERSION
    } else if u64::from_le_bytes(cluster) != config.cluster_id {
        ANSWER_WRONG_CLUSTER
    } else if removed.refuses(sender) {
        tracing::info!(
            node = sender.0,
            "refused a dial from a node removed from the cluster"
        );
        ANSWER_REMOVED
    } else {
        ANSWER_ACCEPTED
    };
    let answered = stream.write_u8(answer).await.is_ok() && stream.flush().await.is_ok();
    (answered && answer == ANSWER_ACCEPTED).then_some(sender)
}

/// The messages of a message batch frame `body` from `sender`, or `None`
/// for a frame to refuse: not a batch, undecodable, a message claiming
/// another sender (a removed node posing as a member), or a snapshot
/// message, which comes only with its data on a snapshot stream (without
/// it the group could not install what it accepted).
fn checked_batch(body: Vec<u8>, sender: NodeId) -> Option<Vec<(GroupId, Message)>> {
    if body[0] != FRAME_MESSAGE_BATCH {
        return None;
    }
    let batch = Bytes::from(body).slice(1..);
    let messages = decode_batch(&batch).ok()?;
    let forged = messages.iter().any(|(_, message)| message.from != sender);
    let snapshot = messages
        .iter()
        .any(|(_, message)| matches!(message.body, regatta_raft::MessageBody::Snapshot { .. }));
    (!forged && !snapshot).then_some(messages)
}

/// Reads one frame body (at least the type byte); `None` when the
/// connection ended or the frame is bad (counted).
async fn read_frame(
    config: &TcpConfig,
    stream: &mut IncomingStream,
    stats: &TcpStats,
) -> Option<Vec<u8>> {
    let length = stream.read_u32_le().await.ok()?;
    let checksum = stream.read_u32_le().await.ok()?;
    if length == 0 || length > config.frame_bytes_max {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    // 32 bytes spare: `read_to_end` keeps that much room to look for more,
    // and would otherwise grow a buffer that the body just filled.
    let mut body = Vec::with_capacity((length as usize).min(FRAME_BODY_INITIAL_BYTES_MAX) + 32);
    let deadline = config.frame_body_timeout_min
        + Duration::from_millis(
            u64::from(length) * 1_000 / config.frame_bytes_per_second_min.max(1),
        );
    let mut limited = (&mut *stream).take(u64::from(length));
    let read = limited.read_to_end(&mut body);
    match tokio::time::timeout(deadline, read).await {
        Ok(Ok(read)) if read == length as usize => {}
        Ok(Ok(_)) | Ok(Err(_)) => return None,
        Err(_) => {
            stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    }
    if crc32c::crc32c(&body) != checksum {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    Some(body)
}

/// Receives the rest of a snapshot whose header frame is `header`:
/// assembles exactly the announced bytes from chunk frames, hands the
/// snapshot to the host, and confirms it. Anything malformed or over
/// `snapshot_bytes_max` closes the connection unconfirmed (counted).
async fn receive_snapshot(
    config: &TcpConfig,
    stream: &mut IncomingStream,
    header: Bytes,
    sender: NodeId,
    host: &OnceLock<WeakNodeHost>,
    stats: &TcpStats,
) {
    let Some((group, message, total_bytes)) = decode_snapshot_header(&header) else {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if message.from != sender {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if total_bytes > config.snapshot_bytes_max {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // Written to disk as it arrives; never held whole in memory.
    let Some(receiver) = host.get().and_then(WeakNodeHost::upgrade) else {
        return;
    };
    // Only for this node, and a group it hosts: anything else would fill
    // the disk for nothing and hold a slot.
    if message.to != config.node_id || !receiver.hosts_group(group) {
        stats.frames_refused.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let Ok((file, pending)) = receiver.snapshot_dir().create() else {
        return;
    };
    drop(receiver);
    let file = tokio::io::BufWriter::new(tokio::fs::File::from_std(file));
    if receive_snapshot_data(config, stream, stats, file, total_bytes)
        .await
        .is_none()
    {
        return;
    }
    let data = pending.finish(total_bytes);
    if !snapshot_data_opens(group, message.from, &data, stats).await {
        return;
    }
    let Some(host) = host.get().and_then(WeakNodeHost::upgrade) else {
        return;
    };
    if !host.deliver_snapshot(group, message, data) {
        return;
    }
    stats.snapshots_received.fetch_add(1, Ordering::Relaxed);
    let _ = stream.write_u8(ANSWER_SNAPSHOT_DELIVERED).await;
    let _ = stream.flush().await;
}

/// Copies exactly `total_bytes` of snapshot data from chunk frames into
/// `file`, then syncs it (here, off the worker: the host links it durably
/// before the WAL records its install, and that sync is then cheap).
/// `None` when the transfer failed: a bad or oversized chunk, a stall past
/// the idle timeout, the whole transfer past its deadline (chunks
/// trickled each just inside the idle timeout would hold the slot for
/// ever), or a write that failed.
async fn receive_snapshot_data(
    config: &TcpConfig,
    stream: &mut IncomingStream,
    stats: &TcpStats,
    mut file: tokio::io::BufWriter<tokio::fs::File>,
    total_bytes: u64,
) -> Option<()> {
    let mut received: u64 = 0;
    let whole = config.snapshot_idle_timeout
        + Duration::from_millis(
            total_bytes.saturating_mul(1_000) / config.snapshot_bytes_per_second_min.max(1),
        );
    let deadline = tokio::time::Instant::now() + whole;
    while received < total_bytes {
        let idle = tokio::time::Instant::now() + config.snapshot_idle_timeout;
        let frame = tokio::time::timeout_at(idle.min(deadline), read_frame(config, stream, stats));
        let Ok(Some(body)) = frame.await else {
            if tokio::time::Instant::now() >= deadline {
                stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            }
            return None;
        };
        let chunk = &body[1..];
        if body[0] != FRAME_SNAPSHOT_CHUNK
            || chunk.is_empty()
            || received + chunk.len() as u64 > total_bytes
        {
            stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        file.write_all(chunk).await.ok()?;
        received += chunk.len() as u64;
    }
    file.flush().await.ok()?;
    file.get_ref().sync_all().await.ok()
}

/// Whether a received snapshot's data opens. It is opened once before
/// Raft sees it (off the runtime: the session table is read from disk):
/// data the apply thread could not open would stop the group after Raft
/// had already accepted the snapshot.
async fn snapshot_data_opens(
    group: GroupId,
    from: NodeId,
    data: &SnapshotData,
    stats: &TcpStats,
) -> bool {
    let checked = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || crate::host::check_snapshot_data(&data)).await
    };
    match checked {
        Ok(Ok(())) => true,
        Ok(Err(error)) => {
            tracing::warn!(group = group.0, from = from.0, %error, "refused a snapshot whose data does not open");
            stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            false
        }
        Err(_) => false,
    }
}

/// Decodes a snapshot header body: type, data length u64, then a batch of
/// exactly one message, which must be a `Snapshot`.
fn decode_snapshot_header(body: &Bytes) -> Option<(GroupId, Message, u64)> {
    if body.len() < 9 {
        return None;
    }
    let mut length = [0u8; 8];
    length.copy_from_slice(&body[1..9]);
    let mut messages = decode_batch(&body.slice(9..)).ok()?;
    let (group, message) = messages.pop()?;
    if !messages.is_empty() || !matches!(message.body, regatta_raft::MessageBody::Snapshot { .. }) {
        return None;
    }
    Some((group, message, u64::from_le_bytes(length)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use regatta_raft::{MessageBody, Term};

    fn heartbeat(round: u64) -> (GroupId, Message) {
        let message = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(1),
            body: MessageBody::Heartbeat {
                commit: regatta_raft::LogIndex(0),
                round,
            },
        };
        (GroupId(round), message)
    }

    fn decode_frames(frames: &[Vec<u8>], body_bytes_max: usize) -> Vec<(GroupId, Message)> {
        let mut messages = Vec::new();
        for frame in frames {
            let body = &frame[8..];
            assert!(body.len() <= body_bytes_max, "frame over the limit");
            assert_eq!(body[0], FRAME_MESSAGE_BATCH);
            let checksum = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
            assert_eq!(crc32c::crc32c(body), checksum);
            let batch = Bytes::copy_from_slice(&body[1..]);
            messages.extend(decode_batch(&batch).expect("decodes"));
        }
        messages
    }

    #[test]
    fn a_large_batch_is_split_into_frames_under_the_limit() {
        let messages: Vec<_> = (0..1_000).map(heartbeat).collect();
        let (one, dropped) = encode_frames(&messages, 64 * 1024 * 1024);
        assert_eq!((one.len(), dropped), (1, 0));
        assert_eq!(decode_frames(&one, 64 * 1024 * 1024), messages);
        let (many, dropped) = encode_frames(&messages, 1_000);
        assert_eq!(dropped, 0);
        assert!(many.len() > 10, "{} frames", many.len());
        assert_eq!(decode_frames(&many, 1_000), messages, "order kept");
    }

    #[test]
    fn a_peer_queue_keeps_order_and_drops_what_exceeds_its_bound() {
        let queue = PeerQueue::new(5);
        let mut first: Vec<_> = (0..3).map(heartbeat).collect();
        assert_eq!(queue.push(&mut first), Vec::new());
        let mut second: Vec<_> = (3..7).map(heartbeat).collect();
        assert_eq!(
            queue.push(&mut second),
            (5..7).map(heartbeat).collect::<Vec<_>>(),
            "the two over the bound of 5, returned"
        );
        let mut taken = Vec::new();
        queue.take(&mut taken);
        assert_eq!(taken, (0..5).map(heartbeat).collect::<Vec<_>>());
        // Taken messages free their room.
        let mut third: Vec<_> = (7..9).map(heartbeat).collect();
        assert_eq!(queue.push(&mut third), Vec::new());
        let mut rest = Vec::new();
        queue.take(&mut rest);
        assert_eq!(rest, (7..9).map(heartbeat).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_peer_queue_wakes_its_writer_once_per_push_and_on_close() {
        let queue = Arc::new(PeerQueue::new(16));
        // A push before the writer waits is not lost.
        queue.push(&mut vec![heartbeat(1)]);
        assert!(queue.wait().await);
        let writer = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.wait().await })
        };
        tokio::task::yield_now().await;
        queue.close();
        assert!(!writer.await.expect("writer"), "closed");
        assert!(!queue.wait().await, "stays closed");
    }

    /// A peer of an older transport format (a rolling upgrade) refuses
    /// this build's version: the writer dials it again at each older
    /// version until it accepts, and never sends it a kind it cannot
    /// decode, which would close the connection.
    async fn dial_an_older_peer(peer_version: u32) -> (Vec<u32>, Vec<MessageBody>, u64) {
        let old_peer = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let peer_address = old_peer.local_addr().expect("address");
        let (versions_tx, mut versions) = tokio::sync::mpsc::unbounded_channel();
        let (batches_tx, mut batches) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = old_peer.accept().await else {
                    return;
                };
                let mut handshake = [0u8; HANDSHAKE_BYTES];
                if socket.read_exact(&mut handshake).await.is_err() {
                    continue;
                }
                let version = u32::from_le_bytes(handshake[8..12].try_into().expect("4 bytes"));
                let _ = versions_tx.send(version);
                if version > peer_version {
                    let _ = socket.write_u8(ANSWER_WRONG_VERSION).await;
                    continue;
                }
                socket.write_u8(ANSWER_ACCEPTED).await.expect("answer");
                let length = socket.read_u32_le().await.expect("length");
                let _checksum = socket.read_u32_le().await.expect("checksum");
                let mut body = vec![0u8; length as usize];
                socket.read_exact(&mut body).await.expect("body");
                assert_eq!(body[0], FRAME_MESSAGE_BATCH);
                let batch = decode_batch(&Bytes::copy_from_slice(&body[1..])).expect("decodes");
                let _ = batches_tx.send(batch);
                return;
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let transport = TcpTransport::start(TcpConfig::new(NodeId(1), 7), listener);
        transport.set_peer(NodeId(2), PeerAddress::from(peer_address));
        let refusal = |body| Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(0),
            body,
        };
        let not_leader = regatta_raft::Refusal::NotLeader { leader_hint: None };
        let proposals_refused = refusal(MessageBody::ProposeRefused {
            ids: Vec::new(),
            refusal: not_leader.clone(),
        });
        let reads_refused = refusal(MessageBody::ReadRefused {
            ids: vec![regatta_raft::ReadId(1)],
            refusal: not_leader,
        });
        let (group, heartbeat) = heartbeat(3);
        transport.send(vec![
            (group, proposals_refused),
            (group, reads_refused),
            (group, heartbeat),
        ]);
        let batch = tokio::time::timeout(Duration::from_secs(10), batches.recv())
            .await
            .expect("a batch in time")
            .expect("a batch");
        let mut dialled = Vec::new();
        while let Ok(version) = versions.try_recv() {
            dialled.push(version);
        }
        let dropped = transport.stats().dropped_messages.load(Ordering::Relaxed);
        transport.shutdown();
        let bodies = batch.into_iter().map(|(_, message)| message.body).collect();
        (dialled, bodies, dropped)
    }

    #[tokio::test]
    async fn a_version_2_peer_is_dialled_at_2_and_sent_no_read_refusals() {
        let (dialled, bodies, dropped) = dial_an_older_peer(2).await;
        assert_eq!(dialled, vec![3, 2], "this build's version, then the peer's");
        assert!(
            matches!(
                bodies.as_slice(),
                [
                    MessageBody::ProposeRefused { .. },
                    MessageBody::Heartbeat { .. }
                ]
            ),
            "{bodies:?}"
        );
        assert_eq!(dropped, 1);
    }

    #[tokio::test]
    async fn a_version_1_peer_is_dialled_at_1_and_sent_no_refusals() {
        let (dialled, bodies, dropped) = dial_an_older_peer(1).await;
        assert_eq!(dialled, vec![3, 2, 1], "each version down to the peer's");
        assert!(
            matches!(bodies.as_slice(), [MessageBody::Heartbeat { .. }]),
            "{bodies:?}"
        );
        assert_eq!(dropped, 2);
    }

    #[test]
    fn a_message_over_the_limit_alone_is_dropped() {
        let (frames, dropped) = encode_frames(&[heartbeat(1)], 20);
        assert_eq!((frames.len(), dropped), (0, 1));
    }
}
