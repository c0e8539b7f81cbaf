//! Checks of client input shared by both APIs: every refusal is a precise
//! `Error` (and so a gRPC status), never a panic.

use std::collections::BTreeSet;
use std::ops::Bound;

use regatta_kv::command::{Command, CompareResult, KeyRange, PutRequest, RequestOp, TxnRequest};

use crate::error::{Error, Result};
use crate::node::NodeConfig;

/// The largest `--kv.key-bytes-max`: the storage engine's key limit.
pub const KEY_BYTES_MAX_LIMIT: usize = 65_535;
/// The largest `--kv.value-bytes-max` (snapshots carry items of up to
/// 64 MiB).
pub const VALUE_BYTES_MAX_LIMIT: usize = 32 << 20;

/// The largest request message a node takes with key and value limits of
/// `key_bytes_max` and `value_bytes_max`: tonic's default (4 MiB), or more
/// when those limits need it.
pub fn request_bytes_max(key_bytes_max: usize, value_bytes_max: usize) -> usize {
    crate::fast_unary::request_bytes_max(key_bytes_max, value_bytes_max)
}

/// A key that must be there and within the limit.
pub fn key(config: &NodeConfig, key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("key must not be empty".into()));
    }
    if key.len() > config.key_bytes_max {
        return Err(Error::TooLarge(format!(
            "key of {} bytes is over the limit of {} bytes (--kv.key-bytes-max)",
            key.len(),
            config.key_bytes_max
        )));
    }
    Ok(())
}

/// A value within the limit.
pub fn value(config: &NodeConfig, value: &[u8]) -> Result<()> {
    if value.len() > config.value_bytes_max {
        return Err(Error::TooLarge(format!(
            "value of {} bytes is over the limit of {} bytes (--kv.value-bytes-max)",
            value.len(),
            config.value_bytes_max
        )));
    }
    Ok(())
}

/// A key and range end: etcd's rules (`KeyRange`), and never inverted.
pub fn range(config: &NodeConfig, key_bytes: &[u8], range_end: &[u8]) -> Result<KeyRange> {
    key(config, key_bytes)?;
    if range_end.len() > config.key_bytes_max {
        return Err(Error::TooLarge(format!(
            "range_end of {} bytes is over the limit of {} bytes (--kv.key-bytes-max)",
            range_end.len(),
            config.key_bytes_max
        )));
    }
    let open = range_end.is_empty() || range_end == [0];
    if !open && range_end <= key_bytes {
        return Err(Error::InvalidArgument(
            "range_end must be greater than key (or empty for one key, or \"\\0\" for every key from key on)".into(),
        ));
    }
    Ok(KeyRange {
        key: key_bytes.to_vec(),
        range_end: range_end.to_vec(),
    })
}

/// A limit: not negative.
pub fn limit(limit: i64) -> Result<u64> {
    u64::try_from(limit)
        .map_err(|_| Error::InvalidArgument(format!("limit must not be negative, got {limit}")))
}

/// A table name given as bytes.
pub fn table_name(table: &[u8]) -> Result<String> {
    if table.is_empty() {
        return Err(Error::InvalidArgument("table must not be empty".into()));
    }
    String::from_utf8(table.to_vec())
        .map_err(|_| Error::InvalidArgument("table must be UTF-8".into()))
}

/// Range filters this server does not apply.
pub fn no_revision_filters(
    min_mod: i64,
    max_mod: i64,
    min_create: i64,
    max_create: i64,
) -> Result<()> {
    if min_mod != 0 || max_mod != 0 || min_create != 0 || max_create != 0 {
        return Err(Error::InvalidArgument(
            "min/max_mod_revision and min/max_create_revision filters are not supported".into(),
        ));
    }
    Ok(())
}

/// Transactions nested deeper than this are refused.
pub const TXN_DEPTH_MAX: usize = 8;
/// Operations in one transaction branch, and compares, at most.
pub const TXN_OPS_MAX: usize = 1024;

