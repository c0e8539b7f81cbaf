//! The etcd v3 API (`etcdserverpb`) over the etcd table: KV,
//! Maintenance.Status and Cluster.MemberList. The other methods answer
//! UNIMPLEMENTED with a message naming what Regatta does not serve.

use std::sync::Arc;

use regatta_kv::command::{
    Command, Compare, CompareTarget, DeleteRangeRequest, KeyValue, PutRequest, Query, RangeRequest,
    RangeResult, RequestOp, Response as KvResponse, ResponseOp, TxnRequest, TxnResult,
};
use regatta_wal::GroupId;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::node::Node;
use crate::proto::etcdserverpb as pb;
use crate::proto::mvccpb;
use crate::validate;

/// The etcd API served by a node.
#[derive(Clone)]
pub struct EtcdApi {
    node: Arc<Node>,
}

impl EtcdApi {
    /// The API over `node`'s etcd table.
    pub fn new(node: Arc<Node>) -> EtcdApi {
        EtcdApi { node }
    }

    fn group(&self) -> Result<GroupId> {
        self.node.table_group(&self.node.config().etcd_table)
    }

    fn header(&self, group: GroupId, revision: u64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.node.config().cluster_id,
            member_id: self.node.config().node_id.0,
            revision: revision as i64,
            raft_term: self.node.facts(group).term,
        })
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "Regatta does not implement etcd's {what}; it serves KV, Maintenance.Status, Maintenance.MoveLeader and Cluster.MemberList"
    ))
}

fn key_value(kv: KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision as i64,
        mod_revision: kv.mod_revision as i64,
        version: kv.version as i64,
        value: kv.value,
        lease: 0,
    }
}

fn result(response: KvResponse) -> Result<(u64, ResponseOp)> {
    response
        .result
        .map(|op| (response.revision, op))
        .map_err(Error::Internal)
}

/// What a range asks for beyond the key order, applied after the read.
struct Sort {
    /// Ascending or descending (never none).
    order: pb::range_request::SortOrder,
    target: pb::range_request::SortTarget,
    /// The request's limit, applied after sorting; 0 when the store
    /// applied it before (etcd's order for a sort without an order).
    limit: u64,
    /// `keys_only` with a sort by value: the store read the values for the
    /// sort, and they are dropped after it.
    drop_values: bool,
}

fn range_request(
    config: &crate::node::NodeConfig,
    request: &pb::RangeRequest,
) -> Result<(RangeRequest, Option<Sort>)> {
    use pb::range_request::{SortOrder, SortTarget};
    let range = validate::range(config, &request.key, &request.range_end)?;
    let limit = validate::limit(request.limit)?;
    validate::no_revision_filters(
        request.min_mod_revision,
        request.max_mod_revision,
        request.min_create_revision,
        request.max_create_revision,
    )?;
    let order = SortOrder::try_from(request.sort_order).map_err(|_| {
        Error::InvalidArgument(format!("unknown sort_order {}", request.sort_order))
    })?;
    let target = SortTarget::try_from(request.sort_target).map_err(|_| {
        Error::InvalidArgument(format!("unknown sort_target {}", request.sort_target))
    })?;
    // As etcd: the store's order is ascending by key. A sort with an
    // order reads every key of the range, sorts, then applies the limit; a
    // target other than the key with no order sorts ascending the first
    // limit + 1 keys in key order (etcd reads one more for `more`), then
    // applies the limit.
    let natural = target == SortTarget::Key && order != SortOrder::Descend;
    let by_value = target == SortTarget::Value;
    let sort = (!natural).then_some(Sort {
        order: if order == SortOrder::None {
            SortOrder::Ascend
        } else {
            order
        },
        target,
        limit,
        drop_values: request.keys_only && by_value,
    });
    let reads_every_key = !natural && order != SortOrder::None;
    let read_limit = if reads_every_key {
        0
    } else if sort.is_some() && limit > 0 {
        limit.saturating_add(1)
    } else {
        limit
    };
    Ok((
        RangeRequest {
            range,
            limit: read_limit,
            keys_only: request.keys_only && !(sort.is_some() && by_value),
            count_only: request.count_only,
            bytes_max: 0,
        },
        sort,
    ))
}

