//! The operator's HTTP endpoint (`--rest.address`):
//!
//! - `/metrics`: Prometheus text, built at each scrape from the node's
//!   live state (tables' Raft state, replication lag on a follower, the
//!   WAL and peer transport counters, quiesced groups);
//! - `/healthz`: 200 `ok` only when the node serves: its catalogue is
//!   loaded and every group it hosts runs and knows a leader; otherwise
//!   503 with the reason.
//!
//! Metric names are in `docs/observability.md`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use regatta_wal::GroupId;

use crate::node::{ClusterRole, Node, META_GROUP};

/// Serves `/metrics` and `/healthz` for `node` on `listener` until
/// `shutdown` resolves; over TLS only when `tls` is set.
pub async fn serve_rest(
    node: Arc<Node>,
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return Ok(()),
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "the REST listener could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = Arc::clone(&node);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let node = Arc::clone(&node);
                async move { Ok::<_, Infallible>(answer(&node, request).await) }
            });
            let http = hyper::server::conn::http1::Builder::new();
            let Some(acceptor) = acceptor else {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = http.serve_connection(io, service).await;
                return;
            };
            if let Some(stream) = crate::tls::handshake(&acceptor, stream, "rest", remote).await {
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = http.serve_connection(io, service).await;
            }
        });
    }
}

async fn answer<B>(node: &Node, request: Request<B>) -> Response<Full<Bytes>> {
    if request.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => match metrics(node).await {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            Err(error) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the metrics: {error}\n"),
            ),
        },
        "/healthz" => match health(node).await {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        other => text(
            StatusCode::NOT_FOUND,
            format!("{other}: not found; try /metrics or /healthz\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

/// One hosted group: its table's name (`None` for the catalogue), id and
/// Raft status, read once per request.
struct GroupState {
    table: Option<String>,
    group: GroupId,
    status: Result<regatta_raft::Status, regatta_multiraft::Error>,
}

async fn group_states(node: &Node) -> Vec<GroupState> {
    let mut groups = vec![(None, META_GROUP)];
    groups.extend(
        node.tables()
            .into_iter()
            .map(|table| (Some(table.name), table.group)),
    );
    let mut states = Vec::with_capacity(groups.len());
    for (table, group) in groups {
        let status = node.host().status(group).await;
        states.push(GroupState {
            table,
            group,
            status,
        });
    }
    states
}

/// Why the node does not serve, if it does not, judged from `states`.
fn verdict(node: &Node, states: &[GroupState]) -> Result<(), String> {
    if let Some(failure) = node.wal_failure() {
        return Err(format!(
            "the WAL failed and takes no more writes ({failure}); restart the node once the disk is fixed"
        ));
    }
    let etcd_table = &node.config().etcd_table;
    if node.config().role == ClusterRole::Leader
        && !states
            .iter()
            .any(|state| state.table.as_ref() == Some(etcd_table))
    {
        return Err(format!(
            "starting: the table catalogue is not loaded yet (no table {etcd_table:?})"
        ));
    }
    for state in states {
        let what = match &state.table {
            None => "the table catalogue".to_string(),
            Some(name) => format!("table {name:?}"),
        };
        match &state.status {
            Ok(status) if status.soft_state.leader.is_some() => {}
            Ok(_) => return Err(format!("{what}: no leader known (group {})", state.group.0)),
            Err(error) => return Err(format!("{what}: {error}")),
        }
    }
    Ok(())
}

/// Why the node does not serve, if it does not.
pub async fn health(node: &Node) -> Result<(), String> {
    verdict(node, &group_states(node).await)
}

type Labels = Vec<(String, String)>;

// The encoder ends every help text with a full stop; ours are written
// with one, for reading here.
fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help.trim_end_matches('.'), family.clone());
    family
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help.trim_end_matches('.'), family.clone());
    family
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let counter = Counter::<u64>::default();
    counter.inc_by(value);
    registry.register(name, help.trim_end_matches('.'), counter);
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help.trim_end_matches('.'), gauge);
}

