//! The `regatta` command line: `--help`, `version`, a YAML `--config` with
//! environment overrides, the `kv` and `table` client commands with text
//! and JSON output, and `bench` against a real node.

mod common;

use std::process::Command;

use common::{connect, free_address, Regatta};

fn regatta(arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(arguments)
        .output()
        .expect("run regatta");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn help_and_version_explain_themselves() {
    let (success, help, _) = regatta(&["leader", "--help"]);
    assert!(success);
    for flag in [
        "--dev",
        "--raft.node-id",
        "--raft.initial-members",
        "--api.address",
        "--data-dir",
        "--etcd.table",
        "--config",
        "REGATTA_RAFT_NODE_ID",
        "--api.cert-filename",
        "--api.ca-filename",
        "--raft.ca-filename",
        "--replication.ca-filename",
        "--api.admin-token-file",
        "--raft.join",
        "--raft.leave-on-terminate",
        "--log-format",
    ] {
        assert!(help.contains(flag), "leader --help lacks {flag}:\n{help}");
    }
    let (success, version, _) = regatta(&["version"]);
    assert!(success && version.starts_with("regatta "), "{version}");
    let (success, _, error) = regatta(&[
        "leader",
        "--raft.node-id",
        "0",
        "--data-dir",
        "/nonexistent/x",
    ]);
    assert!(
        !success && error.contains("--raft.node-id must be non-zero"),
        "{error}"
    );
}

/// The apply threads of process `pid` (Linux names threads in /proc).
fn apply_threads(pid: u32) -> usize {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read the process's threads");
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "regatta-apply")
        .count()
}