/// The size of a transaction: depth and branch lengths.
pub fn txn_shape(depth: usize, compares: usize, success: usize, failure: usize) -> Result<()> {
    if depth > TXN_DEPTH_MAX {
        return Err(Error::InvalidArgument(format!(
            "transactions nest at most {TXN_DEPTH_MAX} deep"
        )));
    }
    // etcd answers too many operations with INVALID_ARGUMENT ("too many
    // operations in txn request").
    if compares > TXN_OPS_MAX || success > TXN_OPS_MAX || failure > TXN_OPS_MAX {
        return Err(Error::InvalidArgument(format!(
            "too many operations in txn request: a transaction holds at most {TXN_OPS_MAX} compares and {TXN_OPS_MAX} operations per branch"
        )));
    }
    Ok(())
}

/// Compares and operations in a whole transaction tree, nested ones
/// included, at most. Each branch may hold `TXN_OPS_MAX`, but nesting
/// multiplies them: without a total, a 4 MiB request could carry about
/// 400,000 operations.
pub const TXN_TREE_OPS_MAX: usize = 4096;
/// Ranges a transaction tree can run, at most (along the branches taken
/// together: each transaction runs one): each may read the whole table
/// into the response, so a small request could otherwise ask for
/// hundreds of copies of it. 128 is etcd's default limit of operations per
/// branch (`--max-txn-ops`), so every flat etcd transaction passes.
pub const TXN_TREE_RANGES_MAX: usize = 128;

/// The size of a whole transaction tree (`TXN_TREE_OPS_MAX`,
/// `TXN_TREE_RANGES_MAX`), both branches of every level counted.
pub fn txn_totals(txn: &TxnRequest) -> Result<()> {
    // Operations over the whole tree; ranges along the branches that can
    // run together (one branch per transaction runs, so the larger of the
    // two counts, as etcd's per-branch limit).
    fn count(txn: &TxnRequest, ops: &mut usize) -> usize {
        *ops += txn.compare.len();
        let branch_ranges = |branch: &[RequestOp], ops: &mut usize| -> usize {
            let mut ranges = 0;
            for op in branch {
                *ops += 1;
                match op {
                    RequestOp::Range(_) => ranges += 1,
                    RequestOp::Txn(inner) => ranges += count(inner, ops),
                    RequestOp::Put(_) | RequestOp::DeleteRange(_) => {}
                }
            }
            ranges
        };
        let success = branch_ranges(&txn.success, ops);
        let failure = branch_ranges(&txn.failure, ops);
        success.max(failure)
    }
    let mut ops = 0;
    let ranges = count(txn, &mut ops);
    if ops > TXN_TREE_OPS_MAX {
        return Err(Error::InvalidArgument(format!(
            "too many operations in txn request: {ops} compares and operations in all, nested transactions included; at most {TXN_TREE_OPS_MAX}"
        )));
    }
    if ranges > TXN_TREE_RANGES_MAX {
        return Err(Error::InvalidArgument(format!(
            "too many operations in txn request: {ranges} ranges in all, nested transactions included; at most {TXN_TREE_RANGES_MAX}"
        )));
    }
    Ok(())
}

/// A write that arrives already built, as a follower cluster forwards it:
/// the checks the APIs make while building one (`key`, `value`, `range`,
/// `txn_shape`), so that it is refused as the same request would be from
/// a client. Only Put, DeleteRange and Txn are client writes.
pub fn command(config: &NodeConfig, command: &Command) -> Result<()> {
    match command {
        Command::Put(put) => put_request(config, put),
        Command::DeleteRange(delete) => {
            range(config, &delete.range.key, &delete.range.range_end).map(|_| ())
        }
        Command::Txn(txn) => {
            txn_request(config, txn, 0)?;
            txn_totals(txn)?;
            txn_writes_each_key_once(txn)
        }
        Command::Replicated(_)
        | Command::RestoreBegin { .. }
        | Command::RestoreChunk { .. }
        | Command::RestoreCommit { .. }
        | Command::RestoreAbort { .. } => Err(Error::InvalidArgument(
            "only Put, DeleteRange and Txn are client writes".into(),
        )),
    }
}

