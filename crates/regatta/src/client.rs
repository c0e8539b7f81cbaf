//! `regatta kv …` and `regatta table …`: a client of the `regatta.v1` API.

use clap::{Args, Subcommand, ValueEnum};
use regatta_server::prefix_end;
use regatta_server::proto::mvcc::v1 as mvcc;
use regatta_server::proto::regatta::v1 as pb;
use serde_json::{json, Value};
use tonic::transport::Channel;

/// The Regatta KV client the `kv` commands use.
type KvClient = pb::kv_client::KvClient<Channel>;

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines of text.
    Text,
    /// One JSON document (keys and values as UTF-8, lossily).
    Json,
}

/// Where and how to talk to a node.
#[derive(Args, Debug)]
pub struct Connection {
    /// The node's API address.
    #[arg(
        long,
        default_value = "127.0.0.1:8443",
        env = "REGATTA_ADDRESS",
        global = true
    )]
    pub address: String,
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub output: Output,
    /// Verify the server's certificate with these CAs (PEM) and speak TLS.
    #[arg(long, value_name = "FILE", env = "REGATTA_CACERT", global = true)]
    pub cacert: Option<std::path::PathBuf>,
    /// A client certificate (PEM), for servers that require one.
    #[arg(
        long = "cert",
        value_name = "FILE",
        env = "REGATTA_CERT",
        global = true,
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--cert`.
    #[arg(
        long = "key",
        value_name = "FILE",
        env = "REGATTA_KEY",
        global = true,
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,
    /// The admin token, for admin operations on a node started with
    /// `--api.admin-token-file`.
    #[arg(long, env = "REGATTA_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
}

impl Connection {
    /// `message` as a request carrying the admin token, when given.
    pub fn admin<T>(&self, message: T) -> Result<tonic::Request<T>, String> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token {
            let value = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| "--token must be visible ASCII characters".to_string())?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }
}

/// Key-value commands on a table.
#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Reads a key, a prefix or a range.
    Get {
        /// The table.
        table: String,
        /// The key (the first key of a range).
        key: String,
        /// Every key starting with KEY.
        #[arg(long, conflicts_with = "range_end")]
        prefix: bool,
        /// The end of the range, exclusive.
        #[arg(long)]
        range_end: Option<String>,
        /// At most this many keys (0: no limit).
        #[arg(long, default_value_t = 0)]
        limit: i64,
        /// Only keys, no values.
        #[arg(long)]
        keys_only: bool,
        /// Only the count.
        #[arg(long)]
        count_only: bool,
        /// A linearizable read instead of the local state.
        #[arg(long)]
        linearizable: bool,
    },
    /// Sets a key.
    Put {
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Deletes a key or a prefix.
    Delete {
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        prefix: bool,
    },
    /// Compares values, then puts or deletes atomically.
    Txn {
        /// The table.
        table: String,
        /// A condition `key=value` (repeatable); all must hold.
        #[arg(long = "if-value")]
        compare: Vec<String>,
        /// When all hold: `put:key=value` or `delete:key` (repeatable).
        #[arg(long = "then")]
        success: Vec<String>,
        /// Otherwise: `put:key=value` or `delete:key` (repeatable).
        #[arg(long = "else")]
        failure: Vec<String>,
    },
}

/// Table commands.
#[derive(Subcommand, Debug)]
pub enum TableCommand {
    /// Creates a table.
    Create {
        /// Its name: letters, digits, '-', '_' or '.'.
        name: String,
    },
    /// Lists the tables.
    List,
    /// Deletes a table and its data on every node.
    Delete {
        /// Its name.
        name: String,
    },
    /// Moves a table's leadership to another node; with `--all`, every
    /// leadership the node at `--address` holds (e.g. before a restart).
    TransferLeader {
        /// The table (omit with `--all`).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        table: Option<String>,
        /// Every table the node at `--address` leads.
        #[arg(long)]
        all: bool,
        /// The new leader's node id; by default the most up-to-date other
        /// voter.
        #[arg(long, default_value_t = 0)]
        to: u64,
    },
}

/// Membership commands (admin: they need `--token` when the cluster has
/// one).
#[derive(Subcommand, Debug)]
pub enum MemberCommand {
    /// Lists the members: id, role, peer and client addresses.
    List,
    /// Adds a node as a learner of every table; unless `--learner`, each
    /// table promotes it to voter once it has caught up. Then start the
    /// node with `--raft.join` and `--raft.initial-members` naming the
    /// current members and itself.
    Add {
        /// The new node's Raft address (its `--raft.address`), host:port:
        /// an IP address or a host name.
        raft_address: String,
        /// Its node id (its `--raft.node-id`); by default the next free one.
        #[arg(long, default_value_t = 0)]
        id: u64,
        /// Its client API URL, shown by `member list`.
        #[arg(long, default_value = "")]
        client_url: String,
        /// Keep it a learner: it replicates, but never votes.
        #[arg(long)]
        learner: bool,
    },
    /// Promotes a learner to voter (refused until it has caught up).
    Promote {
        /// The member's id.
        id: u64,
    },
    /// Demotes a voter to learner (refused if the rest cannot form a quorum).
    Demote {
        /// The member's id.
        id: u64,
    },
    /// Removes a member (refused if the rest cannot form a reachable
    /// quorum); the removed node shuts itself down.
    Remove {
        /// The member's id.
        id: u64,
    },
    /// UNSAFE: removes a dead member on the node at `--address` alone,
    /// without a quorum, for a cluster that lost its quorum for good. Run
    /// it on one survivor only; writes only the lost nodes held are lost.
    ForceRemove {
        /// The member's id.
        id: u64,
        /// Confirms that you understand the above.
        #[arg(long)]
        yes_i_know_this_can_lose_data: bool,
    },
}

fn members_text(members: &[pb::Member]) -> (Value, Vec<String>) {
    let json: Vec<Value> = members
        .iter()
        .map(|member| {
            json!({
                "id": member.id,
                "role": role(member),
                "peerURLs": member.peer_ur_ls,
                "clientURLs": member.client_ur_ls,
            })
        })
        .collect();
    let lines = members
        .iter()
        .map(|member| {
            format!(
                "{}, {}, {}, {}",
                member.id,
                role(member),
                member.peer_ur_ls.join(" "),
                member.client_ur_ls.join(" ")
            )
        })
        .collect();
    (Value::Array(json), lines)
}

fn role(member: &pb::Member) -> &'static str {
    match (member.is_learner, member.promoting) {
        (false, _) => "voter",
        (true, true) => "learner (promoting)",
        (true, false) => "learner",
    }
}

/// Runs a `member` command.
pub async fn member(connection: &Connection, command: MemberCommand) -> Result<(), String> {
    let channel = channel(connection).await?;
    let mut membership = pb::membership_client::MembershipClient::new(channel.clone());
    let response = match command {
        MemberCommand::List => {
            let response = pb::cluster_client::ClusterClient::new(channel)
                .member_list(pb::MemberListRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let (value, lines) = members_text(&response.members);
            print(connection.output, value, lines);
            return Ok(());
        }
        MemberCommand::Add {
            raft_address,
            id,
            client_url,
            learner,
        } => {
            membership
                .add(connection.admin(pb::MemberAddRequest {
                    id,
                    raft_address,
                    client_url,
                    learner,
                })?)
                .await
        }
        MemberCommand::Promote { id } => {
            membership
                .promote(connection.admin(pb::MemberIdRequest { id })?)
                .await
        }
        MemberCommand::Demote { id } => {
            membership
                .demote(connection.admin(pb::MemberIdRequest { id })?)
                .await
        }
        MemberCommand::Remove { id } => {
            membership
                .remove(connection.admin(pb::MemberIdRequest { id })?)
                .await
        }
        MemberCommand::ForceRemove {
            id,
            yes_i_know_this_can_lose_data,
        } => {
            if !yes_i_know_this_can_lose_data {
                return Err("force-remove commits without a quorum and can lose acknowledged writes; add --yes-i-know-this-can-lose-data to go ahead".into());
            }
            membership
                .force_remove(connection.admin(pb::MemberForceRemoveRequest {
                    id,
                    confirm: true,
                })?)
                .await
        }
    }
    .map_err(status)?
    .into_inner();
    let (mut value, mut lines) = members_text(&response.members);
    value = json!({"id": response.id, "members": value});
    lines.insert(0, format!("done: member {}", response.id));
    print(connection.output, value, lines);
    Ok(())
}

/// Client TLS from `--cacert`, `--cert` and `--key` (the CLI's and
/// `regatta bench`'s flags, etcdctl's names): `None` without `--cacert`.
pub fn client_tls(
    cacert: Option<&std::path::Path>,
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
) -> Result<Option<regatta_server::tls::ClientTls>, String> {
    use regatta_server::tls::{ClientTls, ClientTlsOptions, Identity, Pem};
    let Some(ca) = cacert else {
        if cert.is_some() {
            return Err("--cert needs --cacert, which verifies the server".into());
        }
        return Ok(None);
    };
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some(Identity {
            certificate_chain: Pem::File(cert.to_path_buf()),
            key: Pem::File(key.to_path_buf()),
        }),
        _ => None,
    };
    let options = ClientTlsOptions {
        ca: Pem::File(ca.to_path_buf()),
        identity,
        alpn_protocols: Vec::new(),
    };
    ClientTls::new(&options, None)
        .map(Some)
        .map_err(|error| error.to_string())
}

/// A channel to `--address`, over TLS when `--cacert` is given.
pub async fn channel(connection: &Connection) -> Result<Channel, String> {
    let tls = client_tls(
        connection.cacert.as_deref(),
        connection.tls_cert.as_deref(),
        connection.tls_key.as_deref(),
    )?;
    let endpoint = regatta_server::tls::endpoint(&connection.address, tls.as_ref())
        .map_err(|error| format!("--address: {error}"))?;
    regatta_server::tls::connect(endpoint, tls.as_ref())
        .await
        .map_err(|error| error.to_string())
}

fn status(error: tonic::Status) -> String {
    format!("{:?}: {}", error.code(), error.message())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_string()
}

fn op(spec: &str) -> Result<mvcc::RequestOp, String> {
    use mvcc::request_op::{DeleteRange, Put, Request};
    let request = if let Some(pair) = spec.strip_prefix("put:") {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{spec:?}: expected put:key=value"))?;
        Request::RequestPut(Put {
            key: key.into(),
            value: value.into(),
            prev_kv: false,
        })
    } else if let Some(key) = spec.strip_prefix("delete:") {
        Request::RequestDeleteRange(DeleteRange {
            key: key.into(),
            range_end: Vec::new(),
            prev_kv: false,
            count: false,
        })
    } else {
        return Err(format!("{spec:?}: expected put:key=value or delete:key"));
    };
    Ok(mvcc::RequestOp {
        request: Some(request),
    })
}

/// Prints a command's result: `value` with `-o json`, else `lines`.
pub fn print(output: Output, value: Value, lines: Vec<String>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = match output {
        Output::Json => writeln!(out, "{value}"),
        Output::Text => lines.iter().try_for_each(|line| writeln!(out, "{line}")),
    }
    .and_then(|()| out.flush());
    // A reader that stopped early (`| head`) is not an error of ours.
    if let Err(error) = written {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("regatta: writing the output: {error}");
        }
    }
}

/// Runs a `kv` command.
pub async fn kv(connection: &Connection, command: KvCommand) -> Result<(), String> {
    let mut client = pb::kv_client::KvClient::new(channel(connection).await?)
        .max_decoding_message_size(64 << 20);
    let output = connection.output;
    match command {
        KvCommand::Get {
            table,
            key,
            prefix,
            range_end,
            limit,
            keys_only,
            count_only,
            linearizable,
        } => {
            let range_end = match (prefix, range_end) {
                (true, _) => prefix_end(key.as_bytes()),
                (false, Some(end)) => end.into_bytes(),
                (false, None) => Vec::new(),
            };
            let request = pb::RangeRequest {
                table: table.into_bytes(),
                key: key.into_bytes(),
                range_end,
                limit,
                linearizable,
                keys_only,
                count_only,
                ..pb::RangeRequest::default()
            };
            let response = client.range(request).await.map_err(status)?.into_inner();
            print_range(output, &response, keys_only, count_only);
        }
        KvCommand::Put { table, key, value } => put(&mut client, output, table, key, value).await?,
        KvCommand::Delete { table, key, prefix } => {
            delete(&mut client, output, table, key, prefix).await?
        }
        KvCommand::Txn {
            table,
            compare,
            success,
            failure,
        } => {
            let request = pb::TxnRequest {
                table: table.into_bytes(),
                compare: value_compares(&compare)?,
                success: success.iter().map(|s| op(s)).collect::<Result<_, _>>()?,
                failure: failure.iter().map(|s| op(s)).collect::<Result<_, _>>()?,
            };
            txn(&mut client, output, request).await?
        }
    }
    Ok(())
}

/// `kv put`: writes one key.
async fn put(
    client: &mut KvClient,
    output: Output,
    table: String,
    key: String,
    value: String,
) -> Result<(), String> {
    let response = client
        .put(pb::PutRequest {
            table: table.into_bytes(),
            key: key.into_bytes(),
            value: value.into_bytes(),
            prev_kv: false,
        })
        .await
        .map_err(status)?
        .into_inner();
    let revision = response.header.map_or(0, |header| header.revision);
    print(output, json!({"revision": revision}), vec!["OK".into()]);
    Ok(())
}

/// `kv delete`: deletes one key, or every key with its prefix.
async fn delete(
    client: &mut KvClient,
    output: Output,
    table: String,
    key: String,
    prefix: bool,
) -> Result<(), String> {
    let range_end = if prefix {
        prefix_end(key.as_bytes())
    } else {
        Vec::new()
    };
    let response = client
        .delete_range(pb::DeleteRangeRequest {
            table: table.into_bytes(),
            key: key.into_bytes(),
            range_end,
            prev_kv: false,
            count: true,
        })
        .await
        .map_err(status)?
        .into_inner();
    let revision = response.header.map_or(0, |header| header.revision);
    print(
        output,
        json!({"revision": revision, "deleted": response.deleted}),
        vec![response.deleted.to_string()],
    );
    Ok(())
}

/// `kv txn`: runs the transaction and says which branch it took.
async fn txn(client: &mut KvClient, output: Output, request: pb::TxnRequest) -> Result<(), String> {
    let response = client.txn(request).await.map_err(status)?.into_inner();
    let revision = response.header.map_or(0, |header| header.revision);
    let verdict = if response.succeeded {
        "SUCCESS"
    } else {
        "FAILURE"
    };
    print(
        output,
        json!({"revision": revision, "succeeded": response.succeeded}),
        vec![verdict.into()],
    );
    Ok(())
}

/// Prints a range's answer: as JSON, or as the count (with
/// `count_only`), then each key and (but with `keys_only`) its value, a
/// line each.
fn print_range(output: Output, response: &pb::RangeResponse, keys_only: bool, count_only: bool) {
    let revision = response.header.as_ref().map_or(0, |header| header.revision);
    let kvs: Vec<Value> = response
        .kvs
        .iter()
        .map(|kv| {
            json!({
                "key": text(&kv.key),
                "value": text(&kv.value),
                "create_revision": kv.create_revision,
                "mod_revision": kv.mod_revision,
            })
        })
        .collect();
    let mut lines = Vec::new();
    if count_only {
        lines.push(response.count.to_string());
    }
    for kv in &response.kvs {
        lines.push(text(&kv.key));
        if !keys_only {
            lines.push(text(&kv.value));
        }
    }
    print(
        output,
        json!({"revision": revision, "count": response.count, "more": response.more, "kvs": kvs}),
        lines,
    );
}

/// `--if-value key=value` compares: the key's value equals `value`.
fn value_compares(specs: &[String]) -> Result<Vec<mvcc::Compare>, String> {
    specs
        .iter()
        .map(|spec| {
            let (key, value) = spec
                .split_once('=')
                .ok_or_else(|| format!("--if-value {spec:?}: expected key=value"))?;
            Ok(mvcc::Compare {
                result: mvcc::compare::CompareResult::Equal as i32,
                target: mvcc::compare::CompareTarget::Value as i32,
                key: key.into(),
                range_end: Vec::new(),
                target_union: Some(mvcc::compare::TargetUnion::Value(value.into())),
            })
        })
        .collect()
}

/// Runs a `table` command.
pub async fn table(connection: &Connection, command: TableCommand) -> Result<(), String> {
    let channel = channel(connection).await?;
    let mut client = pb::tables_client::TablesClient::new(channel.clone());
    match command {
        TableCommand::TransferLeader { table, all: _, to } => {
            let table = table.unwrap_or_default();
            let response = pb::membership_client::MembershipClient::new(channel)
                .transfer_leader(connection.admin(pb::TransferLeaderRequest {
                    table: table.clone(),
                    target: to,
                })?)
                .await
                .map_err(status)?
                .into_inner();
            let what = if table.is_empty() {
                "every table".to_string()
            } else {
                format!("table {table}")
            };
            print(
                connection.output,
                json!({"moved": response.moved}),
                vec![format!("{what}: {} leadership(s) moving", response.moved)],
            );
        }
        TableCommand::Create { name } => {
            let response = client
                .create(connection.admin(pb::CreateTableRequest {
                    name: name.clone(),
                    config: None,
                })?)
                .await
                .map_err(status)?
                .into_inner();
            print(
                connection.output,
                json!({"name": name, "id": response.id}),
                vec![format!("created table {name} (id {})", response.id)],
            );
        }
        TableCommand::List => {
            let response = client
                .list(pb::ListTablesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let tables: Vec<Value> = response
                .tables
                .iter()
                .map(|table| json!({"name": table.name, "id": table.id}))
                .collect();
            let lines = response
                .tables
                .iter()
                .map(|table| format!("{}\t{}", table.name, table.id))
                .collect();
            print(connection.output, json!({ "tables": tables }), lines);
        }
        TableCommand::Delete { name } => {
            client
                .delete(connection.admin(pb::DeleteTableRequest { name: name.clone() })?)
                .await
                .map_err(status)?;
            print(
                connection.output,
                json!({"name": name, "deleted": true}),
                vec![format!("deleted table {name}")],
            );
        }
    }
    Ok(())
}

/// Runs `regatta status`: the node's `Cluster.Status`, one line per table.
/// One table's row of `regatta status`: its Raft state, sizes, on a
/// follower cluster its replication, and its members.
fn table_line(name: &str, table: &pb::TableStatus, follower: bool) -> String {
    let leader = if table.leader.is_empty() {
        "-"
    } else {
        &table.leader
    };
    let mut line = format!(
        "{:<24} {:>6} {:>8} {:>12} {:>12} {:>12} {:>12}",
        name,
        leader,
        table.raft_term,
        table.raft_index,
        table.raft_applied_index,
        table.db_size,
        table.log_size
    );
    if follower {
        line.push_str(&format!(
            " {:>12} {:>12} {:>8}",
            table.leader_index, table.applied_leader_index, table.replication_lag_ms
        ));
    }
    let join = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    line.push_str(&format!("  {}", join(&table.voters)));
    if !table.learners.is_empty() {
        line.push_str(&format!(" (learners {})", join(&table.learners)));
    }
    line
}

pub async fn node_status(connection: &Connection) -> Result<(), String> {
    let mut client = pb::cluster_client::ClusterClient::new(channel(connection).await?);
    let response = client
        .status(pb::StatusRequest { config: false })
        .await
        .map_err(status)?
        .into_inner();
    let mut names: Vec<&String> = response.tables.keys().collect();
    names.sort();
    let follower = response.info.contains("follower");
    let mut lines = vec![format!(
        "node {} · regatta {} · {} · WAL {} bytes in {} segments",
        response.id,
        response.version,
        response.info,
        response.wal_size_bytes,
        response.wal_segments
    )];
    let mut header = format!(
        "{:<24} {:>6} {:>8} {:>12} {:>12} {:>12} {:>12}",
        "TABLE", "LEADER", "TERM", "COMMIT", "APPLIED", "DB BYTES", "LOG BYTES"
    );
    if follower {
        header.push_str(&format!(
            " {:>12} {:>12} {:>8}",
            "LEADER IDX", "HELD IDX", "LAG MS"
        ));
    }
    header.push_str("  MEMBERS");
    lines.push(header);
    let mut tables = Vec::new();
    for name in names {
        let table = &response.tables[name];
        lines.push(table_line(name, table, follower));
        tables.push(json!({
            "name": name,
            "leader": table.leader,
            "term": table.raft_term,
            "commit": table.raft_index,
            "applied": table.raft_applied_index,
            "db_size_bytes": table.db_size,
            "log_size_bytes": table.log_size,
            "leader_index": table.leader_index,
            "applied_leader_index": table.applied_leader_index,
            "replication_lag_ms": table.replication_lag_ms,
            "replication_error": table.replication_error,
            "voters": table.voters,
            "learners": table.learners,
        }));
    }
    for error in &response.errors {
        lines.push(format!("error: {error}"));
    }
    print(
        connection.output,
        json!({
            "id": response.id,
            "version": response.version,
            "info": response.info,
            "uptime_seconds": response.uptime_seconds,
            "wal_size_bytes": response.wal_size_bytes,
            "wal_segments": response.wal_segments,
            "tables": tables,
            "errors": response.errors,
        }),
        lines,
    );
    Ok(())
}