fn apply_sort(result: &mut RangeResult, sort: &Sort) {
    use pb::range_request::{SortOrder, SortTarget};
    result.kvs.sort_by(|a, b| {
        let ordering = match sort.target {
            SortTarget::Key => a.key.cmp(&b.key),
            SortTarget::Version => a.version.cmp(&b.version),
            SortTarget::Create => a.create_revision.cmp(&b.create_revision),
            SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
            SortTarget::Value => a.value.cmp(&b.value),
        };
        // Ties keep key order, as etcd does.
        let ordering = ordering.then_with(|| a.key.cmp(&b.key));
        if sort.order == SortOrder::Descend {
            ordering.reverse()
        } else {
            ordering
        }
    });
    if sort.limit > 0 && result.kvs.len() as u64 > sort.limit {
        result.kvs.truncate(sort.limit as usize);
        result.more = true;
    }
    if sort.drop_values {
        for kv in &mut result.kvs {
            kv.value = Vec::new();
        }
    }
}

fn check_revision(requested: i64, current: u64) -> Result<()> {
    if requested <= 0 || requested as u64 == current {
        return Ok(());
    }
    if (requested as u64) < current {
        return Err(Error::Revision(
            "etcdserver: mvcc: required revision has been compacted (Regatta keeps only the current revision)".into(),
        ));
    }
    Err(Error::Revision(
        "etcdserver: mvcc: required revision is a future revision".into(),
    ))
}

fn range_response(result: RangeResult) -> pb::RangeResponse {
    pb::RangeResponse {
        header: None,
        kvs: result.kvs.into_iter().map(key_value).collect(),
        more: result.more,
        count: result.count as i64,
    }
}

fn put_request(config: &crate::node::NodeConfig, request: &pb::PutRequest) -> Result<PutRequest> {
    validate::key(config, &request.key)?;
    validate::value(config, &request.value)?;
    if request.lease != 0 {
        return Err(Error::InvalidArgument(
            "leases are not supported (the Lease API is not implemented)".into(),
        ));
    }
    if request.ignore_value || request.ignore_lease {
        return Err(Error::InvalidArgument(
            "ignore_value and ignore_lease are not supported".into(),
        ));
    }
    Ok(PutRequest {
        key: request.key.clone(),
        value: request.value.clone(),
        prev_kv: request.prev_kv,
    })
}

fn delete_request(
    config: &crate::node::NodeConfig,
    request: &pb::DeleteRangeRequest,
) -> Result<DeleteRangeRequest> {
    Ok(DeleteRangeRequest {
        range: validate::range(config, &request.key, &request.range_end)?,
        prev_kv: request.prev_kv,
    })
}

fn compare(config: &crate::node::NodeConfig, compare: &pb::Compare) -> Result<Compare> {
    use pb::compare::{CompareTarget as T, TargetUnion as U};
    let range = validate::range(config, &compare.key, &compare.range_end)?;
    let result = validate::compare_result(compare.result)?;
    let target = match (T::try_from(compare.target), &compare.target_union) {
        (Ok(T::Value), Some(U::Value(value))) => CompareTarget::Value(value.clone()),
        (Ok(T::Value), None) => CompareTarget::Value(Vec::new()),
        (Ok(T::Version), Some(U::Version(version))) => CompareTarget::Version(*version),
        (Ok(T::Version), None) => CompareTarget::Version(0),
        (Ok(T::Create), Some(U::CreateRevision(revision))) => {
            CompareTarget::CreateRevision(*revision)
        }
        (Ok(T::Create), None) => CompareTarget::CreateRevision(0),
        (Ok(T::Mod), Some(U::ModRevision(revision))) => CompareTarget::ModRevision(*revision),
        (Ok(T::Mod), None) => CompareTarget::ModRevision(0),
        (Ok(T::Lease), _) => {
            return Err(Error::InvalidArgument(
                "lease compares are not supported (the Lease API is not implemented)".into(),
            ))
        }
        _ => {
            return Err(Error::InvalidArgument(format!(
                "compare target {} does not match its operand",
                compare.target
            )))
        }
    };
    Ok(Compare {
        range,
        target,
        result,
    })
}

/// The sorts a transaction's ranges ask for, in the shape of its branches:
/// applied to its result, since the store reads in key order.
#[derive(Default)]
struct TxnSorts {
    success: Vec<OpSort>,
    failure: Vec<OpSort>,
}