fn put_request(config: &NodeConfig, put: &PutRequest) -> Result<()> {
    key(config, &put.key)?;
    value(config, &put.value)
}

fn txn_request(config: &NodeConfig, txn: &TxnRequest, depth: usize) -> Result<()> {
    txn_shape(
        depth,
        txn.compare.len(),
        txn.success.len(),
        txn.failure.len(),
    )?;
    for compare in &txn.compare {
        range(config, &compare.range.key, &compare.range.range_end)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            RequestOp::Range(read) => {
                range(config, &read.range.key, &read.range.range_end)?;
            }
            RequestOp::Put(put) => put_request(config, put)?,
            RequestOp::DeleteRange(delete) => {
                range(config, &delete.range.key, &delete.range.range_end)?;
            }
            RequestOp::Txn(inner) => txn_request(config, inner, depth + 1)?,
        }
    }
    Ok(())
}

/// etcd's rule for the writes of a transaction: each branch, with the
/// transactions nested in it, writes a key at most once. A put may not
/// repeat a put of the branch, nor fall in a range the branch deletes,
/// nested transactions included; the two branches of one nested
/// transaction may put the same key (only one of them runs), and deletes
/// may overlap. etcd answers INVALID_ARGUMENT, "duplicate key given in txn
/// request". As in etcd 3.4, a delete from a key on (`range_end` "\0")
/// is not counted: etcd's interval check never matches it.
///
/// Sorted sets keep the check at O(n log n) in the operations of the
/// whole tree, which only the request size bounds.
pub fn txn_writes_each_key_once(txn: &TxnRequest) -> Result<()> {
    branch_writes(&txn.success)?;
    branch_writes(&txn.failure)?;
    Ok(())
}

/// The ranges a branch deletes, merged into disjoint ones: start → end
/// (exclusive).
#[derive(Default)]
struct DeletedRanges(std::collections::BTreeMap<Vec<u8>, Vec<u8>>);

impl DeletedRanges {
    /// Adds `[start, end)`, merging it with every range it touches.
    fn insert(&mut self, mut start: Vec<u8>, mut end: Vec<u8>) {
        let before = self
            .0
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start.as_slice())))
            .next_back()
            .map(|(s, e)| (s.clone(), e.clone()));
        if let Some((before_start, before_end)) = before {
            if before_end >= start {
                self.0.remove(&before_start);
                start = before_start;
                end = end.max(before_end);
            }
        }
        loop {
            let next = self
                .0
                .range::<[u8], _>((Bound::Included(start.as_slice()), Bound::Unbounded))
                .next()
                .map(|(s, e)| (s.clone(), e.clone()));
            let Some((next_start, next_end)) = next else {
                break;
            };
            if next_start > end {
                break;
            }
            self.0.remove(&next_start);
            end = end.max(next_end);
        }
        self.0.insert(start, end);
    }

    fn contains(&self, key: &[u8]) -> bool {
        self.0
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .is_some_and(|(_, end)| key < end.as_slice())
    }

    fn extend(&mut self, other: DeletedRanges) {
        for (start, end) in other.0 {
            self.insert(start, end);
        }
    }
}

/// What one branch writes: the keys it puts and the ranges it deletes,
/// nested transactions included.
type BranchWrites = (BTreeSet<Vec<u8>>, DeletedRanges);

