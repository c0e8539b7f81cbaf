//! Cluster membership (`docs/membership.md`).
//!
//! The metadata group's committed Raft membership is the cluster's
//! membership: who is a voter, who a learner. Operators change it through
//! [`Node::add_member`], [`Node::promote_member`], [`Node::demote_member`]
//! and [`Node::remove_member`], which propose the change to the metadata
//! group, so that Raft's own checks (one change at a time, learners caught
//! up before promotion, a quorum reachable after the change) give the
//! refusals. Every table group then follows: on each reconcile tick, the
//! leader of each table group proposes the next change that brings its
//! membership closer to the metadata group's.
//!
//! The metadata group also holds each member's addresses under
//! `member/<id>` (`docs/kv-format.md`). Every node reads them each tick and
//! points its transport at them, so a new member is reachable from the
//! moment it is added, and a member that moves is followed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use regatta_kv::command::{
    Command, DeleteRangeRequest, KeyRange, KeyValue, Query, RangeRequest, ResponseOp,
};
use regatta_multiraft::PeerAddress;
use regatta_raft::{ConfChange, Membership, NodeId, Role};
use regatta_wal::GroupId;

use super::{prefix_end, put, Node, META_GROUP};
use crate::error::{Error, Result};

const MEMBER_PREFIX: &[u8] = b"member/";
/// How often a node checks that its own address record is current.
const REGISTRATION_INTERVAL: Duration = Duration::from_secs(2);
/// How long the reconciler waits to delete one departed member's record.
const DEPARTED_FORGET_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one membership step of a table group may take before the
/// reconciler tries again.
const TABLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a member is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberAddresses {
    /// Its Raft peer address.
    pub raft_address: PeerAddress,
    /// Its client API URL; empty when unknown.
    pub client_url: String,
}

/// A member as `MemberList` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Its node id.
    pub id: NodeId,
    /// Its addresses, when recorded.
    pub addresses: Option<MemberAddresses>,
    /// A voter (else a learner).
    pub voter: bool,
    /// A learner the leader promotes once it has caught up.
    pub auto_promote: bool,
}

impl MemberInfo {
    /// Its peer URL (`http://<raft address>`), when recorded.
    pub fn peer_urls(&self) -> Vec<String> {
        self.addresses
            .iter()
            .map(|addresses| format!("http://{}", addresses.raft_address))
            .collect()
    }

    /// Its client URL, when recorded.
    pub fn client_urls(&self) -> Vec<String> {
        self.addresses
            .iter()
            .map(|addresses| addresses.client_url.clone())
            .filter(|url| !url.is_empty())
            .collect()
    }
}

fn member_key(id: NodeId) -> Vec<u8> {
    format!("member/{:020}", id.0).into_bytes()
}

/// Ids once removed: never added again (`removed/<id>`, kept for good).
const REMOVED_PREFIX: &[u8] = b"removed/";

/// The write of `id`'s `removed/<id>` tombstone.
fn tombstone(id: NodeId) -> Command {
    Command::Txn(regatta_kv::command::TxnRequest {
        compare: Vec::new(),
        success: vec![put(&removed_key(id), b"")],
        failure: Vec::new(),
    })
}

/// Ids this node force-removed whose `removed/<id>` tombstone is not
/// written yet (the metadata group may have no quorum until the last of
/// several forced removals). Kept in the file `tombstones-due` in the
/// data directory as well (`docs/membership.md`), so that a restart
/// before the write does not lose them.
pub(super) struct DueTombstones {
    path: std::path::PathBuf,
    ids: std::sync::Mutex<BTreeSet<NodeId>>,
}

impl DueTombstones {
    /// The file's name in the data directory.
    pub(super) const FILE_NAME: &'static str = "tombstones-due";

    /// Reads `data_dir`'s file; none means none are due.
    pub(super) fn open(data_dir: &std::path::Path) -> Result<DueTombstones> {
        let path = data_dir.join(Self::FILE_NAME);
        let mut ids = BTreeSet::new();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for line in text.lines().filter(|line| !line.trim().is_empty()) {
                    let id: u64 = line.trim().parse().map_err(|_| {
                        Error::Storage(format!(
                            "{}: {line:?} is not a node id (one decimal id per line)",
                            path.display()
                        ))
                    })?;
                    ids.insert(NodeId(id));
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(Error::Storage(format!("read {}: {error}", path.display()))),
        }
        Ok(DueTombstones {
            path,
            ids: std::sync::Mutex::new(ids),
        })
    }

    /// The ids due, in order.
    pub(super) fn ids(&self) -> Vec<NodeId> {
        self.lock().iter().copied().collect()
    }

    /// Adds `id`, durably before it returns Ok; on an error nothing is
    /// added.
    pub(super) fn add(&self, id: NodeId) -> Result<()> {
        let mut ids = self.lock();
        if ids.contains(&id) {
            return Ok(());
        }
        let mut with = ids.clone();
        with.insert(id);
        self.save(&with)?;
        *ids = with;
        Ok(())
    }

    /// Drops `id` once its tombstone is written.
    pub(super) fn remove(&self, id: NodeId) -> Result<()> {
        let mut ids = self.lock();
        if !ids.remove(&id) {
            return Ok(());
        }
        self.save(&ids)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<NodeId>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the file (write aside, fsync, rename, fsync the
    /// directory), or deletes it when none are due. Called under the lock,
    /// so that saves land in order; force-removals are rare.
    fn save(&self, ids: &BTreeSet<NodeId>) -> Result<()> {
        use std::io::Write;
        let failed = |error: std::io::Error| {
            Error::Storage(format!("write {}: {error}", self.path.display()))
        };
        if ids.is_empty() {
            match std::fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(error) => return Err(failed(error)),
            }
        } else {
            let partial = self.path.with_extension("partial");
            let text: String = ids.iter().map(|id| format!("{}\n", id.0)).collect();
            let mut file = std::fs::File::create(&partial).map_err(failed)?;
            file.write_all(text.as_bytes()).map_err(failed)?;
            file.sync_all().map_err(failed)?;
            std::fs::rename(&partial, &self.path).map_err(failed)?;
        }
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|dir| dir.sync_all())
                .map_err(failed)?;
        }
        Ok(())
    }
}

