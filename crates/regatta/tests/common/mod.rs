//! Starts real `regatta` processes on 127.0.0.1, on ports the test picks.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 for a child, outside the kernel's ephemeral
/// range so that a node restarted on it finds it still free (see
/// `regatta_chaos::harness::free_address`).
pub fn free_address() -> SocketAddr {
    regatta_chaos::harness::free_address().expect("a free port on 127.0.0.1")
}

/// `--raft.initial-members` for nodes 1, 2, ... at `rafts`.
pub fn members(rafts: &[SocketAddr]) -> String {
    rafts
        .iter()
        .enumerate()
        .map(|(index, address)| format!("{}={address}", index + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// The peer address `localhost:<port of address>`: a host name, which
/// nodes resolve when they listen and each time they dial.
pub fn named(address: SocketAddr) -> String {
    format!("localhost:{}", address.port())
}

/// `--raft.initial-members` for nodes 1, 2, ... at `rafts`, by host name.
pub fn members_named(rafts: &[SocketAddr]) -> String {
    rafts
        .iter()
        .enumerate()
        .map(|(index, address)| format!("{}={}", index + 1, named(*address)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The flags of member `id` of a cluster of `members`, then `extra`.
fn member_flags(id: u64, members: &str, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--raft.node-id".to_string(),
        id.to_string(),
        "--raft.initial-members".to_string(),
        members.to_string(),
    ];
    flags.extend(extra.iter().map(|flag| flag.to_string()));
    flags
}

/// A running single-node leader.
pub struct Regatta {
    pub child: Child,
    pub api: SocketAddr,
    pub raft: SocketAddr,
    pub dir: PathBuf,
}

impl Regatta {
    /// Starts `regatta leader --dev` on `dir`, with fresh ports. A port
    /// is free when it is picked, but another test may take it before
    /// the child binds it: a child that exits for that reason is started
    /// again, on a fresh data directory and other ports.
    pub fn start(dir: &Path) -> Regatta {
        for _ in 0..5 {
            let mut regatta = Regatta::start_on(dir, free_address(), free_address(), &[]);
            if !regatta.lost_a_port_race() {
                return regatta;
            }
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_file(dir.with_extension("log"));
        }
        panic!("regatta lost the race for its ports five times");
    }

    /// Waits (at most 10 s) until the child listens on its API port, and
    /// says whether it exited instead because a port was taken.
    fn lost_a_port_race(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.api).is_ok() {
                return false;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                return self.log().contains("Address already in use");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Starts it on the given addresses, with extra flags.
    pub fn start_on(dir: &Path, api: SocketAddr, raft: SocketAddr, extra: &[&str]) -> Regatta {
        let mut flags = vec!["--dev"];
        flags.extend_from_slice(extra);
        Regatta::spawn(dir, api, raft, &flags)
    }

    /// Starts member `id` of a cluster whose `--raft.initial-members` is
    /// `members`.
    pub fn start_member(
        dir: &Path,
        id: u64,
        api: SocketAddr,
        raft: SocketAddr,
        members: &str,
        extra: &[&str],
    ) -> Regatta {
        Regatta::member(dir, id, api, raft, &raft.to_string(), members, extra)
    }

    /// `start_member` with `--raft.address localhost:<port of raft>`: the
    /// node's peer address is a host name.
    pub fn start_member_named(
        dir: &Path,
        id: u64,
        api: SocketAddr,
        raft: SocketAddr,
        members: &str,
        extra: &[&str],
    ) -> Regatta {
        Regatta::member(dir, id, api, raft, &named(raft), members, extra)
    }

    /// Member `id` of a leader cluster, with `raft_address` as its
    /// `--raft.address` (listening on `raft`).
    fn member(
        dir: &Path,
        id: u64,
        api: SocketAddr,
        raft: SocketAddr,
        raft_address: &str,
        members: &str,
        extra: &[&str],
    ) -> Regatta {
        let flags = member_flags(id, members, extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Regatta::spawn_with_raft_address("leader", "warn", dir, api, raft, raft_address, &flags)
    }

    fn spawn(dir: &Path, api: SocketAddr, raft: SocketAddr, flags: &[&str]) -> Regatta {
        Regatta::spawn_as("leader", "warn", dir, api, raft, flags)
    }

    /// Starts `regatta follower --dev` on `dir`, replicating the leader
    /// cluster whose replication API is `leader`; logs at info level, so
    /// that tests can see what it did.
    pub fn start_follower(
        dir: &Path,
        api: SocketAddr,
        raft: SocketAddr,
        leader: impl std::fmt::Display,
        extra: &[&str],
    ) -> Regatta {
        Regatta::start_follower_every(dir, api, raft, leader, 100, extra)
    }

    /// `start_follower` comparing its tables with the leader's every
    /// `metadata_interval_ms`.
    pub fn start_follower_every(
        dir: &Path,
        api: SocketAddr,
        raft: SocketAddr,
        leader: impl std::fmt::Display,
        metadata_interval_ms: u64,
        extra: &[&str],
    ) -> Regatta {
        let leader = leader.to_string();
        let interval = metadata_interval_ms.to_string();
        let mut flags = vec![
            "--replication.leader-address",
            leader.as_str(),
            "--replication.metadata-interval-ms",
            interval.as_str(),
        ];
        flags.extend_from_slice(extra);
        Regatta::spawn_as("follower", "info", dir, api, raft, &flags)
    }

    /// Starts member `id` of a follower cluster whose
    /// `--raft.initial-members` is `members`, replicating from `leader`.
    #[allow(clippy::too_many_arguments)]
    pub fn start_follower_member(
        dir: &Path,
        id: u64,
        api: SocketAddr,
        raft: SocketAddr,
        members: &str,
        leader: impl std::fmt::Display,
        extra: &[&str],
    ) -> Regatta {
        let flags = member_flags(id, members, extra);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Regatta::start_follower(dir, api, raft, leader, &flags)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.with_extension("log")).unwrap_or_default()
    }

    fn spawn_as(
        subcommand: &str,
        level: &str,
        dir: &Path,
        api: SocketAddr,
        raft: SocketAddr,
        flags: &[&str],
    ) -> Regatta {
        Regatta::spawn_with_raft_address(
            subcommand,
            level,
            dir,
            api,
            raft,
            &raft.to_string(),
            flags,
        )
    }

    fn spawn_with_raft_address(
        subcommand: &str,
        level: &str,
        dir: &Path,
        api: SocketAddr,
        raft: SocketAddr,
        raft_address: &str,
        flags: &[&str],
    ) -> Regatta {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_regatta"))
            .args([subcommand, "--log-level", level])
            .arg("--data-dir")
            .arg(dir)
            .arg("--api.address")
            .arg(api.to_string())
            .arg("--raft.address")
            .arg(raft_address)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn regatta");
        Regatta {
            child,
            api,
            raft,
            dir: dir.to_path_buf(),
        }
    }

    /// The endpoint for clients.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.api)
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Regatta {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A client connected once the node serves the etcd table.
pub async fn connect(regatta: &Regatta) -> etcd_client::Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut client) = etcd_client::Client::connect([regatta.endpoint()], None).await {
            if client.get("ready-probe", None).await.is_ok() {
                return client;
            }
        }
        if Instant::now() >= deadline {
            let log =
                std::fs::read_to_string(regatta.dir.with_extension("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "regatta on {} never served; the end of its log:\n{}",
                regatta.api,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GET `path` from an HTTP/1.1 server: the status code and the body;
/// `None` if the server cannot be reached.
pub fn http_get(address: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(2)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body)?;
    Some((status, body.to_string()))
}

/// Polls `path` until it answers `status`; returns the body.
pub fn wait_for_http(address: SocketAddr, path: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = http_get(address, path);
        if let Some((code, body)) = &answer {
            if *code == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} on {address} never answered {status}; last: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A key, its value, create and mod revision and version.
pub type Row = (Vec<u8>, Vec<u8>, i64, i64, i64);

/// Every key of the etcd table with its value and revisions: from this
/// node's own copy when `serializable`, else linearizable.
pub async fn everything(client: &mut etcd_client::Client, serializable: bool) -> Vec<Row> {
    let mut options = etcd_client::GetOptions::new().with_from_key();
    if serializable {
        options = options.with_serializable();
    }
    let response = client.get(vec![0u8], Some(options)).await.expect("range");
    response
        .kvs()
        .iter()
        .map(|kv| {
            (
                kv.key().to_vec(),
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
            )
        })
        .collect()
}