fn branch_writes(ops: &[RequestOp]) -> Result<BranchWrites> {
    let duplicate = || {
        Error::InvalidArgument(
            "etcdserver: duplicate key given in txn request (a transaction branch writes each key at most once)"
                .into(),
        )
    };
    let mut deletes = DeletedRanges::default();
    for op in ops {
        let RequestOp::DeleteRange(delete) = op else {
            continue;
        };
        let range = &delete.range;
        match range.range_end.as_slice() {
            [] => {
                let mut end = range.key.clone();
                end.push(0);
                deletes.insert(range.key.clone(), end);
            }
            // From a key on: etcd 3.4's check never matches it.
            [0] => {}
            end => deletes.insert(range.key.clone(), end.to_vec()),
        }
    }
    let mut puts = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(inner) = op else {
            continue;
        };
        let (then_puts, then_deletes) = branch_writes(&inner.success)?;
        let (else_puts, else_deletes) = branch_writes(&inner.failure)?;
        for key in &then_puts {
            if puts.contains(key) || deletes.contains(key) {
                return Err(duplicate());
            }
        }
        for key in &else_puts {
            let repeated = puts.contains(key) && !then_puts.contains(key);
            if repeated || deletes.contains(key) {
                return Err(duplicate());
            }
        }
        puts.extend(then_puts);
        puts.extend(else_puts);
        deletes.extend(then_deletes);
        deletes.extend(else_deletes);
    }
    for op in ops {
        let RequestOp::Put(put) = op else {
            continue;
        };
        if puts.contains(&put.key) || deletes.contains(&put.key) {
            return Err(duplicate());
        }
        puts.insert(put.key.clone());
    }
    Ok((puts, deletes))
}

/// A compare's relation. Both APIs number it alike: EQUAL 0, GREATER 1,
/// LESS 2, NOT_EQUAL 3.
pub fn compare_result(value: i32) -> Result<CompareResult> {
    match value {
        0 => Ok(CompareResult::Equal),
        1 => Ok(CompareResult::Greater),
        2 => Ok(CompareResult::Less),
        3 => Ok(CompareResult::NotEqual),
        other => Err(Error::InvalidArgument(format!(
            "unknown compare result {other}"
        ))),
    }
}

/// A Raft peer address: `host:port` (an IP address or a host name, which
/// peers resolve each time they dial), or such a URL (`http://…`, as
/// etcd's peer URLs are).
pub fn peer_address(text: &str) -> Result<regatta_multiraft::PeerAddress> {
    let trimmed = text.trim();
    let bare = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .unwrap_or(trimmed)
        .trim_end_matches('/');
    bare.parse().map_err(|error| {
        Error::InvalidArgument(format!(
            "not a peer address: {error} (e.g. 127.0.0.1:5014 or node4.example:5014)"
        ))
    })
}