/// Start-up mistakes an operator makes are refused before anything starts,
/// naming the flag: cluster flags with `--dev`, a zero request timeout,
/// a worker count out of range, a data directory that is a file, and a peer port already taken.
#[test]
fn start_up_mistakes_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data_flag = data.display().to_string();
    let (success, _, error) = regatta(&[
        "leader",
        "--dev",
        "--raft.initial-members",
        "1=127.0.0.1:5011,2=127.0.0.1:5012",
        "--data-dir",
        &data_flag,
    ]);
    assert!(
        !success && error.contains("--dev") && error.contains("--raft.initial-members"),
        "{error}"
    );
    // On/off variables take 1/0, yes/no and on/off too: REGATTA_RAFT_JOIN
    // set to "yes" is a --raft.join, which --dev refuses.
    let output = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(["leader", "--dev", "--data-dir", &data_flag])
        .env("REGATTA_RAFT_JOIN", "yes")
        .output()
        .expect("run regatta");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && error.contains("--raft.join"),
        "{error}"
    );
    let (success, _, error) = regatta(&[
        "leader",
        "--api.request-timeout-ms",
        "0",
        "--data-dir",
        &data_flag,
    ]);
    assert!(
        !success && error.contains("--api.request-timeout-ms"),
        "{error}"
    );
    for workers in ["0", "257"] {
        let (success, _, error) = regatta(&[
            "leader",
            "--dev",
            "--raft.workers",
            workers,
            "--data-dir",
            &data_flag,
        ]);
        assert!(
            !success && error.contains("--raft.workers") && error.contains("1..=256"),
            "{workers}: {error}"
        );
    }
    // Peer addresses may be names, but must be well formed; listening
    // addresses must be IP addresses.
    for (flag, value, says) in [
        (
            "--raft.initial-members",
            "1=local host:5011",
            "' ' may not appear",
        ),
        ("--raft.initial-members", "1=localhost", "no port"),
        (
            "--raft.initial-members",
            "1=http://localhost:5011",
            "without a scheme",
        ),
        ("--raft.address", "localhost:0", "the port must not be 0"),
        ("--raft.peer-addresses", "4=::1:5011", "in brackets"),
        (
            "--api.address",
            "localhost:8443",
            "listening addresses are not resolved",
        ),
        (
            "--raft.listen-address",
            "node1:5012",
            "listening addresses are not resolved",
        ),
    ] {
        let (success, _, error) = regatta(&["leader", flag, value, "--data-dir", &data_flag]);
        assert!(!success && error.contains(says), "{flag} {value}: {error}");
    }
    // A name that does not resolve fails the start with the flag named.
    let (success, _, error) = regatta(&[
        "leader",
        "--raft.address",
        "no-such-host.invalid:5011",
        "--data-dir",
        &data_flag,
    ]);
    assert!(
        !success
            && error.contains("listen for peers on no-such-host.invalid:5011 (--raft.address)"),
        "{error}"
    );
    // --api.advertise-address must be a URL clients can use.
    for (value, says) in [
        ("127.0.0.1:8443", "not a URL"),
        ("ftp://127.0.0.1:8443", "must be http or https"),
        ("https://127.0.0.1:8443", "serves plain text"),
        ("http://127.0.0.1", "no port"),
        ("http://127.0.0.1:0", "a port from 1 to 65535"),
        ("http://node-1:8443/v3", "no path"),
        ("http://0.0.0.0:8443", "not one clients can reach"),
        ("http://[::]:8443", "not one clients can reach"),
        ("http://node-1:+80", "a port from 1 to 65535"),
        ("http://[zzz]:8443", "IPv6 in brackets"),
        ("http://[::1]", "no port"),
        ("http://no de:8443", "a host name or IP address"),
    ] {
        let (success, _, error) = regatta(&[
            "leader",
            "--dev",
            "--api.advertise-address",
            value,
            "--data-dir",
            &data_flag,
        ]);
        assert!(
            !success && error.contains("--api.advertise-address") && error.contains(says),
            "{value}: {error}"
        );
    }
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").expect("write");
    let file_flag = file.display().to_string();
    let (api, raft) = (free_address().to_string(), free_address().to_string());
    let (success, _, error) = regatta(&[
        "leader",
        "--dev",
        "--data-dir",
        &file_flag,
        "--api.address",
        &api,
        "--raft.address",
        &raft,
    ]);
    assert!(
        !success && error.contains("is a file, not a directory (--data-dir)"),
        "{error}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_flag = taken.local_addr().expect("address").to_string();
    let (success, _, error) = regatta(&[
        "leader",
        "--dev",
        "--data-dir",
        &data_flag,
        "--api.address",
        &api,
        "--raft.address",
        &taken_flag,
    ]);
    assert!(!success && error.contains("(--raft.address)"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_with_env_overrides_and_the_client_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, raft, unused) = (free_address(), free_address(), free_address());
    // The file names one API address, the environment another: the
    // environment wins over the file.
    let config = dir.path().join("regatta.yaml");
    std::fs::write(
        &config,
        format!("dev: true\napi:\n  address: {unused}\nraft:\n  address: {raft}\n  workers: 3\n"),
    )
    .expect("config");
    let data = dir.path().join("node");
    let log = std::fs::File::create(dir.path().join("node.log")).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(["leader", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env("REGATTA_API_ADDRESS", api.to_string())
        .env("REGATTA_LOG_LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let node = Regatta {
        child,
        api,
        raft,
        dir: data,
    };
    drop(connect(&node).await);
    // raft.workers from the file: one apply thread per worker.
    let apply_threads = apply_threads(node.child.id());
    assert_eq!(apply_threads, 3, "raft.workers: 3 in the file");
    let address = api.to_string();
    let a = address.as_str();

    let (success, out, error) = regatta(&["table", "create", "users", "--address", a]);
    assert!(success, "{error}");
    assert!(out.starts_with("created table users"), "{out}");
    let (success, out, _) = regatta(&["table", "list", "--address", a, "-o", "json"]);
    assert!(success && out.contains("\"name\":\"users\""), "{out}");
    let (success, out, error) = regatta(&["kv", "put", "users", "k1", "v1", "--address", a]);
    assert!(success && out.trim() == "OK", "{out}{error}");
    let (success, out, _) = regatta(&["kv", "get", "users", "k", "--prefix", "--address", a]);
    assert!(success && out == "k1\nv1\n", "{out}");
    let (success, out, _) = regatta(&[
        "kv",
        "txn",
        "users",
        "--if-value",
        "k1=v1",
        "--then",
        "put:k1=v2",
        "--else",
        "delete:k1",
        "--address",
        a,
    ]);
    assert!(success && out.trim() == "SUCCESS", "{out}");
    let (success, out, _) = regatta(&["kv", "get", "users", "k1", "-o", "json", "--address", a]);
    assert!(success && out.contains("\"value\":\"v2\""), "{out}");
    let (success, out, _) = regatta(&["kv", "delete", "users", "k", "--prefix", "--address", a]);
    assert!(success && out.trim() == "1", "{out}");
    let (success, _, error) = regatta(&["kv", "get", "nope", "k", "--address", a]);
    assert!(!success && error.contains("NotFound"), "{error}");
    let (success, out, error) = regatta(&[
        "bench",
        "put",
        "--endpoints",
        a,
        "--total",
        "200",
        "--clients",
        "8",
        "--conns",
        "2",
    ]);
    assert!(success, "{error}");
    assert!(
        out.contains("RESULT workload=Put total=200") && out.contains("errors=0"),
        "{out}"
    );
    // A value over the server's limit: every put fails, and the tool says
    // how, from the gRPC status the server sent.
    let (success, out, error) = regatta(&[
        "bench",
        "put",
        "--endpoints",
        a,
        "--total",
        "3",
        "--clients",
        "1",
        "--conns",
        "1",
        "--val-size",
        "3000000",
    ]);
    assert!(!success, "{out}");
    assert!(out.contains("errors=3"), "{out}");
    assert!(
        error.contains("3 requests failed")
            && error.contains("grpc-status \"8\": value of 3000000 bytes is over the limit"),
        "{error}"
    );
    let (success, out, error) = regatta(&["status", "--address", a]);
    assert!(success, "{error}");
    assert!(out.contains("leader cluster node"), "{out}");
    let users = out
        .lines()
        .find(|line| line.starts_with("users "))
        .unwrap_or_else(|| panic!("no line for table users in:\n{out}"));
    assert_eq!(
        users.split_whitespace().nth(1),
        Some("1"),
        "the leader: {users}"
    );
    let (success, out, _) = regatta(&["status", "--address", a, "-o", "json"]);
    assert!(success && out.contains("\"name\":\"etcd\""), "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(
        status["wal_size_bytes"].as_u64().expect("WAL size") > 0,
        "{out}"
    );
    assert!(
        status["wal_segments"].as_u64().expect("WAL segments") >= 1,
        "{out}"
    );
    let users_json = status["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|table| table["name"] == "users")
        .expect("users");
    assert!(
        users_json["log_size_bytes"].as_i64().expect("log size") > 0,
        "{out}"
    );
    let (success, out, _) = regatta(&["table", "delete", "users", "--address", a]);
    assert!(success && out.contains("deleted table users"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_operations_need_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-admin-token-0123456789\n").expect("write");
    let data = dir.path().join("data");
    let token_flag = token_file.display().to_string();
    let node = common::Regatta::start_on(
        &data,
        common::free_address(),
        common::free_address(),
        &[
            "--api.admin-token-file",
            &token_flag,
            "--log-format",
            "json",
            "--log-level",
            "info",
        ],
    );
    let _ready = common::connect(&node).await;
    // JSON logs: every line is one object with a level and a message.
    let log = node.log();
    assert!(log.lines().count() > 0, "no log lines");
    for line in log.lines() {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
    let address = node.api.to_string();
    let (success, _, stderr) = regatta(&["table", "create", "orders", "--address", &address]);
    assert!(!success, "a table was created without the token");
    assert!(
        stderr.contains("Unauthenticated") && stderr.contains("admin token"),
        "{stderr}"
    );
    let (success, _, stderr) = regatta(&[
        "table",
        "create",
        "orders",
        "--address",
        &address,
        "--token",
        "s3cret-admin-token-012345678",
    ]);
    assert!(!success, "a wrong token was accepted");
    assert!(stderr.contains("wrong"), "{stderr}");
    let (success, stdout, stderr) = regatta(&[
        "table",
        "create",
        "orders",
        "--address",
        &address,
        "--token",
        "s3cret-admin-token-0123456789",
    ]);
    assert!(success, "the right token was refused: {stderr}");
    assert!(stdout.contains("created table orders"), "{stdout}");
    // Reading needs no token; the token never shows in the log.
    let (success, stdout, stderr) = regatta(&["table", "list", "--address", &address]);
    assert!(success, "{stderr}");
    assert!(stdout.contains("orders"), "{stdout}");
    assert!(!node.log().contains("s3cret"), "the token is in the log");
    // etcdctl presents the token as user root's password.
    if Command::new("etcdctl").arg("version").output().is_ok() {
        let etcdctl = |user: Option<&str>, arguments: &[&str]| {
            let mut command = Command::new("etcdctl");
            command
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={address}"))
                .arg("--dial-timeout=3s");
            if let Some(user) = user {
                command.arg(format!("--user={user}"));
            }
            let output = command.args(arguments).output().expect("etcdctl");
            (
                output.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&output.stdout),
                    String::from_utf8_lossy(&output.stderr)
                ),
            )
        };
        let peer = format!("--peer-urls=http://{}", common::free_address());
        let add = ["member", "add", "learner", peer.as_str(), "--learner"];
        let (success, text) = etcdctl(None, &add);
        assert!(!success, "etcdctl added a member without the token: {text}");
        let (success, text) = etcdctl(Some("root:wrong-token-0123456789"), &add);
        assert!(!success, "etcdctl with a wrong password: {text}");
        let (success, text) = etcdctl(Some("root:s3cret-admin-token-0123456789"), &add);
        assert!(success, "etcdctl --user root:<token> member add: {text}");
    } else {
        assert!(
            std::env::var_os("REGATTA_REQUIRE_ETCDCTL").is_none(),
            "etcdctl is not installed"
        );
    }
    // A token that is too short is refused at start.
    std::fs::write(&token_file, "short").expect("write");
    let (success, _, stderr) = regatta(&[
        "leader",
        "--dev",
        "--data-dir",
        &dir.path().join("other").display().to_string(),
        "--api.admin-token-file",
        &token_flag,
    ]);
    assert!(!success);
    assert!(stderr.contains("shorter than 16"), "{stderr}");
}