fn removed_key(id: NodeId) -> Vec<u8> {
    format!("removed/{:020}", id.0).into_bytes()
}

fn encode_addresses(addresses: &MemberAddresses) -> Vec<u8> {
    format!("{}\n{}", addresses.raft_address, addresses.client_url).into_bytes()
}

fn decode_member(key: &[u8], value: &[u8]) -> Option<(NodeId, MemberAddresses)> {
    let id: u64 = std::str::from_utf8(key.get(MEMBER_PREFIX.len()..)?)
        .ok()?
        .parse()
        .ok()?;
    let text = std::str::from_utf8(value).ok()?;
    let (raft_address, client_url) = text.split_once('\n').unwrap_or((text, ""));
    Some((
        NodeId(id),
        MemberAddresses {
            raft_address: raft_address.parse().ok()?,
            client_url: client_url.to_string(),
        },
    ))
}

fn contains(membership: &Membership, node: NodeId) -> bool {
    membership.voters.contains(&node) || membership.learners.contains(&node)
}

/// Address records to delete: of members this node has seen leave the
/// cluster, and of ids that have had a record but no membership for
/// `ORPHAN_RECORD_AGE` while this node watched.
///
/// A node that removes itself cannot delete its own record (a removed
/// node cannot write), so the metadata group's leader deletes the records
/// of departed members; until then the record keeps its address taken.
/// Every node tracks departures, so a new leader knows those seen before
/// it took over. A departure during a restart, and the record of an add
/// that timed out and never committed, are caught by their age instead:
/// an add writes its record just before it proposes the member, and gives
/// up within the request timeout, far less than the age.
#[derive(Default)]
pub(crate) struct Departures {
    /// The members as of the last check; `None` before the first.
    last_members: Option<BTreeSet<NodeId>>,
    departed: BTreeSet<NodeId>,
    /// Recorded ids that are not members: the revision of the record,
    /// and when this node first saw that record without a member (a
    /// record written again starts over).
    orphans: BTreeMap<NodeId, (u64, Instant)>,
}

/// How long a record may stand for an id that is not a member before it
/// is deleted.
const ORPHAN_RECORD_AGE: Duration = Duration::from_secs(60);

impl Departures {
    /// Notes the members now; returns the recorded ids whose records are
    /// to go: departed members, and ids recorded without membership for
    /// `ORPHAN_RECORD_AGE`. Forgets departures whose record is gone or
    /// who are members again.
    /// `recorded` maps each recorded id to its record's mod revision.
    fn update(
        &mut self,
        members: BTreeSet<NodeId>,
        recorded: &BTreeMap<NodeId, u64>,
        now: Instant,
    ) -> Vec<NodeId> {
        if let Some(last) = &self.last_members {
            self.departed.extend(last.difference(&members));
        }
        self.departed
            .retain(|id| !members.contains(id) && recorded.contains_key(id));
        self.orphans.retain(|id, (revision, _)| {
            !members.contains(id) && recorded.get(id) == Some(revision)
        });
        for (id, revision) in recorded.iter().filter(|(id, _)| !members.contains(id)) {
            self.orphans.entry(*id).or_insert((*revision, now));
        }
        self.last_members = Some(members);
        let aged = self
            .orphans
            .iter()
            .filter(|(_, (_, since))| now.saturating_duration_since(*since) >= ORPHAN_RECORD_AGE)
            .map(|(id, _)| *id);
        let named: BTreeSet<NodeId> = self.departed.iter().copied().chain(aged).collect();
        named.into_iter().collect()
    }

    /// `id` is being added again: its new record must stay.
    fn forget(&mut self, id: NodeId) {
        self.departed.remove(&id);
        self.orphans.remove(&id);
    }
}

/// A membership change the leader refused before appending it.
fn is_conf_change_refusal(error: &Error) -> bool {
    matches!(
        error,
        Error::Raft(regatta_multiraft::Error::Raft {
            source: regatta_raft::Error::ConfChangeRefused { .. },
            ..
        })
    )
}

/// Refuses `address` for member `id` when another member's record has it.
fn check_address_free(
    recorded: &BTreeMap<NodeId, MemberAddresses>,
    id: NodeId,
    address: &PeerAddress,
) -> Result<()> {
    match recorded
        .iter()
        .find(|(other, addresses)| **other != id && &addresses.raft_address == address)
    {
        Some((other, _)) => Err(Error::InvalidArgument(format!(
            "node {} already uses the Raft address {address}",
            other.0
        ))),
        None => Ok(()),
    }
}

/// The next change that brings `current` closer to `wanted`, if any:
/// additions first (as learners, promoted by the leader once caught up),
/// then promotions and demotions, then removals, one at a time.
pub(super) fn next_change(current: &Membership, wanted: &Membership) -> Option<ConfChange> {
    let wanted_members: BTreeSet<NodeId> = wanted.voters.union(&wanted.learners).copied().collect();
    for node in &wanted_members {
        if !contains(current, *node) {
            let auto_promote = wanted.voters.contains(node) || wanted.auto_promote.contains(node);
            return Some(ConfChange::AddLearner {
                node: *node,
                auto_promote,
            });
        }
    }
    for node in &wanted.voters {
        if current.learners.contains(node) && !current.auto_promote.contains(node) {
            return Some(ConfChange::Promote { node: *node });
        }
    }
    // A voter leaves (demoted or removed) only once every wanted voter
    // votes here: a replacement never shrinks the group, even while the
    // new node is still a learner catching up (auto-promotion).
    let voters_pending = wanted
        .voters
        .iter()
        .any(|node| !current.voters.contains(node));
    for node in &wanted.learners {
        if current.voters.contains(node) && !wanted.auto_promote.contains(node) && !voters_pending {
            return Some(ConfChange::Demote { node: *node });
        }
    }
    current
        .voters
        .union(&current.learners)
        .find(|node| {
            let unwanted = !wanted_members.contains(node);
            let voter_must_stay = voters_pending && current.voters.contains(node);
            unwanted && !voter_must_stay
        })
        .map(|node| ConfChange::Remove { node: *node })
}

