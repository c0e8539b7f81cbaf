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
/// `shutdown` resolves.
pub async fn serve_rest(
    node: Arc<Node>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), String> {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => return Ok(()),
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "the REST listener could not accept a connection");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let node = Arc::clone(&node);
                async move { Ok::<_, Infallible>(answer(&node, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
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

/// The per-table replication gauges of a follower cluster.
struct ReplicationGauges {
    lag_ms: Family<Labels, Gauge>,
    lag_entries: Family<Labels, Gauge>,
    leader_index: Family<Labels, Gauge>,
    stalled: Family<Labels, Gauge>,
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
    let term = gauge_family(
        &mut registry,
        "table_raft_term",
        "The table group's Raft term.",
    );
    let commit = gauge_family(
        &mut registry,
        "table_commit_index",
        "The table group's commit index.",
    );
    let applied = gauge_family(
        &mut registry,
        "table_applied_index",
        "The table group's applied index on this node.",
    );
    let leader = gauge_family(
        &mut registry,
        "table_leader_id",
        "The node id of the table group's leader as this node knows it; 0 when none.",
    );
    let is_leader = gauge_family(
        &mut registry,
        "table_is_leader",
        "1 when this node leads the table's group.",
    );
    let disk = gauge_family(
        &mut registry,
        "table_db_size_bytes",
        "Bytes the table's data takes on disk.",
    );
    let replication = (node.config().role == ClusterRole::Follower).then(|| ReplicationGauges {
        lag_ms: gauge_family(
            &mut registry,
            "replication_lag_milliseconds",
            "How long the table has been behind the leader cluster; 0 when caught up.",
        ),
        lag_entries: gauge_family(
            &mut registry,
            "replication_lag_entries",
            "The leader cluster's index of the table minus the index held here (on the pulling node).",
        ),
        leader_index: gauge_family(
            &mut registry,
            "replication_applied_leader_index",
            "The leader index this node's copy of the table holds.",
        ),
        stalled: gauge_family(
            &mut registry,
            "replication_stalled",
            "1 while the table's replication reports an error (e.g. the leader is behind).",
        ),
    });
    let own = node.config().node_id;
    for state in states {
        let name = state.table.clone().unwrap_or_else(|| "_catalogue".into());
        let labels: Labels = vec![("table".into(), name)];
        if let Ok(status) = &state.status {
            term.get_or_create(&labels)
                .set(as_i64(status.hard_state.term.0));
            commit
                .get_or_create(&labels)
                .set(as_i64(status.hard_state.commit.0));
            applied.get_or_create(&labels).set(as_i64(status.applied.0));
            leader
                .get_or_create(&labels)
                .set(as_i64(status.soft_state.leader.map_or(0, |id| id.0)));
            is_leader
                .get_or_create(&labels)
                .set(i64::from(status.soft_state.leader == Some(own)));
        }
        let group = state.group;
        if group == META_GROUP {
            continue;
        }
        disk.get_or_create(&labels)
            .set(as_i64(node.table_disk_bytes(group)));
        if let Some(gauges) = &replication {
            let facts = node.replication_view(group).await;
            gauges
                .lag_ms
                .get_or_create(&labels)
                .set(as_i64(facts.lag_ms));
            gauges.lag_entries.get_or_create(&labels).set(as_i64(
                facts
                    .leader_index
                    .saturating_sub(facts.applied_leader_index),
            ));
            gauges
                .leader_index
                .get_or_create(&labels)
                .set(as_i64(facts.applied_leader_index));
            gauges
                .stalled
                .get_or_create(&labels)
                .set(i64::from(facts.error.is_some()));
        }
    }
    gauge(
        &mut registry,
        "quiesced_groups",
        "Groups on this node that stopped ticking because they are idle.",
        as_i64(node.host().quiesced_group_count()),
    );
    let wal = node.wal_stats();
    counter(
        &mut registry,
        "wal_requests",
        "WAL write requests acknowledged.",
        wal.requests,
    );
    counter(
        &mut registry,
        "wal_batches",
        "WAL batches written (one write, at most one fsync each).",
        wal.batches,
    );
    counter(&mut registry, "wal_fsyncs", "WAL fsyncs.", wal.fsyncs);
    counter(
        &mut registry,
        "wal_written_bytes",
        "Bytes written to WAL segments.",
        wal.bytes_written,
    );
    gauge(
        &mut registry,
        "wal_segments",
        "WAL segments on disk.",
        as_i64(wal.segments),
    );
    gauge(
        &mut registry,
        "wal_size_bytes",
        "Bytes of all WAL segments on disk.",
        as_i64(wal.size_bytes),
    );
    let transport = node.transport_stats();
    for (name, help, value) in transport {
        counter(&mut registry, name, help, value);
    }
    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}
