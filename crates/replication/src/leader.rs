//! The leader cluster's side: `Metadata.Get` lists the tables, and
//! `Log.Replicate` streams a table's log after a given index, then stays
//! open and sends each new command as soon as it applies on this node.
//!
//! Entries are read from the WAL (`NodeHost::log_entries`), never through
//! the table's Raft loop; the stream waits on the table's applied index
//! (`NodeHost::applied_index_watch`), not on a timer. Any node of the
//! leader cluster can serve: everything at or below its applied index is
//! committed.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use regatta_multiraft::{AppliedWatch, NodeHost, SessionFilter};
use regatta_raft::{Entry, EntryPayload, LogIndex};
use regatta_server::Node;
use regatta_wal::GroupId;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::proto;

/// Commands in one `ReplicateResponse`, at most (bytes of payload).
pub const RESPONSE_BYTES_MAX: u64 = 4 << 20;

/// With nothing new for this long, the stream sends an empty response
/// carrying the leader's applied index.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// Responses buffered per stream before the sender waits for the client.
const STREAM_BUFFER_RESPONSES: usize = 4;

/// Bytes of table snapshot data in one `SnapshotChunk`.
pub const SNAPSHOT_CHUNK_BYTES: usize = regatta_server::restore::SNAPSHOT_CHUNK_BYTES;

/// The replication API over one leader-cluster node.
#[derive(Clone)]
pub struct LeaderService {
    node: Arc<Node>,
}

impl LeaderService {
    /// Serves `node`'s tables.
    pub fn new(node: Arc<Node>) -> LeaderService {
        LeaderService { node }
    }

    fn table_group(&self, table: &[u8]) -> crate::Result<GroupId> {
        let name = std::str::from_utf8(table)
            .map_err(|_| Error::InvalidArgument("the table name is not UTF-8".into()))?;
        if name.is_empty() {
            return Err(Error::InvalidArgument("the table name is empty".into()));
        }
        Ok(self.node.table_group(name)?)
    }

    /// The table's group, refused when the follower's copy is of another
    /// table of that name (`table_id`, 0 for any).
    async fn same_table(&self, table: &[u8], table_id: u64) -> crate::Result<GroupId> {
        let group = self.table_group(table)?;
        if table_id == 0 {
            return Ok(group);
        }
        let identity = self.node.table_identity(group).await?;
        if table_id != identity {
            return Err(Error::Recreated(format!(
                "table {:?} on the leader cluster is not the one the follower's copy holds (id {identity} now, {table_id} in the copy: re-created, or the cluster was wiped); the follower replaces its copy",
                String::from_utf8_lossy(table),
            )));
        }
        Ok(group)
    }
}

#[tonic::async_trait]
impl proto::metadata_server::Metadata for LeaderService {
    async fn get(
        &self,
        _request: Request<proto::MetadataRequest>,
    ) -> Result<Response<proto::MetadataResponse>, Status> {
        // Linearizable: a follower cluster deletes the tables missing here.
        let mut tables: Vec<proto::Table> = Vec::new();
        for table in self.node.tables_linearizable().await.map_err(Error::from)? {
            let id = self
                .node
                .table_identity(table.group)
                .await
                .map_err(Error::from)?;
            tables.push(proto::Table {
                name: table.name,
                r#type: proto::table::Type::Replicated as i32,
                id,
            });
        }
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Response::new(proto::MetadataResponse { tables }))
    }
}

#[tonic::async_trait]
impl proto::log_server::Log for LeaderService {
    type ReplicateStream = ReceiverStream<Result<proto::ReplicateResponse, Status>>;

    async fn replicate(
        &self,
        request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let request = request.into_inner();
        let group = self.same_table(&request.table, request.table_id).await?;
        let host = self.node.host().clone();
        let applied = host.applied_index_watch(group).map_err(Error::from)?;
        let commit = host
            .status(group)
            .await
            .map_err(Error::from)?
            .hard_state
            .commit;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER_RESPONSES);
        if request.leader_index > commit.0 {
            let response = error_response(proto::ReplicateError::LeaderBehind, commit.0);
            let _ = sender.send(Ok(response)).await;
        } else {
            let after = LogIndex(request.leader_index);
            tokio::spawn(stream_log(host, group, after, applied, sender));
        }
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[tonic::async_trait]
impl proto::snapshot_server::Snapshot for LeaderService {
    type StreamStream = ReceiverStream<Result<proto::SnapshotChunk, Status>>;

