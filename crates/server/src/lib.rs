//! `regatta-server`: one node's gRPC services. Regatta's own API
//! (`regatta.v1`) and etcd's v3 API (`etcdserverpb`) share one port; both
//! map onto `regatta_kv` commands on the node's tables.
//!
//! - [`Node`]: the groups of one node, the table catalogue, reads and
//!   writes;
//! - [`serve`]: every service on one listener;
//! - [`serve_rest`]: `/metrics` and `/healthz` for operators.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod auth;
mod error;
mod etcd_api;
mod fast_unary;
pub mod grpc_metrics;
mod maintenance;
mod node;
mod regatta_api;
mod rest;
pub mod restore;
pub mod tls;
mod unimplemented;
pub mod validate;

/// Generated protobuf and gRPC code (`proto/`).
#[allow(missing_docs, clippy::all)]
pub mod proto {
    /// Regatta's API.
    pub mod regatta {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("regatta.v1");
        }
    }
    /// Regatta's shared messages.
    pub mod mvcc {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("mvcc.v1");
        }
    }
    /// etcd's v3 API.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
    /// etcd's key-value messages.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// etcd's auth messages.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
}

use std::sync::Arc;

pub use error::{Error, Result};
pub use etcd_api::{EtcdApi, ETCD_API_VERSION};
pub use maintenance::MaintenanceApi;
pub use node::{
    prefix_end, random_u64, reset_request_key, validate_table_name, ClusterRole, GroupFacts,
    MemberAddresses, MemberInfo, Node, NodeConfig, ProposalCounts, RaftEvents, ReplicationFacts,
    TableEntry, WriteForwarder, META_GROUP,
};
pub use regatta_api::{RegattaApi, RANGE_RESPONSE_BYTES_MAX};
pub use rest::{health, metrics, serve_rest};

/// Concurrent requests (HTTP/2 streams) one API connection may have open.
pub const API_STREAMS_PER_CONNECTION_MAX: u32 = 1024;

/// Serves every API of `node` on `listener` until `shutdown` resolves;
/// over TLS with `tls` (see [`tls::server_config`]).
pub async fn serve(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    use proto::etcdserverpb as etcd;
    use proto::regatta::v1 as regatta;
    let own = RegattaApi::new(Arc::clone(&node));
    let api = EtcdApi::new(Arc::clone(&node));
    // TCP_NODELAY (set by `incoming`): small responses must not wait for
    // the client's delayed acknowledgement, which cost linearizable reads
    // 40 ms each.
    let incoming = tls::incoming(listener, tls, "api");
    let config = node.config();
    let request_bytes_max =
        fast_unary::request_bytes_max(config.key_bytes_max, config.value_bytes_max);
    // Layers run outermost first: metrics count the short path's calls too.
    // Streams per connection are bounded (tonic would otherwise lift
    // hyper's limit), and HTTP/2 pings find dead connections.
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(API_STREAMS_PER_CONNECTION_MAX))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .layer(grpc_metrics::GrpcMetricsLayer::new(
            node.grpc_metrics().clone(),
        ))
        .layer(fast_unary::FastUnaryLayer::new(
            api.clone(),
            own.clone(),
            request_bytes_max,
        ))
        .add_service(
            regatta::kv_server::KvServer::new(own.clone())
                .max_decoding_message_size(request_bytes_max),
        )
        .add_service(regatta::tables_server::TablesServer::new(own.clone()))
        .add_service(regatta::cluster_server::ClusterServer::new(own.clone()))
        .add_service(regatta::membership_server::MembershipServer::new(own))
        .add_service(regatta::maintenance_server::MaintenanceServer::new(
            MaintenanceApi::new(Arc::clone(&node)),
        ))
        .add_service(
            etcd::kv_server::KvServer::new(api.clone())
                .max_decoding_message_size(request_bytes_max),
        )
        .add_service(etcd::maintenance_server::MaintenanceServer::new(
            api.clone(),
        ))
        .add_service(etcd::cluster_server::ClusterServer::new(api))
        .add_service(etcd::watch_server::WatchServer::new(
            unimplemented::Unimplemented,
        ))
        .add_service(etcd::lease_server::LeaseServer::new(
            unimplemented::Unimplemented,
        ))
        .add_service(etcd::auth_server::AuthServer::new(
            unimplemented::AuthApi::new(Arc::clone(&node)),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(|error| Error::Config(format!("the API server failed: {error}")))
}