/// A histogram whose buckets were counted elsewhere (the WAL, the gRPC
/// layer): per-bucket counts (not cumulative), the last bucket +Inf.
#[derive(Debug)]
struct CountedHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl CountedHistogram {
    /// From bucket bounds in microseconds and per-bucket counts (one more
    /// than the bounds), in seconds.
    fn from_micros(bounds_micros: &[u64], counts: &[u64], micros_total: u64) -> CountedHistogram {
        let buckets = bounds_micros
            .iter()
            .map(|bound| *bound as f64 / 1e6)
            .chain([f64::MAX]) // the encoder prints f64::MAX as +Inf
            .zip(counts.iter().copied())
            .collect();
        CountedHistogram {
            sum: micros_total as f64 / 1e6,
            count: counts.iter().sum(),
            buckets,
        }
    }
}

impl prometheus_client::encoding::EncodeMetric for CountedHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// Counted histograms, one per label set.
#[derive(Debug)]
struct LabelledHistograms(Vec<(Labels, CountedHistogram)>);

impl prometheus_client::encoding::EncodeMetric for LabelledHistograms {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        for (labels, histogram) in &self.0 {
            histogram.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// The per-table replication gauges of a follower cluster.
struct ReplicationGauges {
    lag_ms: Family<Labels, Gauge>,
    lag_entries: Family<Labels, Gauge>,
    leader_index: Family<Labels, Gauge>,
    stalled: Family<Labels, Gauge>,
    installs: Family<Labels, Counter>,
}

impl ReplicationGauges {
    fn register(registry: &mut Registry) -> ReplicationGauges {
        ReplicationGauges {
            lag_ms: gauge_family(
                registry,
                "replication_lag_milliseconds",
                "How long the table has been behind the leader cluster; 0 when caught up.",
            ),
            lag_entries: gauge_family(
                registry,
                "replication_lag_entries",
                "The leader cluster's index of the table minus the index held here (on the pulling node).",
            ),
            leader_index: gauge_family(
                registry,
                "replication_applied_leader_index",
                "The leader index this node's copy of the table holds.",
            ),
            stalled: gauge_family(
                registry,
                "replication_stalled",
                "1 while the table's replication reports an error (e.g. the leader is behind).",
            ),
            installs: counter_family(
                registry,
                "replication_snapshot_installs",
                "Snapshots of the leader cluster's table this node installed (the log no longer \
                 reached back, the leader's table was restored, or an operator reset the table)",
            ),
        }
    }

    /// Sets the gauges of table `group`, labelled `labels`.
    async fn record(&self, node: &Node, group: GroupId, labels: &Labels) {
        let facts = node.replication_view(group).await;
        self.lag_ms.get_or_create(labels).set(as_i64(facts.lag_ms));
        self.lag_entries.get_or_create(labels).set(as_i64(
            facts
                .leader_index
                .saturating_sub(facts.applied_leader_index),
        ));
        self.leader_index
            .get_or_create(labels)
            .set(as_i64(facts.applied_leader_index));
        self.stalled
            .get_or_create(labels)
            .set(i64::from(facts.error.is_some()));
        self.installs
            .get_or_create(labels)
            .inc_by(node.snapshot_installs(group));
    }
}

/// The per-table gauges and counters of every node.
struct TableMetrics {
    term: Family<Labels, Gauge>,
    commit: Family<Labels, Gauge>,
    applied: Family<Labels, Gauge>,
    leader: Family<Labels, Gauge>,
    is_leader: Family<Labels, Gauge>,
    disk: Family<Labels, Gauge>,
    log_bytes: Family<Labels, Gauge>,
    apply_lag: Family<Labels, Gauge>,
    leader_changes: Family<Labels, Counter>,
    elections: Family<Labels, Counter>,
    proposals: Family<Labels, Counter>,
    proposals_failed: Family<Labels, Counter>,
}

impl TableMetrics {
    fn register(registry: &mut Registry) -> TableMetrics {
        TableMetrics {
            term: gauge_family(registry, "table_raft_term", "The table group's Raft term."),
            commit: gauge_family(
                registry,
                "table_commit_index",
                "The table group's commit index.",
            ),
            applied: gauge_family(
                registry,
                "table_applied_index",
                "The table group's applied index on this node.",
            ),
            leader: gauge_family(
                registry,
                "table_leader_id",
                "The node id of the table group's leader as this node knows it; 0 when none.",
            ),
            is_leader: gauge_family(
                registry,
                "table_is_leader",
                "1 when this node leads the table's group.",
            ),
            disk: gauge_family(
                registry,
                "table_db_size_bytes",
                "Bytes the table's data takes on disk.",
            ),
            log_bytes: gauge_family(
                registry,
                "table_log_size_bytes",
                "Bytes of the table group's Raft log held in the WAL.",
            ),
            apply_lag: gauge_family(
                registry,
                "table_apply_lag_entries",
                "Committed entries of the table's group not yet applied on this node.",
            ),
            leader_changes: counter_family(
                registry,
                "table_leader_changes",
                "Times this node saw the table group's leader change",
            ),
            elections: counter_family(
                registry,
                "table_term_increases",
                "Term increases of the table's group seen by this node: elections, won or not",
            ),
            proposals: counter_family(
                registry,
                "table_proposals",
                "Writes this node proposed to the table's group (each once, however often Raft retried it)",
            ),
            proposals_failed: counter_family(
                registry,
                "table_proposals_failed",
                "Proposals of this node to the table's group that failed: no leader in time, refused, or the group stopped",
            ),
        }
    }

