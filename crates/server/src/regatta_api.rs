//! Regatta's own API (`regatta.v1`): KV over any table, Tables and
//! Cluster.

use std::sync::Arc;

use regatta_kv::command::{
    Command, Compare, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest, Query, RangeRequest,
    RangeResult, RequestOp, Response as KvResponse, ResponseOp, TxnRequest, TxnResult,
};
use regatta_wal::GroupId;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::node::{Node, NodeConfig};
use crate::proto::mvcc::v1 as mvcc;
use crate::proto::regatta::v1 as pb;
use crate::validate;

/// The most bytes of keys and values one Range response carries; the rest
/// is left to `more` (and to IterateRange's next page).
pub const RANGE_RESPONSE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Regatta's API served by a node.
#[derive(Clone)]
pub struct RegattaApi {
    node: Arc<Node>,
}

impl RegattaApi {
    /// The cluster's members, as regatta.v1 shows them.
    async fn members(&self) -> Result<Vec<pb::Member>> {
        Ok(self
            .node
            .members()
            .await?
            .into_iter()
            .map(|member| pb::Member {
                id: member.id.0.to_string(),
                name: format!("node-{}", member.id.0),
                peer_ur_ls: member.peer_urls(),
                client_ur_ls: member.client_urls(),
                is_learner: !member.voter,
                promoting: member.auto_promote,
            })
            .collect())
    }

    fn admin<T>(&self, request: &Request<T>, operation: &str) -> Result<()> {
        crate::auth::check_admin(
            self.node.config().admin_token.as_ref(),
            request.metadata(),
            operation,
        )
    }

    async fn changed(
        &self,
        id: u64,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        Ok(Response::new(pb::MemberChangeResponse {
            id,
            members: self.members().await?,
        }))
    }

    /// The API over `node`'s tables.
    pub fn new(node: Arc<Node>) -> RegattaApi {
        RegattaApi { node }
    }

    fn table(&self, table: &[u8]) -> Result<GroupId> {
        self.node.table_group(&validate::table_name(table)?)
    }

    fn header(&self, group: GroupId, revision: u64) -> Option<pb::ResponseHeader> {
        let facts = self.node.facts(group);
        Some(pb::ResponseHeader {
            shard_id: group.0,
            replica_id: self.node.config().node_id.0,
            revision,
            raft_term: facts.term,
            raft_leader_id: facts.leader,
        })
    }
}

fn key_value(kv: KeyValue) -> mvcc::KeyValue {
    mvcc::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision as i64,
        mod_revision: kv.mod_revision as i64,
        value: kv.value,
    }
}

fn result(response: KvResponse) -> Result<(u64, ResponseOp)> {
    response
        .result
        .map(|op| (response.revision, op))
        .map_err(Error::Internal)
}

fn unexpected(op: ResponseOp) -> Status {
    Error::Internal(format!("unexpected result {op:?}")).into()
}

fn range_request(config: &NodeConfig, request: &pb::RangeRequest) -> Result<RangeRequest> {
    validate::no_revision_filters(
        request.min_mod_revision,
        request.max_mod_revision,
        request.min_create_revision,
        request.max_create_revision,
    )?;
    Ok(RangeRequest {
        range: validate::range(config, &request.key, &request.range_end)?,
        limit: validate::limit(request.limit)?,
        keys_only: request.keys_only,
        count_only: request.count_only,
        bytes_max: RANGE_RESPONSE_BYTES_MAX,
    })
}

fn range_response(result: RangeResult) -> pb::RangeResponse {
    pb::RangeResponse {
        header: None,
        kvs: result.kvs.into_iter().map(key_value).collect(),
        more: result.more,
        count: result.count as i64,
    }
}