    /// The table's items at one instant, in chunks of
    /// `SNAPSHOT_CHUNK_BYTES` with a CRC-32C each; every chunk names the
    /// leader index the snapshot holds, and the last says so.
    async fn stream(
        &self,
        request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let request = request.into_inner();
        let group = self.same_table(&request.table, request.table_id).await?;
        // A ReadIndex barrier first: a node that lags (a learner, or one
        // behind a restore's commit) must not serve an older copy.
        self.node
            .table_revision(group, true)
            .await
            .map_err(Error::from)?;
        let (index, items) = self.node.table_snapshot(group).map_err(Error::from)?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER_RESPONSES);
        regatta_server::restore::send_items(index, items, sender, |chunk| proto::SnapshotChunk {
            data: chunk.data,
            len: chunk.len,
            index: chunk.index,
            crc32c: chunk.crc32c,
            offset: chunk.offset,
            last: chunk.last,
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

#[tonic::async_trait]
impl proto::forward_server::Forward for LeaderService {
    /// Runs a follower cluster's write on this (leader) cluster.
    async fn write(
        &self,
        request: Request<proto::ForwardRequest>,
    ) -> Result<Response<proto::ForwardResponse>, Status> {
        let request = request.into_inner();
        let group = self.same_table(&request.table, request.table_id).await?;
        let command = regatta_kv::command::decode::<regatta_kv::command::Command>(&request.command)
            .map_err(|error| Error::InvalidArgument(format!("the forwarded command: {error}")))?;
        // The checks a client's request gets on this cluster: the
        // forwarding cluster's limits may differ, and the command reaches
        // every replica's storage engine.
        regatta_server::validate::command(self.node.config(), &command).map_err(Status::from)?;
        let response = self
            .node
            .write(group, &command)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(proto::ForwardResponse {
            response: regatta_kv::command::encode(&response),
        }))
    }
}

/// Serves the replication API (`Metadata`, `Log`, `Snapshot`, `Forward`)
/// of `node` on `listener` until `shutdown` resolves; over TLS with `tls`
/// (see `regatta_server::tls::server_config`).
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), String> {
    let metrics = regatta_server::grpc_metrics::GrpcMetricsLayer::new(node.grpc_metrics().clone());
    let service = LeaderService::new(node);
    // TCP_NODELAY (set by `incoming`): a lone command must not wait for a
    // delayed ACK.
    let incoming = regatta_server::tls::incoming(listener, tls, "replication");
    tonic::transport::Server::builder()
        .layer(metrics)
        .add_service(proto::metadata_server::MetadataServer::new(service.clone()))
        .add_service(proto::log_server::LogServer::new(service.clone()))
        .add_service(proto::snapshot_server::SnapshotServer::new(service.clone()))
        // Any write a follower cluster's API takes (whatever its limits)
        // reaches `validate::command`, which refuses it with this
        // cluster's limits and RESOURCE_EXHAUSTED.
        .add_service(
            proto::forward_server::ForwardServer::new(service).max_decoding_message_size(
                regatta_server::validate::request_bytes_max(
                    regatta_server::validate::KEY_BYTES_MAX_LIMIT,
                    regatta_server::validate::VALUE_BYTES_MAX_LIMIT,
                ),
            ),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|error| format!("the replication API: {error}"))
}

fn error_response(error: proto::ReplicateError, leader_index: u64) -> proto::ReplicateResponse {
    proto::ReplicateResponse {
        response: Some(proto::replicate_response::Response::ErrorResponse(
            proto::ReplicateErrResponse {
                error: error as i32,
            },
        )),
        leader_index,
    }
}

fn commands_response(
    commands: Vec<proto::ReplicateCommand>,
    leader_index: u64,
) -> proto::ReplicateResponse {
    proto::ReplicateResponse {
        response: Some(proto::replicate_response::Response::CommandsResponse(
            proto::ReplicateCommandsResponse { commands },
        )),
        leader_index,
    }
}

/// The table command an entry carries; empty for entries without one.
fn command_bytes(payload: &EntryPayload) -> Vec<u8> {
    match payload {
        EntryPayload::Normal(command) => command.to_vec(),
        EntryPayload::Session { command, .. } => command.to_vec(),
        EntryPayload::Empty | EntryPayload::ConfChange(_) => Vec::new(),
    }
}

/// Sends the log after `after`, then each new applied entry, until the
/// client goes away, the group stops, or the log no longer reaches back.
async fn stream_log(
    host: NodeHost,
    group: GroupId,
    mut after: LogIndex,
    applied: AppliedWatch,
    sender: mpsc::Sender<Result<proto::ReplicateResponse, Status>>,
) {
    // A retried request is in the log twice but applied once; the
    // follower must not apply the retry.
    let mut sessions = match host.session_filter(group, after) {
        Ok(filter) => filter,
        Err(regatta_multiraft::Error::Compacted { .. }) => {
            let index = applied.get();
            let _ = sender
                .send(Ok(error_response(
                    proto::ReplicateError::UseSnapshot,
                    index.0,
                )))
                .await;
            return;
        }
        Err(error) => {
            let _ = sender.send(Err(Status::from(Error::Raft(error)))).await;
            return;
        }
    };
    let mut stream = LogSender {
        host: &host,
        group,
        sessions: &mut sessions,
        sender: &sender,
    };
    loop {
        let applied_index = applied.get();
        if stream
            .send_up_to(&mut after, applied_index)
            .await
            .is_break()
        {
            return;
        }
        match tokio::time::timeout(HEARTBEAT_INTERVAL, applied.changed_from(applied_index)).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                let _ = sender.send(Err(stopped_status(&host, group))).await;
                return;
            }
            Err(_) => {
                let index = applied.get();
                if sender
                    .send(Ok(commands_response(Vec::new(), index.0)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// What `stream_log` sends the log of a group with.
struct LogSender<'a> {
    host: &'a NodeHost,
    group: GroupId,
    sessions: &'a mut SessionFilter,
    sender: &'a mpsc::Sender<Result<proto::ReplicateResponse, Status>>,
}

impl LogSender<'_> {
    /// Sends the log after `after` up to `applied_index`, in responses of
    /// at most `RESPONSE_BYTES_MAX`, moving `after` along. `Break` when the
    /// stream is over: the client went away, the log no longer reaches
    /// back (the follower is told to take a snapshot), a restore's commit
    /// ended what the follower can follow, the log had nothing where the
    /// applied index says it must, or reading it failed (sent as a status).
    async fn send_up_to(
        &mut self,
        after: &mut LogIndex,
        applied_index: LogIndex,
    ) -> ControlFlow<()> {
        while *after < applied_index {
            let entries = self.host.log_entries(
                self.group,
                after.next(),
                applied_index.next(),
                RESPONSE_BYTES_MAX,
            );
            let response = match entries {
                Ok(entries) => {
                    if entries.is_empty() {
                        return ControlFlow::Break(());
                    }
                    debug_assert_eq!(entries[0].index, after.next(), "entries without a gap");
                    let (commands, restored) = commands_of(&entries, self.sessions, after);
                    if restored {
                        return self.end_at_restore(commands, applied_index).await;
                    }
                    Ok(commands_response(commands, applied_index.0))
                }
                Err(regatta_multiraft::Error::Compacted { .. }) => {
                    let response =
                        error_response(proto::ReplicateError::UseSnapshot, applied_index.0);
                    let _ = self.sender.send(Ok(response)).await;
                    return ControlFlow::Break(());
                }
                Err(error) => Err(Status::from(Error::Raft(error))),
            };
            let failed = response.is_err();
            if self.sender.send(response).await.is_err() || failed {
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    /// A restore's commit ends the stream: the commands before it go,
    /// then the follower is told to take a snapshot.
    async fn end_at_restore(
        &mut self,
        commands: Vec<proto::ReplicateCommand>,
        applied_index: LogIndex,
    ) -> ControlFlow<()> {
        if !commands.is_empty() {
            let response = commands_response(commands, applied_index.0);
            if self.sender.send(Ok(response)).await.is_err() {
                return ControlFlow::Break(());
            }
        }
        let response = error_response(proto::ReplicateError::UseSnapshot, applied_index.0);
        let _ = self.sender.send(Ok(response)).await;
        ControlFlow::Break(())
    }
}

/// The commands a follower applies for `entries`, which follow on from
/// `after` (moved to the last one taken), and whether a restore's commit
/// ended them: a retried request (in the log twice, applied once) and a
/// restore's steps go as empty commands; a restore's commit is not taken,
/// because what a follower holds is then replaced as a whole, by a
/// snapshot taken after it.
fn commands_of(
    entries: &[Entry],
    sessions: &mut SessionFilter,
    after: &mut LogIndex,
) -> (Vec<proto::ReplicateCommand>, bool) {
    let mut commands = Vec::with_capacity(entries.len());
    for entry in entries {
        let mut command = if sessions.admits(entry) {
            command_bytes(&entry.payload)
        } else {
            Vec::new()
        };
        if regatta_kv::command::is_restore_preparation(&command) {
            command = Vec::new();
        }
        if regatta_kv::command::is_restore_commit(&command) {
            return (commands, true);
        }
        *after = entry.index;
        commands.push(proto::ReplicateCommand {
            leader_index: entry.index.0,
            command,
        });
    }
    (commands, false)
}

/// Why a table's group stopped applying on this node, for its follower:
/// a failure is this node's (another may serve); otherwise the group was
/// removed: the table was dropped, and every node will say so, so the
/// follower need not move on.
fn stopped_status(host: &NodeHost, group: GroupId) -> Status {
    match host.stop_reason(group) {
        Some(reason) => Status::unavailable(format!(
            "the table's group {} stopped on this node: {reason}",
            group.0
        )),
        None => Status::not_found(format!(
            "the table's group {} was removed on this node (the table was dropped)",
            group.0
        )),
    }
}