impl Node {
    /// The metadata group's committed membership as this node holds it.
    pub async fn membership(&self) -> Result<Membership> {
        Ok(self.host.status(META_GROUP).await?.committed_membership)
    }

    /// The recorded addresses of members, from this node's copy of the
    /// metadata group.
    pub async fn member_addresses(&self) -> Result<BTreeMap<NodeId, MemberAddresses>> {
        Ok(self
            .member_records()
            .await?
            .into_iter()
            .map(|(id, (addresses, _))| (id, addresses))
            .collect())
    }

    /// The keys under `prefix` in this node's copy of the metadata group
    /// (with their values unless `keys_only`); `what` names them in the
    /// error.
    async fn metadata_prefix(
        &self,
        prefix: &[u8],
        keys_only: bool,
        what: &str,
    ) -> Result<Vec<KeyValue>> {
        let query = Query::Range(RangeRequest {
            range: KeyRange {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
            },
            keys_only,
            ..RangeRequest::default()
        });
        let response = self.read(META_GROUP, &query, false).await?;
        match response.result {
            Ok(ResponseOp::Range(range)) => Ok(range.kvs),
            _ => Err(Error::Internal(format!("reading the {what} failed"))),
        }
    }

    /// Every member's address record with its mod revision.
    async fn member_records(&self) -> Result<BTreeMap<NodeId, (MemberAddresses, u64)>> {
        let records = self
            .metadata_prefix(MEMBER_PREFIX, false, "member records")
            .await?;
        Ok(records
            .iter()
            .filter_map(|kv| {
                decode_member(&kv.key, &kv.value)
                    .map(|(id, addresses)| (id, (addresses, kv.mod_revision)))
            })
            .collect())
    }

    /// Ids removed from the cluster (`removed/<id>`), as this node's copy
    /// of the metadata group holds them.
    async fn removed_ids(&self) -> Result<BTreeSet<NodeId>> {
        let removed = self
            .metadata_prefix(REMOVED_PREFIX, true, "removed ids")
            .await?;
        Ok(removed
            .iter()
            .filter_map(|kv| {
                std::str::from_utf8(kv.key.get(REMOVED_PREFIX.len()..)?)
                    .ok()?
                    .parse()
                    .ok()
                    .map(NodeId)
            })
            .collect())
    }

    /// Every member: the metadata group's membership with the recorded
    /// addresses (the configured ones for initial members not recorded
    /// yet).
    pub async fn members(&self) -> Result<Vec<MemberInfo>> {
        let membership = self.membership().await?;
        let recorded = self.member_addresses().await?;
        let ids: BTreeSet<NodeId> = membership
            .voters
            .union(&membership.learners)
            .copied()
            .collect();
        Ok(ids
            .into_iter()
            .map(|id| MemberInfo {
                id,
                addresses: recorded.get(&id).cloned().or_else(|| {
                    self.config
                        .members
                        .get(&id)
                        .map(|raft_address| MemberAddresses {
                            raft_address: raft_address.clone(),
                            client_url: self
                                .config
                                .client_urls
                                .get(&id)
                                .cloned()
                                .unwrap_or_default(),
                        })
                }),
                voter: membership.voters.contains(&id),
                auto_promote: membership.auto_promote.contains(&id),
            })
            .collect())
    }

    async fn record_member(&self, id: NodeId, addresses: &MemberAddresses) -> Result<()> {
        self.record_member_at(id, addresses).await.map(|_| ())
    }

    /// `record_member`, returning the revision the record was written at.
    async fn record_member_at(&self, id: NodeId, addresses: &MemberAddresses) -> Result<u64> {
        let command = Command::Txn(regatta_kv::command::TxnRequest {
            compare: Vec::new(),
            success: vec![put(&member_key(id), &encode_addresses(addresses))],
            failure: Vec::new(),
        });
        self.write(META_GROUP, &command)
            .await
            .map(|response| response.revision)
    }

    /// Deletes member `id`'s record if it is still the one written at
    /// `revision`: a record written again meanwhile (an add retried
    /// elsewhere, the member registering itself) stays.
    async fn forget_member_record(&self, id: NodeId, revision: u64) -> Result<bool> {
        let key = member_key(id);
        let command = Command::Txn(regatta_kv::command::TxnRequest {
            compare: vec![regatta_kv::command::Compare {
                range: KeyRange {
                    key: key.clone(),
                    range_end: Vec::new(),
                },
                target: regatta_kv::command::CompareTarget::ModRevision(
                    i64::try_from(revision).unwrap_or(i64::MAX),
                ),
                result: regatta_kv::command::CompareResult::Equal,
            }],
            success: vec![regatta_kv::command::RequestOp::DeleteRange(
                DeleteRangeRequest {
                    range: KeyRange {
                        key,
                        range_end: Vec::new(),
                    },
                    prev_kv: false,
                },
            )],
            failure: Vec::new(),
        });
        let response = self.write(META_GROUP, &command).await?;
        Ok(matches!(
            response.result,
            Ok(ResponseOp::Txn(ref txn)) if txn.succeeded
        ))
    }

    async fn forget_member(&self, id: NodeId) -> Result<()> {
        let command = Command::DeleteRange(DeleteRangeRequest {
            range: KeyRange {
                key: member_key(id),
                range_end: Vec::new(),
            },
            prev_kv: false,
        });
        self.write(META_GROUP, &command).await.map(|_| ())
    }