/// What one operation of a branch needs after the store: a range's sort,
/// a nested transaction's sorts, or nothing.
enum OpSort {
    None,
    Range(Sort),
    Txn(TxnSorts),
}

fn txn_request(
    config: &crate::node::NodeConfig,
    request: &pb::TxnRequest,
    depth: usize,
) -> Result<(TxnRequest, TxnSorts)> {
    validate::txn_shape(
        depth,
        request.compare.len(),
        request.success.len(),
        request.failure.len(),
    )?;
    let ops = |ops: &[pb::RequestOp]| -> Result<(Vec<RequestOp>, Vec<OpSort>)> {
        let mut requests = Vec::with_capacity(ops.len());
        let mut sorts = Vec::with_capacity(ops.len());
        for op in ops {
            let (request, sort) = match &op.request {
                Some(pb::request_op::Request::RequestRange(range)) => {
                    if range.revision != 0 {
                        return Err(Error::InvalidArgument(
                            "ranges inside a transaction cannot ask for a revision (Regatta keeps only the current one)".into(),
                        ));
                    }
                    let (request, sort) = range_request(config, range)?;
                    (
                        RequestOp::Range(request),
                        sort.map_or(OpSort::None, OpSort::Range),
                    )
                }
                Some(pb::request_op::Request::RequestPut(put)) => {
                    (RequestOp::Put(put_request(config, put)?), OpSort::None)
                }
                Some(pb::request_op::Request::RequestDeleteRange(delete)) => (
                    RequestOp::DeleteRange(delete_request(config, delete)?),
                    OpSort::None,
                ),
                Some(pb::request_op::Request::RequestTxn(txn)) => {
                    let (request, sorts) = txn_request(config, txn, depth + 1)?;
                    (RequestOp::Txn(request), OpSort::Txn(sorts))
                }
                None => {
                    return Err(Error::InvalidArgument(
                        "a transaction operation is empty".into(),
                    ))
                }
            };
            requests.push(request);
            sorts.push(sort);
        }
        Ok((requests, sorts))
    };
    let (success, success_sorts) = ops(&request.success)?;
    let (failure, failure_sorts) = ops(&request.failure)?;
    Ok((
        TxnRequest {
            compare: request
                .compare
                .iter()
                .map(|c| compare(config, c))
                .collect::<Result<_>>()?,
            success,
            failure,
        },
        TxnSorts {
            success: success_sorts,
            failure: failure_sorts,
        },
    ))
}

/// Sorts the ranges of the branch `result` took, nested ones included.
fn apply_txn_sorts(result: &mut TxnResult, sorts: &TxnSorts) {
    let branch = if result.succeeded {
        &sorts.success
    } else {
        &sorts.failure
    };
    debug_assert_eq!(
        branch.len(),
        result.responses.len(),
        "a transaction's result has one response per operation of its branch"
    );
    for (response, sort) in result.responses.iter_mut().zip(branch) {
        match (response, sort) {
            (ResponseOp::Range(range), OpSort::Range(sort)) => apply_sort(range, sort),
            (ResponseOp::Txn(inner), OpSort::Txn(sorts)) => apply_txn_sorts(inner, sorts),
            _ => {}
        }
    }
}

fn response_op(op: ResponseOp) -> pb::ResponseOp {
    use pb::response_op::Response as R;
    let response = match op {
        ResponseOp::Range(range) => R::ResponseRange(range_response(range)),
        ResponseOp::Put(put) => R::ResponsePut(pb::PutResponse {
            header: None,
            prev_kv: put.prev_kv.map(key_value),
        }),
        ResponseOp::DeleteRange(delete) => R::ResponseDeleteRange(pb::DeleteRangeResponse {
            header: None,
            deleted: delete.deleted as i64,
            prev_kvs: delete.prev_kvs.into_iter().map(key_value).collect(),
        }),
        ResponseOp::Txn(txn) => R::ResponseTxn(txn_response(txn)),
        // Only replication commands yield it, never a client's branch.
        ResponseOp::Replicated(_) => return pb::ResponseOp { response: None },
    };
    pb::ResponseOp {
        response: Some(response),
    }
}

