//! Regatta's own API (`regatta.v1`) against a real `regatta` process:
//! tables created and deleted at runtime, KV on them, paged iteration,
//! and precise errors.

mod common;

use std::time::{Duration, Instant};

use common::{connect, Regatta};
use regatta_server::proto::mvcc::v1 as mvcc;
use regatta_server::proto::regatta::v1 as pb;
use tonic::Code;

async fn clients(
    regatta: &Regatta,
) -> (
    pb::kv_client::KvClient<tonic::transport::Channel>,
    pb::tables_client::TablesClient<tonic::transport::Channel>,
    pb::cluster_client::ClusterClient<tonic::transport::Channel>,
) {
    drop(connect(regatta).await);
    let channel = tonic::transport::Endpoint::from_shared(regatta.endpoint())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    (
        pb::kv_client::KvClient::new(channel.clone()).max_decoding_message_size(64 << 20),
        pb::tables_client::TablesClient::new(channel.clone()),
        pb::cluster_client::ClusterClient::new(channel),
    )
}

fn put(table: &str, key: &str, value: Vec<u8>) -> pb::PutRequest {
    pb::PutRequest {
        table: table.into(),
        key: key.into(),
        value,
        prev_kv: false,
    }
}

/// Writes to a new table until its group has a leader.
async fn put_when_ready(
    kv: &mut pb::kv_client::KvClient<tonic::transport::Channel>,
    request: pb::PutRequest,
) -> pb::PutResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kv.put(request.clone()).await {
            Ok(response) => return response.into_inner(),
            Err(status) if Instant::now() < deadline => {
                assert!(
                    matches!(status.code(), Code::NotFound | Code::Unavailable),
                    "{status:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(status) => panic!("the new table never took a write: {status:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_kv_and_paged_iteration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regatta = Regatta::start(&dir.path().join("node"));
    let (mut kv, mut tables, mut cluster) = clients(&regatta).await;

    let listed = tables
        .list(pb::ListTablesRequest {})
        .await
        .expect("list")
        .into_inner();
    let names: Vec<&str> = listed.tables.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["etcd"], "the etcd table exists from bootstrap");

    let created = tables
        .create(pb::CreateTableRequest {
            name: "users".into(),
            config: None,
        })
        .await
        .expect("create")
        .into_inner();
    assert!(!created.id.is_empty());
    let again = tables
        .create(pb::CreateTableRequest {
            name: "users".into(),
            config: None,
        })
        .await
        .expect_err("exists");
    assert_eq!(again.code(), Code::AlreadyExists);
    let bad = tables
        .create(pb::CreateTableRequest {
            name: "no spaces".into(),
            config: None,
        })
        .await
        .expect_err("bad name");
    assert_eq!(bad.code(), Code::InvalidArgument);

    let first = put_when_ready(&mut kv, put("users", "alice", b"1".to_vec())).await;
    let header = first.header.expect("header");
    assert_eq!(header.replica_id, 1);
    assert!(header.revision > 0 && header.shard_id > 1);

    // Six values of 1 MiB: more than one 4 MiB page.
    for i in 0..6 {
        kv.put(put("users", &format!("big/{i}"), vec![b'x'; 1 << 20]))
            .await
            .expect("put big");
    }
    let range = |key: &str, range_end: &[u8]| pb::RangeRequest {
        table: "users".into(),
        key: key.into(),
        range_end: range_end.to_vec(),
        linearizable: true,
        ..pb::RangeRequest::default()
    };
    let single = kv
        .range(range("big/", b"big0"))
        .await
        .expect("range")
        .into_inner();
    assert!(single.more, "one response is capped");
    assert_eq!(single.count, 6);
    assert!(single.kvs.len() < 6);
    let mut pages = kv
        .iterate_range(range("big/", b"big0"))
        .await
        .expect("iterate")
        .into_inner();
    let mut keys = Vec::new();
    let mut page_count = 0;
    while let Some(page) = pages.message().await.expect("page") {
        page_count += 1;
        // The first page counts the range, as Range does; the next ones
        // count their own keys (reading them scans the range once).
        let expected_count = if page_count == 1 {
            6
        } else {
            page.kvs.len() as i64
        };
        assert_eq!(page.count, expected_count, "page {page_count}");
        keys.extend(page.kvs.into_iter().map(|kv| kv.key));
    }
    assert!(page_count >= 2, "{page_count} pages");
    assert_eq!(keys.len(), 6);
    assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));

    // A transaction on the value.
    let txn = pb::TxnRequest {
        table: "users".into(),
        compare: vec![mvcc::Compare {
            result: mvcc::compare::CompareResult::Equal as i32,
            target: mvcc::compare::CompareTarget::Value as i32,
            key: b"alice".to_vec(),
            range_end: Vec::new(),
            target_union: Some(mvcc::compare::TargetUnion::Value(b"1".to_vec())),
        }],
        success: vec![mvcc::RequestOp {
            request: Some(mvcc::request_op::Request::RequestPut(
                mvcc::request_op::Put {
                    key: b"alice".to_vec(),
                    value: b"2".to_vec(),
                    prev_kv: true,
                },
            )),
        }],
        failure: vec![],
    };
    let response = kv.txn(txn).await.expect("txn").into_inner();
    assert!(response.succeeded);

    // Errors.
    let missing = kv
        .range(pb::RangeRequest {
            table: "nope".into(),
            key: b"a".to_vec(),
            ..pb::RangeRequest::default()
        })
        .await
        .expect_err("unknown table");
    assert_eq!(missing.code(), Code::NotFound);
    let inverted = kv.range(range("z", b"a")).await.expect_err("inverted");
    assert_eq!(inverted.code(), Code::InvalidArgument);
    let empty = kv
        .put(put("users", "", b"v".to_vec()))
        .await
        .expect_err("empty key");
    assert_eq!(empty.code(), Code::InvalidArgument);

    let status = cluster
        .status(pb::StatusRequest { config: false })
        .await
        .expect("status")
        .into_inner();
    assert!(status.tables.contains_key("users"), "{status:?}");
    assert_eq!(status.tables["users"].leader, "1");
    let members = cluster
        .member_list(pb::MemberListRequest {})
        .await
        .expect("members")
        .into_inner();
    assert_eq!(members.members.len(), 1);

    // Deleting the table removes it everywhere.
    tables
        .delete(pb::DeleteTableRequest {
            name: "users".into(),
        })
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kv.range(range("alice", b"")).await {
            Err(status) if status.code() == Code::NotFound => break,
            other => {
                assert!(Instant::now() < deadline, "still served: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Its data is gone from disk too: no partition of its group is left.
    let partitions = regatta.dir.join("tables").join("partitions");
    let prefix = format!("t-{}-", created.id);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = std::fs::read_dir(&partitions)
            .expect("partitions")
            .filter_map(|entry| entry.ok())
            .map(|entry| entry.file_name().to_string_lossy().to_string())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left on disk: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let gone = tables
        .delete(pb::DeleteTableRequest {
            name: "users".into(),
        })
        .await
        .expect_err("gone");
    assert_eq!(gone.code(), Code::NotFound);
}

/// One call over raw HTTP/2: its `grpc-status`, `grpc-message` and
/// `grpc-accept-encoding`, from the headers of a trailers-only answer or
/// from the trailers.
async fn raw_call(
    sender: &mut h2::client::SendRequest<bytes::Bytes>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (String, String, String) {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://regatta{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(()).expect("request");
    let ready = sender.clone().ready().await.expect("ready");
    *sender = ready;
    let (response, mut stream) = sender.send_request(request, body.is_empty()).expect("send");
    if !body.is_empty() {
        stream
            .send_data(bytes::Bytes::copy_from_slice(body), true)
            .expect("body");
    }
    let response = response.await.expect("response");
    let field = |map: &http::HeaderMap, name: &str| {
        map.get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let headers = response.headers().clone();
    if headers.contains_key("grpc-status") {
        return (
            field(&headers, "grpc-status"),
            field(&headers, "grpc-message"),
            field(&headers, "grpc-accept-encoding"),
        );
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    (
        field(&trailers, "grpc-status"),
        field(&trailers, "grpc-message"),
        field(&headers, "grpc-accept-encoding"),
    )
}

/// Requests that are not well-formed gRPC calls get client errors, never
/// INTERNAL, on every service: a message tonic cannot decode (the
/// services it serves answered INTERNAL), a request without a message, a
/// method other than POST (tonic served it as a call), and a compressed
/// request, which is told the one encoding accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_grpc_calls_get_client_errors_not_internal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let regatta = Regatta::start(&dir.path().join("node"));
    let _serving = connect(&regatta).await;
    let tcp = tokio::net::TcpStream::connect(regatta.api)
        .await
        .expect("connect");
    let (mut sender, connection) = h2::client::handshake(tcp).await.expect("http/2");
    tokio::spawn(connection);
    let garbage = [0u8, 0, 0, 0, 2, 0xff, 0xff];

    let (status, message, _) = raw_call(
        &mut sender,
        http::Method::POST,
        "/regatta.v1.Tables/List",
        &[],
        &garbage,
    )
    .await;
    assert_eq!(status, "3", "an undecodable message to tonic: {message}");
    let (status, message, _) = raw_call(
        &mut sender,
        http::Method::POST,
        "/regatta.v1.Tables/List",
        &[],
        &[],
    )
    .await;
    assert_eq!(status, "3", "no message: {message}");
    for path in ["/etcdserverpb.KV/Put", "/regatta.v1.Tables/List"] {
        let (status, message, _) =
            raw_call(&mut sender, http::Method::GET, path, &[], &garbage).await;
        assert_eq!(status, "3", "GET {path}: {message}");
        assert!(message.contains("POST"), "{message}");
    }
    let (status, message, accepted) = raw_call(
        &mut sender,
        http::Method::POST,
        "/etcdserverpb.KV/Put",
        &[("grpc-encoding", "gzip")],
        &[1, 0, 0, 0, 2, 0x1f, 0x8b],
    )
    .await;
    assert_eq!(status, "12", "compressed: {message}");
    assert_eq!(accepted, "identity");
    // The short path still serves a well-formed call.
    let put = {
        use prost::Message;
        regatta_server::proto::etcdserverpb::PutRequest {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            ..Default::default()
        }
        .encode_to_vec()
    };
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(put.len() as u32).to_be_bytes());
    framed.extend_from_slice(&put);
    let (status, message, _) = raw_call(
        &mut sender,
        http::Method::POST,
        "/etcdserverpb.KV/Put",
        &[],
        &framed,
    )
    .await;
    assert_eq!(status, "0", "{message}");
}