    /// Sets the metrics of one group (a table's, or the catalogue's),
    /// labelled `labels`.
    fn record(&self, node: &Node, state: &GroupState, labels: &Labels) {
        if let Ok(status) = &state.status {
            self.term
                .get_or_create(labels)
                .set(as_i64(status.hard_state.term.0));
            self.commit
                .get_or_create(labels)
                .set(as_i64(status.hard_state.commit.0));
            self.applied
                .get_or_create(labels)
                .set(as_i64(status.applied.0));
            self.leader
                .get_or_create(labels)
                .set(as_i64(status.soft_state.leader.map_or(0, |id| id.0)));
            self.is_leader.get_or_create(labels).set(i64::from(
                status.soft_state.leader == Some(node.config().node_id),
            ));
            self.apply_lag.get_or_create(labels).set(as_i64(
                status.hard_state.commit.0.saturating_sub(status.applied.0),
            ));
        }
        let counts = node.proposal_counts(state.group);
        self.proposals.get_or_create(labels).inc_by(counts.proposed);
        self.proposals_failed
            .get_or_create(labels)
            .inc_by(counts.failed);
        let events = node.raft_events(state.group);
        self.leader_changes
            .get_or_create(labels)
            .inc_by(events.leader_changes);
        self.elections
            .get_or_create(labels)
            .inc_by(events.term_increases);
        if state.group != META_GROUP {
            self.disk
                .get_or_create(labels)
                .set(as_i64(node.table_disk_bytes(state.group)));
            self.log_bytes
                .get_or_create(labels)
                .set(as_i64(node.log_bytes(state.group)));
        }
    }
}

fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The metrics as OpenMetrics text, read from the node now.
pub async fn metrics(node: &Node) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("regatta");
    let up = node.uptime().as_secs();
    gauge(
        &mut registry,
        "uptime_seconds",
        "Seconds since the node started.",
        as_i64(up),
    );
    let states = group_states(node).await;
    gauge(
        &mut registry,
        "healthy",
        "1 when /healthz answers 200, else 0.",
        i64::from(verdict(node, &states).is_ok()),
    );
    let tables = TableMetrics::register(&mut registry);
    let replication = (node.config().role == ClusterRole::Follower)
        .then(|| ReplicationGauges::register(&mut registry));
    for state in &states {
        let name = state.table.clone().unwrap_or_else(|| "_catalogue".into());
        let labels: Labels = vec![("table".into(), name)];
        tables.record(node, state, &labels);
        if let (Some(gauges), true) = (&replication, state.group != META_GROUP) {
            gauges.record(node, state.group, &labels).await;
        }
    }
    gauge(
        &mut registry,
        "quiesced_groups",
        "Groups on this node that stopped ticking because they are idle.",
        as_i64(node.host().quiesced_group_count()),
    );
    register_store_metrics(&mut registry, node);
    register_wal_metrics(&mut registry, node);
    register_grpc_metrics(&mut registry, node);
    register_transport_metrics(&mut registry, node);
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// The table storage engine's memory and journals.
fn register_store_metrics(registry: &mut Registry, node: &Node) {
    let engine = node.table_engine_stats();
    gauge(
        registry,
        "table_store_write_buffer_bytes",
        "Bytes of table writes in memory not yet flushed by the storage engine; writes halt above regatta_table_store_write_buffer_limit_bytes.",
        as_i64(engine.write_buffer_bytes),
    );
    gauge(
        registry,
        "table_store_write_buffer_limit_bytes",
        "The storage engine's write buffer limit: above it, table writes halt until a flush frees room.",
        as_i64(regatta_kv::WRITE_BUFFER_BYTES_MAX),
    );
    gauge(
        registry,
        "table_store_journals",
        "Journal files of the table storage engine on disk; a number that keeps growing means it does not flush.",
        as_i64(engine.journals),
    );
}

/// The WAL's counters, sizes and fsync times.
fn register_wal_metrics(registry: &mut Registry, node: &Node) {
    let wal = node.wal_stats();
    counter(
        registry,
        "wal_requests",
        "WAL write requests acknowledged.",
        wal.requests,
    );
    counter(
        registry,
        "wal_batches",
        "WAL batches written (one write, at most one fsync each).",
        wal.batches,
    );
    counter(registry, "wal_fsyncs", "WAL fsyncs.", wal.fsyncs);
    counter(
        registry,
        "wal_direct_writes",
        "WAL batches written with direct I/O (O_DIRECT), bypassing the page cache.",
        wal.direct_writes,
    );
    counter(
        registry,
        "wal_cache_hits",
        "WAL entries records read from the record cache.",
        wal.cache_hits,
    );
    counter(
        registry,
        "wal_cache_misses",
        "WAL entries records read from disk.",
        wal.cache_misses,
    );
    counter(
        registry,
        "wal_written_bytes",
        "Bytes written to WAL segments.",
        wal.bytes_written,
    );
    gauge(
        registry,
        "wal_segments",
        "WAL segments on disk.",
        as_i64(wal.segments),
    );
    gauge(
        registry,
        "wal_size_bytes",
        "Bytes of all WAL segments on disk.",
        as_i64(wal.size_bytes),
    );
    registry.register(
        "wal_fsync_seconds",
        "How long WAL fsyncs took",
        CountedHistogram::from_micros(
            &regatta_wal::FSYNC_BUCKET_BOUNDS_MICROS,
            &wal.fsync_buckets,
            wal.fsync_micros_total,
        ),
    );
    gauge(
        registry,
        "wal_failed",
        "1 once the WAL failed (a write or fsync error): the node takes no more writes.",
        i64::from(node.wal_failure().is_some()),
    );
}

/// gRPC calls by method and status, and their latency.
fn register_grpc_metrics(registry: &mut Registry, node: &Node) {
    let grpc_calls = Family::<Labels, Counter>::default();
    registry.register(
        "grpc_calls",
        "gRPC calls served, by method and status code",
        grpc_calls.clone(),
    );
    let mut latency_by_method: std::collections::BTreeMap<String, (Vec<u64>, u64)> =
        std::collections::BTreeMap::new();
    for (method, code, stats) in node.grpc_metrics().snapshot() {
        grpc_calls
            .get_or_create(&vec![
                ("method".to_string(), method.clone()),
                ("code".to_string(), code.to_string()),
            ])
            .inc_by(stats.calls);
        let (buckets, micros) = latency_by_method
            .entry(method)
            .or_insert_with(|| (vec![0; crate::grpc_metrics::LATENCY_BUCKETS], 0));
        for (total, count) in buckets.iter_mut().zip(stats.buckets) {
            *total += count;
        }
        *micros += stats.micros_total;
    }
    registry.register(
        "grpc_latency_seconds",
        "Time to the response headers of gRPC calls, by method",
        LabelledHistograms(
            latency_by_method
                .into_iter()
                .map(|(method, (buckets, micros))| {
                    (
                        vec![("method".to_string(), method)],
                        CountedHistogram::from_micros(
                            &crate::grpc_metrics::LATENCY_BUCKET_BOUNDS_MICROS,
                            &buckets,
                            micros,
                        ),
                    )
                })
                .collect(),
        ),
    );
}

/// The peer transport's counters.
fn register_transport_metrics(registry: &mut Registry, node: &Node) {
    let transport = node.transport_stats();
    for (name, help, value) in transport {
        counter(registry, name, help, value);
    }
    let by_kind = Family::<Labels, Counter>::default();
    registry.register(
        "peer_messages_sent_by_kind",
        "Raft messages sent to peers, by kind (append, heartbeat, read_index, ...)",
        by_kind.clone(),
    );
    for (kind, count) in node.transport_messages_by_kind() {
        by_kind
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .inc_by(count);
    }
}