/// A member id: non-zero.
pub fn member_id(id: u64) -> Result<regatta_raft::NodeId> {
    if id == 0 {
        return Err(Error::InvalidArgument(
            "a member id must be non-zero".into(),
        ));
    }
    Ok(regatta_raft::NodeId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_take_names_ips_and_urls() {
        for (text, expected) in [
            ("10.0.0.4:5014", "10.0.0.4:5014"),
            ("http://10.0.0.4:5014/", "10.0.0.4:5014"),
            ("https://Node4.Example:5014", "node4.example:5014"),
            (" [::1]:5014 ", "[::1]:5014"),
        ] {
            let address = peer_address(text).expect(text);
            assert_eq!(address.to_string(), expected);
        }
        for (text, says) in [
            ("node4", "no port"),
            ("node4:0", "must not be 0"),
            ("http://node 4:5014", "may not appear"),
            ("", "no port"),
        ] {
            match peer_address(text) {
                Err(Error::InvalidArgument(message)) => {
                    assert!(message.contains(says), "{text:?}: {message}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }
}

#[cfg(test)]
mod txn_write_tests {
    use super::*;
    use regatta_kv::command::{DeleteRangeRequest, RangeRequest};

    fn put(key: &str) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
            prev_kv: false,
        })
    }

    fn delete(key: &str, range_end: &[u8]) -> RequestOp {
        RequestOp::DeleteRange(DeleteRangeRequest {
            range: KeyRange {
                key: key.into(),
                range_end: range_end.to_vec(),
            },
            prev_kv: false,
        })
    }

    fn nested(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> RequestOp {
        RequestOp::Txn(TxnRequest {
            compare: vec![],
            success,
            failure,
        })
    }

    fn check(success: Vec<RequestOp>) -> Result<()> {
        txn_writes_each_key_once(&TxnRequest {
            compare: vec![],
            success,
            failure: vec![],
        })
    }

    #[test]
    fn a_branch_writes_each_key_once() {
        let refused = |ops: Vec<RequestOp>, case: &str| match check(ops) {
            Err(Error::InvalidArgument(message)) => {
                assert!(message.contains("duplicate key"), "{case}: {message}")
            }
            other => panic!("{case}: {other:?}"),
        };
        refused(vec![put("a"), put("a")], "two puts");
        refused(vec![put("a"), delete("a", b"")], "a put and a delete");
        refused(
            vec![delete("a", b"c"), put("b")],
            "a put in a deleted range",
        );
        refused(
            vec![nested(vec![put("a")], vec![]), put("a")],
            "nested, then outer",
        );
        refused(
            vec![delete("a", b""), nested(vec![put("a")], vec![])],
            "outer delete",
        );
        refused(
            vec![nested(vec![delete("a", b"")], vec![]), put("a")],
            "nested delete",
        );
        refused(
            vec![
                nested(vec![put("a")], vec![]),
                nested(vec![], vec![put("a")]),
            ],
            "two nested transactions",
        );

        for (ops, case) in [
            (vec![put("a"), put("b")], "two keys"),
            (
                vec![delete("a", b"c"), delete("b", b"d")],
                "overlapping deletes",
            ),
            (vec![delete("a", b"c"), put("c")], "the end is exclusive"),
            (
                vec![delete("a", &[0]), put("z")],
                "a from-key delete, which etcd 3.4 does not count",
            ),
            (
                vec![nested(vec![put("a")], vec![put("a")])],
                "the two branches of one txn",
            ),
            (
                vec![nested(vec![delete("a", b"")], vec![put("a")])],
                "a delete and a put in the two branches",
            ),
        ] {
            assert!(check(ops).is_ok(), "{case}");
        }
        refused(
            vec![
                delete("a", b"c"),
                delete("e", b"g"),
                delete("b", b"f"),
                put("f"),
            ],
            "a put in merged delete ranges",
        );
        refused(
            vec![delete("m", b""), delete("a", b"b"), put("m")],
            "a put of a deleted key",
        );
        assert!(check(vec![delete("a", b"c"), delete("e", b"g"), put("d")]).is_ok());
        // Each branch of the top transaction on its own.
        assert!(txn_writes_each_key_once(&TxnRequest {
            compare: vec![],
            success: vec![put("a")],
            failure: vec![put("a")],
        })
        .is_ok());
    }

    /// Nesting cannot multiply a transaction past its totals: operations
    /// and ranges are counted over the whole tree.
    #[test]
    fn a_transaction_tree_is_counted_whole() {
        let range = || {
            RequestOp::Range(RangeRequest {
                range: KeyRange {
                    key: vec![0],
                    range_end: vec![0],
                },
                ..RangeRequest::default()
            })
        };
        let flat = TxnRequest {
            success: (0..TXN_TREE_RANGES_MAX).map(|_| range()).collect(),
            ..TxnRequest::default()
        };
        txn_totals(&flat).expect("etcd's default limit passes");
        let both = TxnRequest {
            failure: flat.success.clone(),
            ..flat.clone()
        };
        txn_totals(&both).expect("one branch runs: both may hold the limit");
        let nested = TxnRequest {
            success: vec![RequestOp::Txn(flat.clone()), RequestOp::Txn(flat)],
            ..TxnRequest::default()
        };
        let error = txn_totals(&nested).expect_err("twice the ranges");
        assert!(error.to_string().contains("ranges in all"), "{error}");
        let puts = TxnRequest {
            failure: (0..=TXN_TREE_OPS_MAX)
                .map(|_| RequestOp::Put(PutRequest::default()))
                .collect(),
            ..TxnRequest::default()
        };
        let error = txn_totals(&puts).expect_err("too many");
        assert!(error.to_string().contains("in all"), "{error}");
    }
}
