//! regatta.v1 `Maintenance`: Backup, Restore and Reset (`docs/backup.md`).
//! All three are admin operations.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::proto::regatta::v1 as pb;
use crate::restore::{send_items, Chunk, ItemLimits, OwnedChunk, TableRestore};
use crate::{ClusterRole, Error, Node, Result};

/// Chunks buffered between the reading task and the gRPC stream.
const STREAM_BUFFER_CHUNKS: usize = 4;

/// The Maintenance service over one node.
#[derive(Clone)]
pub struct MaintenanceApi {
    node: Arc<Node>,
}

impl MaintenanceApi {
    /// The service over `node`.
    pub fn new(node: Arc<Node>) -> MaintenanceApi {
        MaintenanceApi { node }
    }

    fn admin<T>(&self, request: &Request<T>, operation: &str) -> Result<()> {
        crate::auth::check_admin(
            self.node.config().admin_token.as_ref(),
            request.metadata(),
            operation,
        )
    }
}

fn table_name(bytes: &[u8]) -> Result<String> {
    let name = std::str::from_utf8(bytes)
        .map_err(|_| Error::InvalidArgument("the table name is not UTF-8".into()))?;
    crate::validate_table_name(name)?;
    Ok(name.to_string())
}

fn wrap(chunk: OwnedChunk) -> pb::SnapshotChunk {
    pb::SnapshotChunk {
        data: chunk.data,
        len: chunk.len,
        index: chunk.index,
        crc32c: chunk.crc32c,
        offset: chunk.offset,
        last: chunk.last,
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for MaintenanceApi {
    type BackupStream = ReceiverStream<std::result::Result<pb::SnapshotChunk, Status>>;

    /// A linearizable barrier first (this node applies every write
    /// acknowledged before the call), then one consistent copy.
    async fn backup(
        &self,
        request: Request<pb::BackupRequest>,
    ) -> std::result::Result<Response<Self::BackupStream>, Status> {
        self.admin(&request, "Maintenance.Backup")?;
        let name = table_name(&request.get_ref().table)?;
        let group = self.node.table_group(&name)?;
        self.node.table_revision(group, true).await?;
        let (index, items) = self.node.table_snapshot(group)?;
        tracing::info!(table = %name, revision = index, "backup: streaming the table");
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER_CHUNKS);
        send_items(index, items, sender, wrap);
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn restore(
        &self,
        request: Request<Streaming<pb::RestoreMessage>>,
    ) -> std::result::Result<Response<pb::RestoreResponse>, Status> {
        self.admin(&request, "Maintenance.Restore")?;
        if self.node.config().role == ClusterRole::Follower {
            return Err(Error::FailedPrecondition(
                "this is a follower cluster: restore the leader cluster, which replicates \
                 here; `regatta reset` makes a follower table copy the leader's again"
                    .into(),
            )
            .into());
        }
        let mut stream = request.into_inner();
        let name = match stream.message().await? {
            Some(pb::RestoreMessage {
                data: Some(pb::restore_message::Data::Info(info)),
            }) => table_name(&info.table)?,
            _ => {
                return Err(Error::InvalidArgument(
                    "a restore begins with a message naming the table (RestoreInfo)".into(),
                )
                .into())
            }
        };
        let created = match self.node.create_table(&name).await {
            Ok(_) => true,
            Err(Error::TableExists(_)) => false,
            Err(error) => return Err(error.into()),
        };
        let group = self.node.table_group(&name)?;
        tracing::info!(table = %name, created, "restore: receiving the backup");
        // In its own task: if the client goes away, the handler is
        // dropped, but the restore still sees the broken stream and aborts.
        let node = Arc::clone(&self.node);
        let task_name = name.clone();
        let task = tokio::spawn(async move {
            let limits = ItemLimits {
                key_bytes_max: node.config().key_bytes_max,
                value_bytes_max: node.config().value_bytes_max,
            };
            let mut restore = TableRestore::begin(&node, group).await?.with_limits(limits);
            if let Err(error) = receive(&mut stream, &mut restore).await {
                tracing::warn!(table = %task_name, %error, "restore: failed; the table keeps its data");
                restore.abort().await;
                return Err(error);
            }
            restore.commit().await
        });
        let summary = task
            .await
            .map_err(|error| Error::Internal(format!("the restore task failed: {error}")))??;
        let revision = self.node.table_revision(group, true).await?;
        tracing::info!(
            table = %name,
            keys = summary.keys,
            bytes = summary.bytes,
            revision,
            "restore: the table holds the backup"
        );
        Ok(Response::new(pb::RestoreResponse {
            revision,
            keys: summary.keys,
            bytes: summary.bytes,
            created,
        }))
    }

    async fn reset(
        &self,
        request: Request<pb::ResetRequest>,
    ) -> std::result::Result<Response<pb::ResetResponse>, Status> {
        self.admin(&request, "Maintenance.Reset")?;
        let request = request.into_inner();
        if self.node.config().role != ClusterRole::Follower {
            return Err(Error::FailedPrecondition(
                "this is the leader cluster: only a follower cluster's tables are reset (they \
                 copy the leader cluster's again)"
                    .into(),
            )
            .into());
        }
        let names = match (request.reset_all, request.table.is_empty()) {
            (true, true) => self.node.tables().into_iter().map(|t| t.name).collect(),
            (false, false) => vec![table_name(&request.table)?],
            (true, false) => {
                return Err(Error::InvalidArgument(
                    "name a table or set reset_all, not both".into(),
                )
                .into())
            }
            (false, true) => {
                return Err(Error::InvalidArgument(
                    "name the table to reset, or set reset_all".into(),
                )
                .into())
            }
        };
        for name in &names {
            let group = self.node.table_group(name)?;
            self.node.request_resync(group).await?;
            tracing::info!(table = %name, "reset: the table will install the leader's snapshot");
        }
        Ok(Response::new(pb::ResetResponse { tables: names }))
    }
}

/// Receives the chunks of a restore into `restore`, until the stream ends.
/// What a failed read of the restore stream means for the client: a
/// message over the size limit or one that does not decode is the
/// client's to fix (retrying the same backup fails the same way); anything
/// else is the connection.
fn stream_error(status: tonic::Status) -> Error {
    // tonic reports a message over the limit as OUT_OF_RANGE and one that
    // does not decode as INTERNAL "failed to decode ..."; it also reports
    // some HTTP/2 resets as INTERNAL, which are the connection's.
    match status.code() {
        tonic::Code::OutOfRange => Error::TooLarge(format!(
            "a restore message is too large: {} (send chunks of at most 4 MiB)",
            status.message()
        )),
        tonic::Code::Internal if status.message().starts_with("failed to decode") => {
            Error::InvalidArgument(format!(
                "a restore message does not decode: {}",
                status.message()
            ))
        }
        _ => Error::Unavailable(format!("the restore stream broke: {status}")),
    }
}

async fn receive(
    stream: &mut Streaming<pb::RestoreMessage>,
    restore: &mut TableRestore<'_>,
) -> Result<()> {
    loop {
        let message = stream.message().await.map_err(stream_error)?;
        match message {
            None => return Ok(()),
            Some(pb::RestoreMessage {
                data: Some(pb::restore_message::Data::Chunk(chunk)),
            }) => {
                restore
                    .push(Chunk {
                        data: &chunk.data,
                        len: chunk.len,
                        index: chunk.index,
                        crc32c: chunk.crc32c,
                        offset: chunk.offset,
                        last: chunk.last,
                    })
                    .await?
            }
            Some(_) => {
                return Err(Error::InvalidArgument(
                    "after RestoreInfo, a restore sends only chunks".into(),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::stream_error;

    /// A restore stream that fails on an oversized or undecodable message
    /// is the client's error (retrying the same backup fails again); only
    /// a broken connection is UNAVAILABLE.
    #[test]
    fn restore_stream_errors_keep_their_meaning() {
        let code = |status: tonic::Status| tonic::Status::from(stream_error(status)).code();
        assert_eq!(
            code(tonic::Status::out_of_range(
                "decoded message length too large"
            )),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            code(tonic::Status::internal(
                "failed to decode Protobuf message: invalid wire type"
            )),
            tonic::Code::InvalidArgument
        );
        assert_eq!(
            code(tonic::Status::internal("h2 protocol error: stream reset")),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(tonic::Status::unknown("h2 protocol error: broken pipe")),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(tonic::Status::cancelled("the client went away")),
            tonic::Code::Unavailable
        );
    }
}