    /// Proposes `change` to the metadata group from this node: only a
    /// leader can check a change (and give the reason for a refusal), so a
    /// node that does not lead the group first asks for its leadership.
    /// Retried until the request timeout while there is no leader.
    async fn change_cluster(&self, change: ConfChange) -> Result<()> {
        let own = self.config.node_id;
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let error = match self
                .host
                .change_membership(META_GROUP, change.clone())
                .await
            {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if !super::retryable(&error) || Instant::now() >= deadline {
                return Err(match error {
                    regatta_multiraft::Error::NotLeader { .. } => Error::Unavailable(
                        "the cluster has no leader now (is a quorum of its voters up?); retry"
                            .into(),
                    ),
                    other => other.into(),
                });
            }
            if let regatta_multiraft::Error::NotLeader {
                leader_hint: Some(leader),
                ..
            } = &error
            {
                if *leader != own {
                    let _ = self.host.transfer_leader(META_GROUP, own).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Adds node `id`, reached at `addresses`, as a learner of every group;
    /// unless `learner`, each group's leader promotes it to voter once it
    /// has caught up. Start the node with `--raft.join` after this.
    pub async fn add_member(
        &self,
        id: NodeId,
        addresses: MemberAddresses,
        learner: bool,
    ) -> Result<()> {
        if id.0 == 0 {
            return Err(Error::InvalidArgument("node id 0 is invalid".into()));
        }
        if contains(&self.membership().await?, id) {
            return Err(Error::FailedPrecondition(format!(
                "node {} is already a member",
                id.0
            )));
        }
        // A group may still hold the old incarnation of a removed id as a
        // voter (its leader drops members after the metadata group does):
        // a wiped node under that id would count as holding its log.
        if self.removed_ids().await?.contains(&id) {
            return Err(Error::FailedPrecondition(format!(
                "node id {} was removed from this cluster, and ids are never reused: add the node under a new id (etcd's member add picks the next one)",
                id.0
            )));
        }
        let recorded = self.member_addresses().await?;
        check_address_free(&recorded, id, &addresses.raft_address)?;
        self.departures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(id);
        let written = self.record_member_at(id, &addresses).await?;
        self.transport.set_peer(id, addresses.raft_address.clone());
        let added = self
            .change_cluster(ConfChange::AddLearner {
                node: id,
                auto_promote: !learner,
            })
            .await;
        if let Err(error) = added {
            // Refused by the leader (nothing was appended): the record
            // would keep the address taken for a node that never joined.
            // After a timeout the change may still commit, so the record
            // stays; so does one a concurrent add of the same node wrote
            // since (only the record written here is deleted), and any
            // when the node turned out to be a member already.
            let member_already = error.to_string().contains("already");
            if is_conf_change_refusal(&error)
                && !member_already
                && self
                    .forget_member_record(id, written)
                    .await
                    .unwrap_or(false)
            {
                self.transport.remove_peer(id);
            }
            return Err(error);
        }
        tracing::info!(node = id.0, raft = %addresses.raft_address, learner, "member added");
        Ok(())
    }

    /// Records that member `id` is reached at `raft_address` from now on
    /// (etcd's MemberUpdate): every node dials it there, unless its own
    /// configuration maps that member elsewhere. Start the member with
    /// this `--raft.address`; a member still running on another address
    /// records its own again when it next registers.
    pub async fn update_member_address(&self, id: NodeId, raft_address: PeerAddress) -> Result<()> {
        if !contains(&self.membership().await?, id) {
            return Err(Error::FailedPrecondition(format!(
                "node {} is not a member",
                id.0
            )));
        }
        let recorded = self.member_addresses().await?;
        check_address_free(&recorded, id, &raft_address)?;
        let client_url = recorded
            .get(&id)
            .map(|addresses| addresses.client_url.clone())
            .or_else(|| self.config.client_urls.get(&id).cloned())
            .unwrap_or_default();
        let addresses = MemberAddresses {
            raft_address,
            client_url,
        };
        self.record_member(id, &addresses).await?;
        if let Some(address) = peer_address(&self.config, id, &addresses) {
            self.transport.set_peer(id, address);
        }
        tracing::info!(node = id.0, raft = %addresses.raft_address, "member address updated");
        Ok(())
    }

    /// Promotes learner `id` to voter; refused until it has caught up.
    pub async fn promote_member(&self, id: NodeId) -> Result<()> {
        self.change_cluster(ConfChange::Promote { node: id })
            .await?;
        tracing::info!(node = id.0, "member promoted");
        Ok(())
    }

    /// Demotes voter `id` to learner; refused when the voters left could
    /// not form a quorum.
    pub async fn demote_member(&self, id: NodeId) -> Result<()> {
        self.change_cluster(ConfChange::Demote { node: id }).await?;
        tracing::info!(node = id.0, "member demoted");
        Ok(())
    }

    /// Removes member `id` from every group; refused when the voters left
    /// could not form a reachable quorum. A removed node stops itself.
    pub async fn remove_member(&self, id: NodeId) -> Result<()> {
        if !contains(&self.membership().await?, id) {
            return Err(Error::FailedPrecondition(format!(
                "node {} is not a member",
                id.0
            )));
        }
        // The tombstone first: a node that removes itself can write nothing
        // after. One left by a refused removal only keeps a member's id
        // from being added again, which it cannot be while a member.
        self.write(META_GROUP, &tombstone(id)).await?;
        self.change_cluster(ConfChange::Remove { node: id }).await?;
        // The removal committed: the call succeeds whatever happens to the
        // address record. A node that removed itself is no member now, so
        // its own write would be dropped; the metadata leader's departure
        // sweep deletes a record left behind.
        if id != self.config.node_id {
            if let Err(error) = self.forget_member(id).await {
                tracing::warn!(node = id.0, %error, "removed; its address record is left for the departure sweep");
            }
        }
        tracing::info!(node = id.0, "member removed");
        Ok(())
    }

    /// The groups on this node that hold `id`, the metadata group last
    /// (table groups lose the node first, so that the reconciler, once the
    /// metadata group changes, finds nothing left to do). Every group is
    /// looked at before anything changes: a group this node leads has a
    /// quorum (a leader that stops hearing from one steps down), and a
    /// change forced beside a working quorum can elect two leaders, so
    /// such a group refuses the whole force-remove.
    async fn groups_to_force(&self, id: NodeId) -> Result<Vec<GroupId>> {
        let mut groups = self.running_groups();
        groups.retain(|group| *group != META_GROUP);
        groups.push(META_GROUP);
        let mut holding = Vec::new();
        for group in groups {
            let status = match self.host.status(group).await {
                Ok(status) => status,
                // Removed, or being removed, because its table was deleted
                // (a group stopped for another reason is an error here).
                Err(
                    regatta_multiraft::Error::UnknownGroup(_)
                    | regatta_multiraft::Error::GroupStopped { .. },
                ) if group != META_GROUP
                    && !self.tables().iter().any(|table| table.group == group) =>
                {
                    continue
                }
                Err(error) => return Err(error.into()),
            };
            if !contains(&status.membership, id) {
                continue;
            }
            if status.soft_state.role == Role::Leader {
                return Err(Error::FailedPrecondition(format!(
                    "this node leads group {} with a quorum of its voters, so node {} can be \
                     removed safely: use `regatta member remove {}` (force-remove is for \
                     groups that lost their quorum for good)",
                    group.0, id.0, id.0
                )));
            }
            holding.push(group);
        }
        if holding.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "node {} is a member of no group on this node",
                id.0
            )));
        }
        Ok(holding)
    }