fn txn_request(config: &NodeConfig, request: &pb::TxnRequest) -> Result<TxnRequest> {
    use mvcc::compare::{CompareTarget as T, TargetUnion as U};
    use mvcc::request_op::Request as Op;
    validate::txn_shape(
        0,
        request.compare.len(),
        request.success.len(),
        request.failure.len(),
    )?;
    let compares = request
        .compare
        .iter()
        .map(|compare| {
            let result = validate::compare_result(compare.result)?;
            let target = match (T::try_from(compare.target), &compare.target_union) {
                (Ok(T::Value), Some(U::Value(value))) => CompareTarget::Value(value.clone()),
                (Ok(T::Value), None) => CompareTarget::Value(Vec::new()),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown compare target {}",
                        compare.target
                    )))
                }
            };
            Ok(Compare {
                range: validate::range(config, &compare.key, &compare.range_end)?,
                target,
                result,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let ops = |ops: &[mvcc::RequestOp]| -> Result<Vec<RequestOp>> {
        ops.iter()
            .map(|op| match &op.request {
                Some(Op::RequestRange(range)) => Ok(RequestOp::Range(RangeRequest {
                    range: validate::range(config, &range.key, &range.range_end)?,
                    limit: validate::limit(range.limit)?,
                    keys_only: range.keys_only,
                    count_only: range.count_only,
                    bytes_max: RANGE_RESPONSE_BYTES_MAX,
                })),
                Some(Op::RequestPut(put)) => {
                    validate::key(config, &put.key)?;
                    validate::value(config, &put.value)?;
                    Ok(RequestOp::Put(PutRequest {
                        key: put.key.clone(),
                        value: put.value.clone(),
                        prev_kv: put.prev_kv,
                    }))
                }
                Some(Op::RequestDeleteRange(delete)) => {
                    Ok(RequestOp::DeleteRange(DeleteRangeRequest {
                        range: validate::range(config, &delete.key, &delete.range_end)?,
                        prev_kv: delete.prev_kv,
                    }))
                }
                None => Err(Error::InvalidArgument(
                    "a transaction operation is empty".into(),
                )),
            })
            .collect()
    };
    Ok(TxnRequest {
        compare: compares,
        success: ops(&request.success)?,
        failure: ops(&request.failure)?,
    })
}

fn response_op(op: ResponseOp) -> Result<mvcc::ResponseOp> {
    use mvcc::response_op::{DeleteRange, Put, Range, Response as R};
    let response = match op {
        ResponseOp::Range(range) => R::ResponseRange(Range {
            kvs: range.kvs.into_iter().map(key_value).collect(),
            more: range.more,
            count: range.count as i64,
        }),
        ResponseOp::Put(put) => R::ResponsePut(Put {
            prev_kv: put.prev_kv.map(key_value),
        }),
        ResponseOp::DeleteRange(delete) => R::ResponseDeleteRange(DeleteRange {
            deleted: delete.deleted as i64,
            prev_kvs: delete.prev_kvs.into_iter().map(key_value).collect(),
        }),
        ResponseOp::Txn(_) | ResponseOp::Replicated(_) => {
            return Err(Error::Internal(format!(
                "an unexpected result in a Regatta API transaction: {op:?}"
            )))
        }
    };
    Ok(mvcc::ResponseOp {
        response: Some(response),
    })
}

fn txn_response(txn: TxnResult) -> Result<pb::TxnResponse> {
    Ok(pb::TxnResponse {
        header: None,
        succeeded: txn.succeeded,
        responses: txn
            .responses
            .into_iter()
            .map(response_op)
            .collect::<Result<_>>()?,
    })
}

/// The key right after `key`.
fn successor(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

#[tonic::async_trait]
impl pb::kv_server::Kv for RegattaApi {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> std::result::Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        let group = self.table(&request.table)?;
        let query = range_request(self.node.config(), &request)?;
        let response = self
            .node
            .read(group, &Query::Range(query), request.linearizable)
            .await?;
        let (revision, op) = result(response)?;
        let ResponseOp::Range(range) = op else {
            return Err(unexpected(op));
        };
        let mut response = range_response(range);
        response.header = self.header(group, revision);
        Ok(Response::new(response))
    }

    type IterateRangeStream = ReceiverStream<std::result::Result<pb::RangeResponse, Status>>;

    /// Pages of at most `RANGE_RESPONSE_BYTES_MAX` bytes, each read on its
    /// own (the whole is not one point in time), until the range or the
    /// limit is exhausted.
    async fn iterate_range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> std::result::Result<Response<Self::IterateRangeStream>, Status> {
        let request = request.into_inner();
        let group = self.table(&request.table)?;
        let mut query = range_request(self.node.config(), &request)?;
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let api = self.clone();
        tokio::spawn(async move {
            let mut left = query.limit;
            let mut first = true;
            loop {
                // The first page counts the whole range, as Range does;
                // the next ones count only their own keys, so that the
                // whole read scans the range twice, not once per page.
                let page_query = if first {
                    Query::Range(query.clone())
                } else {
                    Query::RangePage(query.clone())
                };
                first = false;
                let page = api
                    .node
                    .read(group, &page_query, request.linearizable)
                    .await
                    .and_then(result);
                let (revision, range) = match page {
                    Ok((revision, ResponseOp::Range(range))) => (revision, range),
                    Ok((_, op)) => {
                        let _ = sender.send(Err(unexpected(op))).await;
                        return;
                    }
                    Err(error) => {
                        let _ = sender.send(Err(error.into())).await;
                        return;
                    }
                };
                let last = range.kvs.last().map(|kv| kv.key.clone());
                let returned = range.kvs.len() as u64;
                let more = range.more;
                let mut response = range_response(range);
                response.header = api.header(group, revision);
                if sender.send(Ok(response)).await.is_err() {
                    return;
                }
                if left > 0 {
                    left = left.saturating_sub(returned);
                    if left == 0 {
                        return;
                    }
                    query.limit = left;
                }
                match last {
                    Some(last) if more && !query.count_only => {
                        query.range.key = successor(&last);
                        if query.range.range_end.is_empty() {
                            return;
                        }
                    }
                    _ => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> std::result::Result<Response<pb::PutResponse>, Status> {
        let request = request.into_inner();
        let group = self.table(&request.table)?;
        let config = self.node.config();
        validate::key(config, &request.key)?;
        validate::value(config, &request.value)?;
        let command = Command::Put(PutRequest {
            key: request.key,
            value: request.value,
            prev_kv: request.prev_kv,
        });
        let (revision, op) = result(self.node.write(group, &command).await?)?;
        let ResponseOp::Put(put) = op else {
            return Err(unexpected(op));
        };
        Ok(Response::new(pb::PutResponse {
            header: self.header(group, revision),
            prev_kv: put.prev_kv.map(key_value),
        }))
    }

    async fn delete_range(
        &self,
        request: Request<pb::DeleteRangeRequest>,
    ) -> std::result::Result<Response<pb::DeleteRangeResponse>, Status> {
        let request = request.into_inner();
        let group = self.table(&request.table)?;
        let command = Command::DeleteRange(DeleteRangeRequest {
            range: validate::range(self.node.config(), &request.key, &request.range_end)?,
            prev_kv: request.prev_kv,
        });
        let (revision, op) = result(self.node.write(group, &command).await?)?;
        let ResponseOp::DeleteRange(delete) = op else {
            return Err(unexpected(op));
        };
        Ok(Response::new(pb::DeleteRangeResponse {
            header: self.header(group, revision),
            deleted: delete.deleted as i64,
            prev_kvs: delete.prev_kvs.into_iter().map(key_value).collect(),
        }))
    }

    async fn txn(
        &self,
        request: Request<pb::TxnRequest>,
    ) -> std::result::Result<Response<pb::TxnResponse>, Status> {
        let request = request.into_inner();
        let group = self.table(&request.table)?;
        let txn = txn_request(self.node.config(), &request)?;
        validate::txn_totals(&txn)?;
        validate::txn_writes_each_key_once(&txn)?;
        let response = self.node.transact(group, txn).await?;
        let (revision, op) = result(response)?;
        let ResponseOp::Txn(txn) = op else {
            return Err(unexpected(op));
        };
        let mut response = txn_response(txn)?;
        response.header = self.header(group, revision);
        Ok(Response::new(response))
    }
}

#[tonic::async_trait]
impl pb::tables_server::Tables for RegattaApi {
    async fn create(
        &self,
        request: Request<pb::CreateTableRequest>,
    ) -> std::result::Result<Response<pb::CreateTableResponse>, Status> {
        crate::auth::check_admin(
            self.node.config().admin_token.as_ref(),
            request.metadata(),
            "Tables.Create",
        )?;
        let table = self.node.create_table(&request.get_ref().name).await?;
        Ok(Response::new(pb::CreateTableResponse {
            id: table.group.0.to_string(),
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteTableRequest>,
    ) -> std::result::Result<Response<pb::DeleteTableResponse>, Status> {
        crate::auth::check_admin(
            self.node.config().admin_token.as_ref(),
            request.metadata(),
            "Tables.Delete",
        )?;
        self.node.delete_table(&request.get_ref().name).await?;
        Ok(Response::new(pb::DeleteTableResponse {}))
    }

    async fn list(
        &self,
        _request: Request<pb::ListTablesRequest>,
    ) -> std::result::Result<Response<pb::ListTablesResponse>, Status> {
        let tables = self
            .node
            .tables()
            .into_iter()
            .map(|table| pb::TableInfo {
                name: table.name,
                id: table.group.0.to_string(),
                config: None,
            })
            .collect();
        Ok(Response::new(pb::ListTablesResponse { tables }))
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for RegattaApi {
    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> std::result::Result<Response<pb::MemberListResponse>, Status> {
        Ok(Response::new(pb::MemberListResponse {
            cluster: self.node.config().cluster_id.to_string(),
            members: self.members().await?,
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> std::result::Result<Response<pb::StatusResponse>, Status> {
        let mut tables = std::collections::HashMap::new();
        let mut errors = Vec::new();
        let follower = self.node.config().role == crate::ClusterRole::Follower;
        for table in self.node.tables() {
            let replication = if follower {
                self.node.replication_view(table.group).await
            } else {
                crate::ReplicationFacts::default()
            };
            if let Some(error) = &replication.error {
                errors.push(format!("table {}: replication: {error}", table.name));
            }
            match self.node.host().status(table.group).await {
                Ok(status) => {
                    tables.insert(
                        table.name,
                        pb::TableStatus {
                            log_size: self.node.log_bytes(table.group) as i64,
                            db_size: self.node.table_disk_bytes(table.group) as i64,
                            leader: status
                                .soft_state
                                .leader
                                .map_or(String::new(), |id| id.0.to_string()),
                            raft_index: status.hard_state.commit.0,
                            raft_term: status.hard_state.term.0,
                            raft_applied_index: status.applied.0,
                            leader_index: replication.leader_index,
                            applied_leader_index: replication.applied_leader_index,
                            replication_lag_ms: replication.lag_ms,
                            replication_error: replication.error.unwrap_or_default(),
                            voters: status.membership.voters.iter().map(|id| id.0).collect(),
                            learners: status.membership.learners.iter().map(|id| id.0).collect(),
                        },
                    );
                }
                Err(error) => errors.push(format!("table {}: {error}", table.name)),
            }
        }
        let wal = self.node.wal_stats();
        Ok(Response::new(pb::StatusResponse {
            uptime_seconds: self.node.uptime().as_secs(),
            wal_size_bytes: wal.size_bytes,
            wal_segments: wal.segments,
            id: self.node.config().node_id.0.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            info: format!(
                "regatta {} cluster node, up {} s",
                if follower { "follower" } else { "leader" },
                self.node.uptime().as_secs()
            ),
            tables,
            config: None,
            errors,
        }))
    }
}

#[tonic::async_trait]
impl pb::membership_server::Membership for RegattaApi {
    async fn add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        self.admin(&request, "Membership.Add")?;
        let request = request.into_inner();
        let raft_address = validate::peer_address(&request.raft_address)?;
        let id = match request.id {
            0 => self.node.next_member_id().await?,
            id => regatta_raft::NodeId(id),
        };
        let addresses = crate::MemberAddresses {
            raft_address,
            client_url: request.client_url,
        };
        self.node.add_member(id, addresses, request.learner).await?;
        self.changed(id.0).await
    }

    async fn promote(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        self.admin(&request, "Membership.Promote")?;
        let id = validate::member_id(request.get_ref().id)?;
        self.node.promote_member(id).await?;
        self.changed(id.0).await
    }

    async fn demote(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        self.admin(&request, "Membership.Demote")?;
        let id = validate::member_id(request.get_ref().id)?;
        self.node.demote_member(id).await?;
        self.changed(id.0).await
    }

    async fn remove(
        &self,
        request: Request<pb::MemberIdRequest>,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        self.admin(&request, "Membership.Remove")?;
        let id = validate::member_id(request.get_ref().id)?;
        self.node.remove_member(id).await?;
        self.changed(id.0).await
    }

    async fn force_remove(
        &self,
        request: Request<pb::MemberForceRemoveRequest>,
    ) -> std::result::Result<Response<pb::MemberChangeResponse>, Status> {
        self.admin(&request, "Membership.ForceRemove")?;
        let request = request.into_inner();
        let id = validate::member_id(request.id)?;
        if !request.confirm {
            return Err(Error::InvalidArgument(
                "force-remove commits without a quorum and can lose acknowledged writes; set confirm to go ahead".into(),
            )
            .into());
        }
        self.node.force_remove_member(id).await?;
        self.changed(id.0).await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> std::result::Result<Response<pb::TransferLeaderResponse>, Status> {
        self.admin(&request, "Membership.TransferLeader")?;
        let request = request.into_inner();
        let target = match request.target {
            0 => None,
            id => Some(regatta_raft::NodeId(id)),
        };
        let moved = if request.table.is_empty() {
            self.node.move_leaderships(target).await?
        } else {
            let group = self.node.table_group(&request.table)?;
            self.node.move_leader(group, target).await?;
            1
        };
        Ok(Response::new(pb::TransferLeaderResponse { moved }))
    }
}