fn txn_response(txn: TxnResult) -> pb::TxnResponse {
    pb::TxnResponse {
        header: None,
        succeeded: txn.succeeded,
        responses: txn.responses.into_iter().map(response_op).collect(),
    }
}

fn unexpected(op: ResponseOp) -> Status {
    Error::Internal(format!("unexpected result {op:?}")).into()
}

#[tonic::async_trait]
impl pb::kv_server::Kv for EtcdApi {
    async fn range(
        &self,
        request: Request<pb::RangeRequest>,
    ) -> std::result::Result<Response<pb::RangeResponse>, Status> {
        let request = request.into_inner();
        let (query, sort) = range_request(self.node.config(), &request)?;
        let group = self.group()?;
        let response = self
            .node
            .read(group, &Query::Range(query), !request.serializable)
            .await?;
        let (revision, op) = result(response)?;
        check_revision(request.revision, revision)?;
        let ResponseOp::Range(mut range) = op else {
            return Err(unexpected(op));
        };
        if let Some(sort) = sort {
            apply_sort(&mut range, &sort);
        }
        let mut response = range_response(range);
        response.header = self.header(group, revision);
        Ok(Response::new(response))
    }

    type RangeStreamStream =
        tokio_stream::Empty<std::result::Result<pb::RangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<pb::RangeRequest>,
    ) -> std::result::Result<Response<Self::RangeStreamStream>, Status> {
        Err(unimplemented("KV.RangeStream (use Range)"))
    }

    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> std::result::Result<Response<pb::PutResponse>, Status> {
        let put = put_request(self.node.config(), request.get_ref())?;
        let group = self.group()?;
        let (revision, op) = result(self.node.write(group, &Command::Put(put)).await?)?;
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
        let delete = delete_request(self.node.config(), request.get_ref())?;
        let group = self.group()?;
        let command = Command::DeleteRange(delete);
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
        let (txn, sorts) = txn_request(self.node.config(), request.get_ref(), 0)?;
        validate::txn_totals(&txn)?;
        validate::txn_writes_each_key_once(&txn)?;
        let group = self.group()?;
        let response = self.node.transact(group, txn).await?;
        let (revision, op) = result(response)?;
        let ResponseOp::Txn(mut txn) = op else {
            return Err(unexpected(op));
        };
        apply_txn_sorts(&mut txn, &sorts);
        let mut response = txn_response(txn);
        response.header = self.header(group, revision);
        Ok(Response::new(response))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactionRequest>,
    ) -> std::result::Result<Response<pb::CompactionResponse>, Status> {
        // Regatta keeps no history, so every past revision is compacted
        // already; only a future one is an error.
        let group = self.group()?;
        let revision = self.node.table_revision(group, true).await?;
        let requested = request.get_ref().revision;
        if requested > revision as i64 {
            return Err(Error::Revision(
                "etcdserver: mvcc: required revision is a future revision".into(),
            )
            .into());
        }
        Ok(Response::new(pb::CompactionResponse {
            header: self.header(group, revision),
        }))
    }
}