    /// UNSAFE: removes `id` from every group hosted here, on this node
    /// alone, without a quorum. For a cluster that lost its quorum for
    /// good: run it on one survivor (the most up-to-date), then wipe and
    /// re-add the others. Writes acknowledged only by lost nodes are lost.
    pub async fn force_remove_member(&self, id: NodeId) -> Result<()> {
        if id == self.config.node_id {
            return Err(Error::InvalidArgument(
                "a node cannot force-remove itself; run it on a survivor".into(),
            ));
        }
        self.wait_for_catalogue_groups().await?;
        let holding = self.groups_to_force(id).await?;
        // A tombstone keeps the id from being added again, and makes the
        // peers refuse the node if it ever comes back (it would otherwise
        // run as a ghost). It is written by the reconciler once the
        // metadata group has a quorum again (after the last forced
        // removal, not necessarily this one), and recorded on disk before
        // anything is forced: once the node is out of every group, a
        // second force-remove would find nothing to record it for.
        self.tombstones_due.add(id)?;
        let mut forced: Vec<u64> = Vec::new();
        let groups = holding.len();
        for group in holding {
            if let Err(error) = self.host.force_remove(group, id).await {
                if forced.is_empty() {
                    // Nothing changed: nothing to record either.
                    if let Err(error) = self.tombstones_due.remove(id) {
                        tracing::warn!(node = id.0, %error, "could not drop the pending tombstone of a force-remove that changed nothing");
                    }
                    return Err(error.into());
                }
                return Err(Error::Unavailable(format!(
                    "node {} was forced out of groups {forced:?} but not out of group {}: {error}; \
                     run force-remove again to finish",
                    id.0, group.0
                )));
            }
            forced.push(group.0);
        }
        tracing::warn!(node = id.0, groups, "member force-removed");
        if let Err(error) =
            tokio::time::timeout(self.config.request_timeout, self.forget_member(id))
                .await
                .unwrap_or_else(|_| Err(Error::Unavailable("timed out".into())))
        {
            tracing::warn!(node = id.0, %error, "the force-removed member's address record stays");
        }
        self.transport.remove_peer(id);
        Ok(())
    }

