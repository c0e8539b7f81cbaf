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
    // A target with no order sorts ascending (etcdctl --sort-by=MODIFY).
    let by_modification_options = || {
        GetOptions::new()
            .with_from_key()
            .with_sort(etcd_client::SortTarget::Mod, etcd_client::SortOrder::None)
    };
    let by_modification = client
        .get("", Some(by_modification_options()))
        .await
        .expect("sorted");
    let order: Vec<&[u8]> = by_modification.kvs().iter().map(|kv| kv.key()).collect();
    assert_eq!(order, [b"b/1".as_slice(), b"b/2", b"a"]);
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

    // Ranges inside a transaction sort too.
    let sorted_in_txn = client
        .txn(Txn::new().and_then([TxnOp::get("", Some(by_modification_options()))]))
        .await
        .expect("txn");
    match &sorted_in_txn.op_responses()[0] {
        etcd_client::TxnOpResponse::Get(get) => {
            let order: Vec<&[u8]> = get.kvs().iter().map(|kv| kv.key()).collect();
            assert_eq!(order, [b"b/1".as_slice(), b"b/2", b"a"]);
        }
        other => panic!("{other:?}"),
    }

    // A branch writes each key once, as etcd requires.
    let (status, message) = code(
        client
            .txn(Txn::new().and_then([TxnOp::put("d", "1", None), TxnOp::put("d", "2", None)]))
            .await
            .expect_err("a key written twice"),
    );
    assert_eq!(status, Code::InvalidArgument, "{message}");
    assert!(message.contains("duplicate key"), "{message}");

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
    // As etcd: too many operations in one transaction is bad input.
    let (status, message) = code(
        client
            .txn(Txn::new().and_then(vec![TxnOp::put("many", "v", None); 1025]))
            .await
            .expect_err("too many operations"),
    );
    assert_eq!(status, Code::InvalidArgument, "{message}");
    assert!(
        message.contains("too many operations in txn request"),
        "{message}"
    );
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

/// Raw bytes as a gRPC message, to send what no generated client would.
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        bytes::BufMut::put_slice(dst, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let length = bytes::Buf::remaining(src);
        Ok(Some(bytes::Buf::copy_to_bytes(src, length).to_vec()))
    }
}

/// Sends `message` as is to `path`; the status the server answers.
async fn send_raw(regatta: &Regatta, path: &'static str, message: Vec<u8>) -> tonic::Status {
    let channel = tonic::transport::Endpoint::from_shared(regatta.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel)
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    grpc.ready().await.expect("ready");
    match grpc
        .unary(
            tonic::Request::new(message),
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
    {
        Ok(response) => tonic::Status::ok(format!("answered {:?}", response.into_inner())),
        Err(status) => status,
    }
}

/// A request that is not one valid message, or that is too large to be
/// read, gets a precise status on both APIs' KV calls, never INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_messages_get_precise_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regatta = Regatta::start(&dir.path().join("node"));
    let _ready = connect(&regatta).await;
    // A field tag with wire type 7, which protobuf does not define.
    let garbage = vec![0x0f, 0xff, 0xff];
    for path in [
        "/etcdserverpb.KV/Range",
        "/etcdserverpb.KV/Put",
        "/etcdserverpb.KV/DeleteRange",
        "/etcdserverpb.KV/Txn",
        "/regatta.v1.KV/Range",
        "/regatta.v1.KV/Put",
        "/regatta.v1.KV/DeleteRange",
        "/regatta.v1.KV/Txn",
    ] {
        let status = send_raw(&regatta, path, garbage.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{path}: {status:?}");
        assert!(
            status.message().contains("Request"),
            "{path}: the message names the type: {status:?}"
        );
    }
    // Past the message limit (4 MiB with the default key and value limits).
    let oversized = vec![0u8; 4 * 1024 * 1024 + 1];
    let status = send_raw(&regatta, "/etcdserverpb.KV/Put", oversized).await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("4194304 bytes"), "{status:?}");
    // An empty message is a valid (empty) PutRequest: Regatta's own check
    // of the key answers.
    let status = send_raw(&regatta, "/etcdserverpb.KV/Put", Vec::new()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("key"), "{status:?}");
    // The process still serves.
    let mut client = connect(&regatta).await;
    client.put("after", "ok", None).await.expect("put");
}