#[tonic::async_trait]
impl pb::maintenance_server::Maintenance for EtcdApi {
    async fn alarm(
        &self,
        _request: Request<pb::AlarmRequest>,
    ) -> std::result::Result<Response<pb::AlarmResponse>, Status> {
        let group = self.group()?;
        Ok(Response::new(pb::AlarmResponse {
            header: self.header(group, 0),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> std::result::Result<Response<pb::StatusResponse>, Status> {
        let group = self.group()?;
        let status = self.node.host().status(group).await.map_err(Error::Raft)?;
        Ok(Response::new(pb::StatusResponse {
            header: self.header(group, status.applied.0),
            version: ETCD_API_VERSION.into(),
            db_size: self.node.table_disk_bytes(group) as i64,
            leader: status.soft_state.leader.map_or(0, |id| id.0),
            raft_index: status.hard_state.commit.0,
            raft_term: status.hard_state.term.0,
            raft_applied_index: status.applied.0,
            errors: Vec::new(),
            db_size_in_use: self.node.table_disk_bytes(group) as i64,
            is_learner: !status
                .membership
                .voters
                .contains(&self.node.config().node_id),
            storage_version: String::new(),
            db_size_quota: 0,
            downgrade_info: None,
        }))
    }

    async fn defragment(
        &self,
        _request: Request<pb::DefragmentRequest>,
    ) -> std::result::Result<Response<pb::DefragmentResponse>, Status> {
        Err(unimplemented("Maintenance.Defragment"))
    }

    async fn hash(
        &self,
        _request: Request<pb::HashRequest>,
    ) -> std::result::Result<Response<pb::HashResponse>, Status> {
        Err(unimplemented("Maintenance.Hash"))
    }

    async fn hash_kv(
        &self,
        _request: Request<pb::HashKvRequest>,
    ) -> std::result::Result<Response<pb::HashKvResponse>, Status> {
        Err(unimplemented("Maintenance.HashKV"))
    }

    type SnapshotStream = tokio_stream::Empty<std::result::Result<pb::SnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _request: Request<pb::SnapshotRequest>,
    ) -> std::result::Result<Response<Self::SnapshotStream>, Status> {
        Err(unimplemented("Maintenance.Snapshot (use regatta backup)"))
    }

    /// Moves the leadership of the etcd table's group (the only group the
    /// etcd API sees) to `target_id`; any member may be asked.
    async fn move_leader(
        &self,
        request: Request<pb::MoveLeaderRequest>,
    ) -> std::result::Result<Response<pb::MoveLeaderResponse>, Status> {
        crate::auth::check_admin(
            self.node.config().admin_token.as_ref(),
            request.metadata(),
            "Maintenance.MoveLeader",
        )?;
        let target = request.into_inner().target_id;
        if target == 0 {
            return Err(Error::InvalidArgument(
                "MoveLeader needs target_id, the member id of the new leader".into(),
            )
            .into());
        }
        let group = self.group()?;
        self.node
            .transfer_leader(group, regatta_raft::NodeId(target))
            .await?;
        Ok(Response::new(pb::MoveLeaderResponse {
            header: self.header(group, 0),
        }))
    }

    async fn downgrade(
        &self,
        _request: Request<pb::DowngradeRequest>,
    ) -> std::result::Result<Response<pb::DowngradeResponse>, Status> {
        Err(unimplemented("Maintenance.Downgrade"))
    }
}

/// The etcd API level reported by Maintenance.Status: the one whose
/// methods this server implements.
pub const ETCD_API_VERSION: &str = "3.5.0";

impl EtcdApi {
    /// The cluster's members, as etcd shows them.
    async fn members(&self) -> Result<Vec<pb::Member>> {
        Ok(self
            .node
            .members()
            .await?
            .into_iter()
            .map(|member| pb::Member {
                id: member.id.0,
                name: format!("node-{}", member.id.0),
                peer_ur_ls: member.peer_urls(),
                client_ur_ls: member.client_urls(),
                is_learner: !member.voter,
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
}

/// etcd's membership verbs on the whole cluster (every table's group
/// follows the metadata group; `docs/membership.md`).
#[tonic::async_trait]
impl pb::cluster_server::Cluster for EtcdApi {
    async fn member_add(
        &self,
        request: Request<pb::MemberAddRequest>,
    ) -> std::result::Result<Response<pb::MemberAddResponse>, Status> {
        self.admin(&request, "Cluster.MemberAdd")?;
        let request = request.into_inner();
        let [peer_url] = request.peer_ur_ls.as_slice() else {
            return Err(Error::InvalidArgument(
                "MemberAdd needs exactly one peer URL, the new node's --raft.address".into(),
            )
            .into());
        };
        let raft_address = validate::peer_address(peer_url)?;
        let id = self.node.next_member_id().await?;
        let addresses = crate::MemberAddresses {
            raft_address,
            client_url: String::new(),
        };
        self.node
            .add_member(id, addresses, request.is_learner)
            .await?;
        let members = self.members().await?;
        let member = members.iter().find(|member| member.id == id.0).cloned();
        let group = self.group()?;
        Ok(Response::new(pb::MemberAddResponse {
            header: self.header(group, 0),
            member,
            members,
        }))
    }

    async fn member_remove(
        &self,
        request: Request<pb::MemberRemoveRequest>,
    ) -> std::result::Result<Response<pb::MemberRemoveResponse>, Status> {
        self.admin(&request, "Cluster.MemberRemove")?;
        let id = validate::member_id(request.get_ref().id)?;
        self.node.remove_member(id).await?;
        let group = self.group()?;
        Ok(Response::new(pb::MemberRemoveResponse {
            header: self.header(group, 0),
            members: self.members().await?,
        }))
    }

    async fn member_update(
        &self,
        request: Request<pb::MemberUpdateRequest>,
    ) -> std::result::Result<Response<pb::MemberUpdateResponse>, Status> {
        self.admin(&request, "Cluster.MemberUpdate")?;
        let request = request.into_inner();
        let id = validate::member_id(request.id)?;
        let [peer_url] = request.peer_ur_ls.as_slice() else {
            return Err(Error::InvalidArgument(
                "MemberUpdate needs exactly one peer URL, the member's --raft.address".into(),
            )
            .into());
        };
        let raft_address = validate::peer_address(peer_url)?;
        self.node.update_member_address(id, raft_address).await?;
        let group = self.group()?;
        Ok(Response::new(pb::MemberUpdateResponse {
            header: self.header(group, 0),
            members: self.members().await?,
        }))
    }

    async fn member_list(
        &self,
        _request: Request<pb::MemberListRequest>,
    ) -> std::result::Result<Response<pb::MemberListResponse>, Status> {
        let group = self.group()?;
        Ok(Response::new(pb::MemberListResponse {
            header: self.header(group, 0),
            members: self.members().await?,
        }))
    }

    async fn member_promote(
        &self,
        request: Request<pb::MemberPromoteRequest>,
    ) -> std::result::Result<Response<pb::MemberPromoteResponse>, Status> {
        self.admin(&request, "Cluster.MemberPromote")?;
        let id = validate::member_id(request.get_ref().id)?;
        self.node.promote_member(id).await?;
        let group = self.group()?;
        Ok(Response::new(pb::MemberPromoteResponse {
            header: self.header(group, 0),
            members: self.members().await?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::range_request::{SortOrder, SortTarget};
    use regatta_kv::command::KeyValue;

    fn config() -> crate::node::NodeConfig {
        let address: std::net::SocketAddr = "127.0.0.1:5000".parse().expect("address");
        crate::node::NodeConfig::single("/nonexistent", address)
    }

    fn request(
        target: SortTarget,
        order: SortOrder,
        limit: i64,
        keys_only: bool,
    ) -> pb::RangeRequest {
        pb::RangeRequest {
            key: b"k".to_vec(),
            range_end: b"l".to_vec(),
            limit,
            sort_order: order as i32,
            sort_target: target as i32,
            keys_only,
            ..pb::RangeRequest::default()
        }
    }

    /// Keys a..d with mod revisions 4, 1, 3, 2 and values z, y, x, w.
    fn stored(limit: u64) -> RangeResult {
        let all = [
            ("ka", 4, "z"),
            ("kb", 1, "y"),
            ("kc", 3, "x"),
            ("kd", 2, "w"),
        ];
        let kvs: Vec<KeyValue> = all
            .iter()
            .take(if limit == 0 {
                all.len()
            } else {
                limit as usize
            })
            .map(|(key, revision, value)| KeyValue {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                create_revision: 1,
                mod_revision: *revision,
                version: 1,
            })
            .collect();
        RangeResult {
            more: kvs.len() < all.len(),
            count: all.len() as u64,
            kvs,
        }
    }

    /// What the handler answers: the store's read under the query's limit,
    /// then the sort.
    fn answer(request: &pb::RangeRequest) -> Vec<(String, String)> {
        let (query, sort) = range_request(&config(), request).expect("valid");
        let mut result = stored(query.limit);
        if query.keys_only {
            for kv in &mut result.kvs {
                kv.value.clear();
            }
        }
        if let Some(sort) = sort {
            apply_sort(&mut result, &sort);
        }
        result
            .kvs
            .iter()
            .map(|kv| {
                (
                    String::from_utf8_lossy(&kv.key).to_string(),
                    String::from_utf8_lossy(&kv.value).to_string(),
                )
            })
            .collect()
    }

    fn keys(answer: &[(String, String)]) -> Vec<&str> {
        answer.iter().map(|(key, _)| key.as_str()).collect()
    }

    fn names(result: &RangeResult) -> Vec<String> {
        result
            .kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).to_string())
            .collect()
    }

    /// Ranges inside a transaction sort as alone, nested ones included;
    /// only a revision is refused there.
    #[test]
    fn ranges_inside_a_transaction_are_sorted() {
        use pb::request_op::Request as R;
        let range = |order: SortOrder| pb::RequestOp {
            request: Some(R::RequestRange(request(SortTarget::Mod, order, 0, false))),
        };
        let txn = pb::TxnRequest {
            compare: vec![],
            success: vec![
                range(SortOrder::None),
                pb::RequestOp {
                    request: Some(R::RequestTxn(pb::TxnRequest {
                        compare: vec![],
                        success: vec![],
                        failure: vec![range(SortOrder::Descend)],
                    })),
                },
            ],
            failure: vec![],
        };
        let (query, sorts) = txn_request(&config(), &txn, 0).expect("valid");
        assert_eq!(query.success.len(), 2);
        let mut result = TxnResult {
            succeeded: true,
            responses: vec![
                ResponseOp::Range(stored(0)),
                ResponseOp::Txn(TxnResult {
                    succeeded: false,
                    responses: vec![ResponseOp::Range(stored(0))],
                }),
            ],
        };
        apply_txn_sorts(&mut result, &sorts);
        let ResponseOp::Range(outer) = &result.responses[0] else {
            panic!("a range");
        };
        assert_eq!(names(outer), ["kb", "kd", "kc", "ka"]);
        let ResponseOp::Txn(inner) = &result.responses[1] else {
            panic!("a txn");
        };
        let ResponseOp::Range(inner) = &inner.responses[0] else {
            panic!("a range");
        };
        assert_eq!(names(inner), ["ka", "kc", "kd", "kb"]);

        let mut at_revision = request(SortTarget::Key, SortOrder::None, 0, false);
        at_revision.revision = 7;
        let refused = txn_request(
            &config(),
            &pb::TxnRequest {
                compare: vec![],
                success: vec![pb::RequestOp {
                    request: Some(R::RequestRange(at_revision)),
                }],
                failure: vec![],
            },
            0,
        );
        assert!(
            matches!(&refused, Err(Error::InvalidArgument(message)) if message.contains("revision")),
            "{:?}",
            refused.err()
        );
    }

    #[test]
    fn sorts_follow_etcd() {
        // Key order needs no sort, ascending or unordered.
        for order in [SortOrder::None, SortOrder::Ascend] {
            let (_, sort) = range_request(&config(), &request(SortTarget::Key, order, 0, false))
                .expect("valid");
            assert!(sort.is_none(), "{order:?}");
        }
        // Another target with no order sorts ascending, over the first
        // limit + 1 keys in key order, then keeps the limit, as etcd
        // (etcdctl --sort-by=MODIFY sends this).
        let unordered = answer(&request(SortTarget::Mod, SortOrder::None, 0, false));
        assert_eq!(keys(&unordered), ["kb", "kd", "kc", "ka"]);
        let unordered = answer(&request(SortTarget::Mod, SortOrder::None, 2, false));
        assert_eq!(keys(&unordered), ["kb", "kc"]);
        // With an order, every key is read, sorted, then limited.
        let descending = answer(&request(SortTarget::Mod, SortOrder::Descend, 2, false));
        assert_eq!(keys(&descending), ["ka", "kc"]);
        let by_key = answer(&request(SortTarget::Key, SortOrder::Descend, 1, false));
        assert_eq!(keys(&by_key), ["kd"]);
        // keys_only with a sort by value: sorted on the values, which are
        // then dropped.
        let (query, _) = range_request(
            &config(),
            &request(SortTarget::Value, SortOrder::Ascend, 0, true),
        )
        .expect("valid");
        assert!(!query.keys_only, "the values are needed for the sort");
        let by_value = answer(&request(SortTarget::Value, SortOrder::Ascend, 0, true));
        assert_eq!(keys(&by_value), ["kd", "kc", "kb", "ka"]);
        assert!(by_value.iter().all(|(_, value)| value.is_empty()));
        let (query, _) = range_request(
            &config(),
            &request(SortTarget::Mod, SortOrder::Ascend, 0, true),
        )
        .expect("valid");
        assert!(query.keys_only, "only a sort by value needs the values");
    }
}