    /// Waits until every table in this node's copy of the catalogue has
    /// its group running here. Just after a start the reconciler has not
    /// started them yet, and a forced removal that skipped one would leave
    /// that table without a quorum for good.
    async fn wait_for_catalogue_groups(&self) -> Result<()> {
        let deadline = Instant::now() + self.config.request_timeout;
        // The catalogue as this node's log has it: every entry it knew
        // committed at the start applied first (a restart applies them
        // again from the WAL), then read again on every pass, so that a
        // table deleted meanwhile is not waited for.
        let known_committed = self.host.status(META_GROUP).await?.hard_state.commit;
        loop {
            let meta = self.host.status(META_GROUP).await?;
            if meta.applied < known_committed {
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable(
                        "this node has not applied its table catalogue yet; retry".into(),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let (tables, _) = self.read_catalogue(false).await?;
            let running: BTreeSet<GroupId> = self.running_groups().into_iter().collect();
            let missing: Vec<u64> = tables
                .values()
                .filter(|group| !running.contains(group))
                .map(|group| group.0)
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "the groups {missing:?} of this node's tables are not started yet; retry"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves the leadership of `group` to `target`, or with `None` to the
    /// most up-to-date other voter (this node must lead then).
    pub async fn move_leader(&self, group: GroupId, target: Option<NodeId>) -> Result<()> {
        match target {
            Some(target) => self.transfer_leader(group, target).await,
            None => Ok(self.host.step_down(group).await?),
        }
    }

    /// Moves the leadership of every group this node leads (the catalogue
    /// included) to `target`, or to each group's best other voter; returns
    /// how many groups it asked.
    pub async fn move_leaderships(&self, target: Option<NodeId>) -> Result<u64> {
        let mut moved = 0;
        for group in self.running_groups() {
            let status = match self.host.status(group).await {
                Ok(status) => status,
                // Removed, or being removed: its table was deleted.
                Err(
                    regatta_multiraft::Error::UnknownGroup(_)
                    | regatta_multiraft::Error::GroupStopped { .. },
                ) if group != META_GROUP => continue,
                Err(error) => return Err(error.into()),
            };
            if status.soft_state.role == Role::Leader && status.membership.voters.len() > 1 {
                self.move_leader(group, target).await?;
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// The id `MemberAdd` gives a new node: one past the highest in use.
    pub async fn next_member_id(&self) -> Result<NodeId> {
        let membership = self.membership().await?;
        let recorded = self.member_addresses().await?;
        let removed = self.removed_ids().await?;
        let highest = membership
            .voters
            .iter()
            .chain(membership.learners.iter())
            .chain(recorded.keys())
            .chain(removed.iter())
            .chain(self.config.members.keys())
            .map(|id| id.0)
            .max()
            .unwrap_or(0);
        Ok(NodeId(highest + 1))
    }

    /// Hands every leadership this node holds to another voter, waiting
    /// up to `timeout`; returns how many it still holds. Used before a
    /// restart, so that clients see no election.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut led = 0;
            for group in self.running_groups() {
                let Ok(status) = self.host.status(group).await else {
                    continue;
                };
                if status.soft_state.role == Role::Leader && status.membership.voters.len() > 1 {
                    led += 1;
                    let _ = self.host.step_down(group).await;
                }
            }
            if led == 0 || Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Leave-on-terminate: hands over leaderships, removes this node from
    /// the cluster and waits (up to `timeout`) until every group it hosts
    /// has dropped it.
    pub async fn leave(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let own = self.config.node_id;
        self.drain(Duration::from_secs(5)).await;
        // Done once this node knows its removal committed (`removed`): the
        // membership it reads is the latest in its log, and a removal still
        // uncommitted there may yet be truncated by a new leader.
        let removal_committed = || async {
            self.host
                .status(META_GROUP)
                .await
                .is_ok_and(|status| status.soft_state.removed)
        };
        loop {
            match self.remove_member(own).await {
                Ok(()) => break,
                // "not a member", or an answer lost on the way (a timeout,
                // a leader change) after the removal committed.
                Err(_) if removal_committed().await => break,
                Err(error) if Instant::now() >= deadline => return Err(error),
                Err(error) => {
                    tracing::info!(%error, "leaving the cluster: retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        // The table groups' leaders follow the metadata group.
        loop {
            let mut member_of = 0;
            for group in self.running_groups() {
                if let Ok(status) = self.host.status(group).await {
                    if contains(&status.membership, own) && !status.soft_state.removed {
                        member_of += 1;
                    }
                }
            }
            if member_of == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "left the cluster, but {member_of} groups had not dropped this node in time"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Becomes true once this node has been removed from the cluster; the
    /// binary then shuts down (shutdown-on-remove).
    pub fn removed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.removed.subscribe()
    }

    /// One reconcile tick of membership: follow the address records, keep
    /// this node's own record current, notice this node's removal, and
    /// move each table group this node leads one step towards the
    /// metadata group's membership.
    pub(super) async fn reconcile_membership(
        self: &std::sync::Arc<Self>,
        meta: &regatta_raft::Status,
    ) {
        let own = self.config.node_id;
        // A node removed while it was down hears of it from the peers it
        // dials (they refuse it, below): nothing else reaches it.
        let told = self.transport.told_removed();
        if meta.soft_state.removed || told {
            if !*self.removed.borrow() {
                if told {
                    tracing::warn!("a peer refused this node: it was removed from the cluster while it was down");
                } else {
                    tracing::warn!("this node was removed from the cluster");
                }
            }
            self.removed.send_replace(true);
            return;
        }
        self.write_due_tombstones().await;
        // Peers removed for good (a tombstone and a committed removal: a
        // tombstone alone may be left by a refused removal) are refused at
        // the transport's handshake, which tells them so.
        self.refuse_removed_peers().await;
        if let Ok(records) = self.member_records().await {
            for (id, (addresses, _)) in &records {
                if let Some(address) = peer_address(&self.config, *id, addresses) {
                    self.transport.set_peer(*id, address);
                }
            }
            self.register_self(meta, records.get(&own).map(|(addresses, _)| addresses));
            let revisions = records
                .iter()
                .map(|(id, (_, revision))| (*id, *revision))
                .collect();
            self.forget_departed(meta, &revisions).await;
        }
        // Committed: a change the metadata group may still truncate is not
        // carried into the tables.
        let wanted = &meta.committed_membership;
        if wanted.voters.is_empty() {
            return; // not joined yet
        }
        for group in self.running_groups() {
            if group == META_GROUP {
                continue;
            }
            let Ok(status) = self.host.status(group).await else {
                continue;
            };
            if status.soft_state.role != Role::Leader {
                continue;
            }
            let Some(change) = next_change(&status.membership, wanted) else {
                continue;
            };
            {
                let mut changing = self.changing.lock().unwrap_or_else(|p| p.into_inner());
                if !changing.insert(group) {
                    continue;
                }
            }
            let host = self.host.clone();
            let changing = std::sync::Arc::clone(&self.changing);
            tokio::spawn(async move {
                let result = tokio::time::timeout(
                    TABLE_CHANGE_TIMEOUT,
                    host.change_membership(group, change.clone()),
                )
                .await;
                match result {
                    Ok(Ok(())) => {
                        tracing::info!(group = group.0, ?change, "table membership changed")
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(group = group.0, ?change, %error, "table membership change refused; retrying")
                    }
                    Err(_) => tracing::debug!(
                        group = group.0,
                        ?change,
                        "table membership change timed out; retrying"
                    ),
                }
                changing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&group);
            });
        }
    }

    /// Tells the transport which peers to refuse as removed: ids with a
    /// `removed/<id>` tombstone that the committed membership does not
    /// hold. The membership is read after the tombstones: what this node
    /// applied is committed, so a member's later tombstone (from a refused
    /// removal) is never set against a membership from before the member
    /// joined. Only a member that knows a leader decides; the transport
    /// refuses an id only once it stayed removed for a grace period.
    async fn refuse_removed_peers(&self) {
        let Ok(removed) = self.removed_ids().await else {
            return;
        };
        let Ok(meta) = self.host.status(META_GROUP).await else {
            return;
        };
        let committed = &meta.committed_membership;
        if !contains(committed, self.config.node_id) || meta.soft_state.leader.is_none() {
            return;
        }
        let refused = removed
            .into_iter()
            .filter(|id| !contains(committed, *id))
            .collect();
        self.transport.refuse_removed(refused);
    }

    /// Writes the tombstones of force-removed ids (`tombstones_due`) while
    /// the metadata group has a leader; those that fail are tried again
    /// at the next tick.
    async fn write_due_tombstones(&self) {
        let due = self.tombstones_due.ids();
        if due.is_empty() {
            return;
        }
        let Ok(meta) = self.host.status(META_GROUP).await else {
            return;
        };
        if meta.soft_state.leader.is_none() {
            return;
        }
        for id in due {
            let written = tokio::time::timeout(
                Duration::from_secs(1),
                self.write(META_GROUP, &tombstone(id)),
            )
            .await;
            if let Ok(Ok(_)) = written {
                tracing::info!(node = id.0, "wrote the force-removed member's tombstone");
                if let Err(error) = self.tombstones_due.remove(id) {
                    // Written again after a restart: a tombstone is a put.
                    tracing::warn!(node = id.0, %error, "could not drop the written tombstone from the pending file");
                }
            }
        }
    }

    /// Notes departures; on the metadata group's leader, deletes the
    /// address records of departed members (`Departures`).
    async fn forget_departed(&self, meta: &regatta_raft::Status, recorded: &BTreeMap<NodeId, u64>) {
        let members: BTreeSet<NodeId> = meta
            .committed_membership
            .voters
            .iter()
            .chain(&meta.committed_membership.learners)
            .copied()
            .collect();
        if members.is_empty() {
            return; // not joined yet
        }
        let departed = self
            .departures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .update(members, recorded, Instant::now());
        if meta.soft_state.role != Role::Leader {
            return;
        }
        for id in departed {
            let Some(revision) = recorded.get(&id).copied() else {
                continue;
            };
            let forgotten = self.forget_member_record(id, revision);
            match tokio::time::timeout(DEPARTED_FORGET_TIMEOUT, forgotten).await {
                Ok(Ok(true)) => tracing::info!(
                    node = id.0,
                    "deleted the address record of a departed member"
                ),
                Ok(Ok(false)) => {
                    tracing::debug!(
                        node = id.0,
                        "a departed member's record was written again; kept"
                    )
                }
                Ok(Err(error)) => {
                    tracing::debug!(node = id.0, %error, "cannot delete a departed member's record yet")
                }
                Err(_) => {
                    tracing::debug!(node = id.0, "deleting a departed member's record timed out")
                }
            }
        }
    }

    /// Writes this node's address record when it is missing or stale (at
    /// most every `REGISTRATION_INTERVAL`, in the background).
    fn register_self(
        self: &std::sync::Arc<Self>,
        meta: &regatta_raft::Status,
        recorded: Option<&MemberAddresses>,
    ) {
        let own = self.config.node_id;
        if !contains(&meta.membership, own) || meta.soft_state.leader.is_none() {
            return;
        }
        let Some(raft_address) = self.config.members.get(&own).cloned() else {
            return;
        };
        let wanted = MemberAddresses {
            raft_address,
            client_url: self
                .config
                .client_urls
                .get(&own)
                .cloned()
                .unwrap_or_default(),
        };
        if recorded == Some(&wanted) {
            return;
        }
        {
            let mut last = self.registered_at.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < REGISTRATION_INTERVAL) {
                return;
            }
            *last = Some(Instant::now());
        }
        let node = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = node.record_member(own, &wanted).await {
                tracing::debug!(%error, "recording this node's addresses failed; retrying later");
            }
        });
    }
}

/// Where this node dials member `id`, if its address record should move
/// it: the node's own configuration (`--raft.initial-members`,
/// `--raft.peer-addresses`) wins over the record the member wrote, so an
/// operator's explicit mapping (a proxy, a NAT address, a test harness's
/// fault-injecting link) holds; records place members this node was not
/// configured with.
fn peer_address(
    config: &super::NodeConfig,
    id: NodeId,
    recorded: &MemberAddresses,
) -> Option<PeerAddress> {
    let configured = config.members.contains_key(&id) || config.peer_addresses.contains_key(&id);
    (!configured).then(|| recorded.raft_address.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_tombstones_survive_a_reopen_and_the_file_goes_when_none_are_due() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join(DueTombstones::FILE_NAME);
        let due = DueTombstones::open(dir.path()).expect("open");
        assert!(due.ids().is_empty());
        due.add(NodeId(5)).expect("add");
        due.add(NodeId(3)).expect("add");
        let reopened = DueTombstones::open(dir.path()).expect("reopen");
        assert_eq!(reopened.ids(), vec![NodeId(3), NodeId(5)]);
        reopened.remove(NodeId(3)).expect("remove");
        reopened.remove(NodeId(3)).expect("remove again");
        assert_eq!(
            DueTombstones::open(dir.path()).expect("reopen").ids(),
            vec![NodeId(5)]
        );
        reopened.remove(NodeId(5)).expect("remove");
        assert!(!file.exists(), "no file once none are due");
        assert!(DueTombstones::open(dir.path())
            .expect("reopen")
            .ids()
            .is_empty());
    }

    #[test]
    fn a_damaged_due_tombstones_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(DueTombstones::FILE_NAME), "3\nthree\n").expect("write");
        let Err(error) = DueTombstones::open(dir.path()) else {
            panic!("a damaged file was read");
        };
        let message = error.to_string();
        assert!(
            message.contains("tombstones-due") && message.contains("three"),
            "{message}"
        );
    }

    #[test]
    fn configured_peer_addresses_win_over_address_records() {
        let proxy: PeerAddress = "proxy.example:7002".parse().expect("address");
        let own_record: PeerAddress = "node-2.example:5002".parse().expect("address");
        let own: std::net::SocketAddr = "127.0.0.1:5001".parse().expect("address");
        let mut config = crate::NodeConfig::single(std::path::Path::new("unused"), own);
        config.members.insert(NodeId(2), proxy.clone());
        config.peer_addresses.insert(NodeId(5), proxy);
        let record = MemberAddresses {
            raft_address: own_record.clone(),
            client_url: String::new(),
        };
        assert_eq!(peer_address(&config, NodeId(2), &record), None);
        assert_eq!(
            peer_address(&config, NodeId(5), &record),
            None,
            "--raft.peer-addresses wins too"
        );
        assert_eq!(
            peer_address(&config, NodeId(4), &record),
            Some(own_record),
            "a member added later is placed by its record"
        );
    }

    #[test]
    fn departed_members_records_are_named_until_gone() {
        let ids =
            |list: &[u64]| -> BTreeSet<NodeId> { list.iter().map(|id| NodeId(*id)).collect() };
        let recorded: BTreeMap<NodeId, u64> = [(NodeId(3), 10), (NodeId(4), 11)].into();
        let mut departures = Departures::default();
        let now = Instant::now();
        // The first look only notes the members; 4 is being added (a
        // record, not yet a member) and is not named while it is young.
        assert!(departures
            .update(ids(&[1, 2, 3]), &recorded, now)
            .is_empty());
        assert_eq!(
            departures.update(ids(&[1, 2]), &recorded, now),
            vec![NodeId(3)]
        );
        assert_eq!(
            departures.update(ids(&[1, 2]), &recorded, now),
            vec![NodeId(3)],
            "named until its record is gone"
        );
        let only_4: BTreeMap<NodeId, u64> = recorded
            .iter()
            .filter(|(id, _)| id.0 == 4)
            .map(|(id, revision)| (*id, *revision))
            .collect();
        assert!(departures.update(ids(&[1, 2]), &only_4, now).is_empty());
        // Removed, then added again before its record went: kept.
        assert_eq!(departures.update(ids(&[1, 2, 3]), &recorded, now), vec![]);
        assert_eq!(
            departures.update(ids(&[1, 2]), &recorded, now),
            vec![NodeId(3)]
        );
        departures.forget(NodeId(3));
        assert!(departures.update(ids(&[1, 2]), &recorded, now).is_empty());
    }

    /// A record without a member for `ORPHAN_RECORD_AGE` is named even
    /// when this node never saw the id leave: it left while the node was
    /// down, or its add timed out and never committed. A member's record,
    /// and one whose add starts again, are not.
    #[test]
    fn records_without_a_member_are_named_once_old() {
        let ids =
            |list: &[u64]| -> BTreeSet<NodeId> { list.iter().map(|id| NodeId(*id)).collect() };
        let mut recorded: BTreeMap<NodeId, u64> = [1u64, 2, 7, 8]
            .iter()
            .map(|id| (NodeId(*id), 100 + id))
            .collect();
        let mut departures = Departures::default();
        let start = Instant::now();
        // Just restarted: 7 and 8 have records and no membership.
        assert!(departures.update(ids(&[1, 2]), &recorded, start).is_empty());
        let almost = start + ORPHAN_RECORD_AGE - Duration::from_secs(1);
        assert!(departures
            .update(ids(&[1, 2]), &recorded, almost)
            .is_empty());
        // 8's add starts again just before the age: its clock restarts.
        departures.forget(NodeId(8));
        let aged = start + ORPHAN_RECORD_AGE;
        assert_eq!(
            departures.update(ids(&[1, 2]), &recorded, aged),
            vec![NodeId(7)]
        );
        // 7 joined after all: never named again for that stretch.
        assert!(departures
            .update(ids(&[1, 2, 7]), &recorded, aged + Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            departures.update(ids(&[1, 2, 7]), &recorded, aged + ORPHAN_RECORD_AGE),
            vec![NodeId(8)]
        );
        // A record written again (an add retried on another node) starts
        // its age over on every node, not only where the add ran.
        let later = aged + ORPHAN_RECORD_AGE;
        recorded.insert(NodeId(8), 500);
        assert!(departures
            .update(ids(&[1, 2, 7]), &recorded, later + Duration::from_secs(1))
            .is_empty());
        assert_eq!(
            departures.update(ids(&[1, 2, 7]), &recorded, later + ORPHAN_RECORD_AGE * 2),
            vec![NodeId(8)]
        );
    }

    fn membership(voters: &[u64], learners: &[u64], auto: &[u64]) -> Membership {
        Membership {
            voters: voters.iter().map(|id| NodeId(*id)).collect(),
            learners: learners.iter().map(|id| NodeId(*id)).collect(),
            auto_promote: auto.iter().map(|id| NodeId(*id)).collect(),
        }
    }

    #[test]
    fn table_groups_step_towards_the_metadata_membership() {
        let current = membership(&[1, 2, 3], &[], &[]);
        assert_eq!(next_change(&current, &current), None);
        let grown = membership(&[1, 2, 3, 4], &[], &[]);
        assert_eq!(
            next_change(&current, &grown),
            Some(ConfChange::AddLearner {
                node: NodeId(4),
                auto_promote: true
            })
        );
        // Being promoted by the leader: wait.
        assert_eq!(
            next_change(&membership(&[1, 2, 3], &[4], &[4]), &grown),
            None
        );
        // A plain learner that should vote: promote.
        assert_eq!(
            next_change(&membership(&[1, 2, 3], &[4], &[]), &grown),
            Some(ConfChange::Promote { node: NodeId(4) })
        );
        let demoted = membership(&[1, 2], &[3], &[]);
        assert_eq!(
            next_change(&current, &demoted),
            Some(ConfChange::Demote { node: NodeId(3) })
        );
        let shrunk = membership(&[1, 2], &[], &[]);
        assert_eq!(
            next_change(&current, &shrunk),
            Some(ConfChange::Remove { node: NodeId(3) })
        );
        // Additions before removals, so a replacement never drops below
        // the wanted size.
        let replaced = membership(&[1, 2, 4], &[], &[]);
        assert!(matches!(
            next_change(&current, &replaced),
            Some(ConfChange::AddLearner {
                node: NodeId(4),
                ..
            })
        ));
        // And no voter leaves while the new one is still a learner being
        // promoted: three voters stay until it votes, then 3 goes.
        assert_eq!(
            next_change(&membership(&[1, 2, 3], &[4], &[4]), &replaced),
            None
        );
        assert_eq!(
            next_change(&membership(&[1, 2, 3, 4], &[], &[]), &replaced),
            Some(ConfChange::Remove { node: NodeId(3) })
        );
        // A learner may still go meanwhile, and a demotion waits too.
        assert_eq!(
            next_change(
                &membership(&[1, 2, 3], &[4, 5], &[4]),
                &membership(&[1, 2, 3, 4], &[], &[])
            ),
            Some(ConfChange::Remove { node: NodeId(5) })
        );
        assert_eq!(
            next_change(
                &membership(&[1, 2, 3], &[4], &[4]),
                &membership(&[1, 2, 4], &[3], &[])
            ),
            None
        );
    }

    #[test]
    fn member_records_round_trip() {
        let addresses = MemberAddresses {
            raft_address: "127.0.0.1:5012".parse().expect("address"),
            client_url: "https://127.0.0.1:8443".into(),
        };
        let key = member_key(NodeId(42));
        assert_eq!(key, b"member/00000000000000000042");
        assert_eq!(
            decode_member(&key, &encode_addresses(&addresses)),
            Some((NodeId(42), addresses))
        );
        assert_eq!(decode_member(b"member/x", b"127.0.0.1:1\n"), None);
    }
}
