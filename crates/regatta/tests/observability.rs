//! `--rest.address`: `/metrics` in Prometheus text with the tables' Raft
//! state and the WAL's counters, and `/healthz`, which answers 503 with a
//! reason once a node is cut off from its cluster's majority.

mod common;

use common::{connect, free_address, http_get, members, wait_for_http, Regatta};

/// The value of the sample `name` (with its labels, as printed).
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_of_a_single_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rest = free_address();
    let rest_flag = rest.to_string();
    let node = Regatta::start_on(
        &dir.path().join("node"),
        free_address(),
        free_address(),
        &["--rest.address", &rest_flag],
    );
    let mut client = connect(&node).await;
    for i in 0..10 {
        client.put(format!("k{i}"), "v", None).await.expect("put");
    }
    assert_eq!(wait_for_http(rest, "/healthz", 200), "ok\n");
    let metrics = wait_for_http(rest, "/metrics", 200);
    assert_eq!(sample(&metrics, "regatta_healthy"), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, r#"regatta_table_is_leader{table="etcd"}"#),
        Some(1.0),
        "{metrics}"
    );
    let applied = sample(&metrics, r#"regatta_table_applied_index{table="etcd"}"#)
        .expect("the etcd table's applied index");
    assert!(applied >= 10.0, "{metrics}");
    assert!(
        sample(&metrics, "regatta_wal_fsyncs_total").expect("fsyncs") > 0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("# HELP regatta_wal_size_bytes"),
        "{metrics}"
    );
    // The ten puts sit in the storage engine's memtables, and its journal
    // holds them.
    assert!(
        sample(&metrics, "regatta_table_store_write_buffer_bytes").expect("write buffer") > 0.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, "regatta_table_store_journals").expect("journals") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "regatta_table_store_write_buffer_limit_bytes"),
        Some((64u64 << 20) as f64),
        "{metrics}"
    );
    for name in [
        "regatta_wal_cache_hits_total",
        "regatta_wal_cache_misses_total",
        // A single node has no peers, but every kind is listed.
        r#"regatta_peer_messages_sent_by_kind_total{kind="append"}"#,
        r#"regatta_peer_messages_sent_by_kind_total{kind="read_index"}"#,
    ] {
        assert!(sample(&metrics, name).is_some(), "{name} in {metrics}");
    }
    // The fsync latency histogram counts every fsync.
    let fsyncs = sample(&metrics, "regatta_wal_fsyncs_total").expect("fsyncs");
    assert_eq!(
        sample(&metrics, r#"regatta_wal_fsync_seconds_bucket{le="+Inf"}"#),
        Some(fsyncs),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "regatta_wal_failed"),
        Some(0.0),
        "{metrics}"
    );
    // Per-method gRPC calls (the ten puts above, and a refused one), with
    // latency; Raft events and apply lag per table.
    let _ = client.put("", "v", None).await.expect_err("an empty key");
    let metrics = wait_for_http(rest, "/metrics", 200);
    let puts = sample(
        &metrics,
        r#"regatta_grpc_calls_total{method="/etcdserverpb.KV/Put",code="OK"}"#,
    )
    .expect("Put calls");
    assert!(puts >= 10.0, "{metrics}");
    assert_eq!(
        sample(
            &metrics,
            r#"regatta_grpc_calls_total{method="/etcdserverpb.KV/Put",code="INVALID_ARGUMENT"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            r#"regatta_grpc_latency_seconds_count{method="/etcdserverpb.KV/Put"}"#
        )
        .expect("Put latency")
            >= 11.0,
        "{metrics}"
    );
    assert!(
        sample(&metrics, r#"regatta_table_apply_lag_entries{table="etcd"}"#).is_some(),
        "{metrics}"
    );
    assert!(
        sample(&metrics, r#"regatta_table_log_size_bytes{table="etcd"}"#).expect("log size") > 0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("regatta_table_leader_changes_total{table=\"etcd\"}"),
        "{metrics}"
    );
    // The ten puts were proposed by this node, and none failed.
    assert!(
        sample(&metrics, r#"regatta_table_proposals_total{table="etcd"}"#).expect("proposals")
            >= 10.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            r#"regatta_table_proposals_failed_total{table="etcd"}"#
        ),
        Some(0.0),
        "{metrics}"
    );
    let (status, body) = http_get(rest, "/nothing").expect("an answer");
    assert_eq!(status, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_turns_unavailable_when_the_majority_is_gone() {
    let root = tempfile::tempdir().expect("tempdir");
    let rafts: Vec<_> = (0..3).map(|_| free_address()).collect();
    let members = members(&rafts);
    let rests: Vec<_> = (0..3).map(|_| free_address()).collect();
    let mut nodes: Vec<Regatta> = (1..=3u64)
        .map(|id| {
            let rest = rests[id as usize - 1].to_string();
            Regatta::start_member(
                &root.path().join(format!("node{id}")),
                id,
                free_address(),
                rafts[id as usize - 1],
                &members,
                &["--rest.address", &rest],
            )
        })
        .collect();
    drop(connect(&nodes[0]).await);
    for rest in &rests {
        wait_for_http(*rest, "/healthz", 200);
    }
    nodes[1].kill();
    nodes[2].kill();
    let reason = wait_for_http(rests[0], "/healthz", 503);
    assert!(reason.contains("no leader known"), "{reason}");
    let metrics = wait_for_http(rests[0], "/metrics", 200);
    assert_eq!(sample(&metrics, "regatta_healthy"), Some(0.0), "{metrics}");
}
