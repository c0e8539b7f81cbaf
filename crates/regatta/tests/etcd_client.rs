//! The `etcd-client` crate, unmodified, against a real `regatta` process:
//! KV semantics, transactions with every compare target, and precise
//! errors for bad input and for what Regatta does not implement.

mod common;

use common::{connect, Regatta};
use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use tonic::Code;

fn code(error: etcd_client::Error) -> (Code, String) {
    match error {
        etcd_client::Error::GRpcStatus(status) => (status.code(), status.message().to_string()),
        other => panic!("a gRPC status, not {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_client_reads_writes_and_transacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regatta = Regatta::start(&dir.path().join("node"));
    let mut client = connect(&regatta).await;

    let first = client.put("a", "1", None).await.expect("put");
    let revision = first.header().expect("header").revision();
    assert!(revision > 0);
    client.put("b/1", "x", None).await.expect("put");
    client.put("b/2", "y", None).await.expect("put");
    let previous = client
        .put("a", "2", Some(PutOptions::new().with_prev_key()))
        .await
        .expect("put");
    assert_eq!(previous.prev_key().expect("prev").value(), b"1");

    let a = client.get("a", None).await.expect("get");
    let kv = &a.kvs()[0];
    assert_eq!((kv.value(), kv.version()), (b"2".as_slice(), 2));
    assert_eq!(kv.create_revision(), revision);
    assert_eq!(kv.mod_revision(), a.header().expect("header").revision());

    let prefix = client
        .get("b/", Some(GetOptions::new().with_prefix()))
        .await
        .expect("prefix");
    assert_eq!(prefix.count(), 2);
    let limited = client
        .get("", Some(GetOptions::new().with_from_key().with_limit(1)))
        .await
        .expect("from key");
    assert_eq!(
        (limited.kvs().len(), limited.count(), limited.more()),
        (1, 3, true)
    );
    let counted = client
        .get(
            "b/",
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .expect("count");
    assert_eq!((counted.count(), counted.kvs().len()), (2, 0));
    let keys = client
        .get("b/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await
        .expect("keys");
    assert!(keys.kvs().iter().all(|kv| kv.value().is_empty()));
    let serializable = client
        .get("a", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable");
    assert_eq!(serializable.kvs()[0].value(), b"2");
    let descending = client
        .get(
            "b/",
            Some(GetOptions::new().with_prefix().with_sort(
                etcd_client::SortTarget::Key,
                etcd_client::SortOrder::Descend,
            )),
        )
        .await
        .expect("sorted");
    assert_eq!(descending.kvs()[0].key(), b"b/2");
    let current = descending.header().expect("header").revision();
    client
        .get("a", Some(GetOptions::new().with_revision(current)))
        .await
        .expect("the current revision is served");

    // Transactions: value, version, create and mod compares.
    let a_kv = client.get("a", None).await.expect("get").kvs()[0].clone();
    let txn = Txn::new()
        .when([
            Compare::value("a", CompareOp::Equal, "2"),
            Compare::version("a", CompareOp::Equal, 2),
            Compare::create_revision("a", CompareOp::Equal, a_kv.create_revision()),
            Compare::mod_revision("a", CompareOp::Less, a_kv.mod_revision() + 1),
            Compare::version("missing", CompareOp::Equal, 0),
        ])
        .and_then([TxnOp::put("a", "3", None), TxnOp::get("a", None)])
        .or_else([TxnOp::put("a", "wrong", None)]);
    let response = client.txn(txn).await.expect("txn");
    assert!(response.succeeded());
    let failed = client
        .txn(
            Txn::new()
                .when([Compare::value("missing", CompareOp::Equal, "")])
                .or_else([TxnOp::get("a", None)]),
        )
        .await
        .expect("txn");
    assert!(!failed.succeeded(), "a missing key fails a value compare");
    assert_eq!(
        client.get("a", None).await.expect("get").kvs()[0].value(),
        b"3"
    );

    let deleted = client
        .delete(
            "b/",
            Some(DeleteOptions::new().with_prefix().with_prev_key()),
        )
        .await
        .expect("delete");
    assert_eq!((deleted.deleted(), deleted.prev_kvs().len()), (2, 2));

    // Bad input: precise statuses.
    let (status, message) = code(client.put("", "v", None).await.expect_err("empty key"));
    assert_eq!(status, Code::InvalidArgument, "{message}");
    let (status, message) = code(
        client
            .put("big", vec![0u8; 2 * 1024 * 1024 + 1], None)
            .await
            .expect_err("value too large"),
    );
    assert_eq!(status, Code::ResourceExhausted, "{message}");
    assert!(message.contains("kv.value-bytes-max"), "{message}");
    let (status, message) = code(
        client
            .put(vec![b'k'; 1025], "v", None)
            .await
            .expect_err("key too large"),
    );
    assert_eq!(status, Code::ResourceExhausted, "{message}");
    let (status, _) = code(
        client
            .get("z", Some(GetOptions::new().with_range("a")))
            .await
            .expect_err("inverted"),
    );
    assert_eq!(status, Code::InvalidArgument);
    let (status, message) = code(
        client
            .get("a", Some(GetOptions::new().with_revision(1)))
            .await
            .expect_err("compacted"),
    );
    assert_eq!(status, Code::OutOfRange, "{message}");
    let (status, _) = code(
        client
            .get("a", Some(GetOptions::new().with_revision(1_000_000)))
            .await
            .expect_err("future"),
    );
    assert_eq!(status, Code::OutOfRange);
    let (status, message) = code(client.lease_grant(10, None).await.expect_err("lease"));
    assert_eq!(status, Code::Unimplemented);
    assert!(message.contains("Lease"), "{message}");

    let status = client.status().await.expect("status");
    assert_eq!(status.leader(), 1);
    assert!(status.raft_index() >= status.raft_applied_index() || status.raft_applied_index() > 0);
    let members = client.member_list().await.expect("members");
    assert_eq!(members.members().len(), 1);
}
