//! TLS on every link, with real processes on 127.0.0.1: a leader cluster
//! of three nodes whose client API, Raft peers and replication API all
//! speak mutual TLS with allowed common names, and a follower cluster that
//! replicates it over mutual TLS while serving its own API in plain text.
//! Clients without a certificate, with a certificate of another CA or with
//! a common name that is not allowed are refused; etcdctl works with its
//! TLS flags; a certificate rewritten on disk is served without a restart;
//! bad TLS flags stop the node with a clear message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_address, members, Regatta};
use rcgen::{BasicConstraints, Certificate, CertificateParams, DnType, IsCa, KeyPair};
use regatta_server::proto::regatta::v1 as pb;
use regatta_server::tls::{ClientTls, ClientTlsOptions, Identity, Pem};

/// A CA that issues certificates into a directory.
struct Authority {
    certificate: Certificate,
    key: KeyPair,
    dir: PathBuf,
    name: String,
}

impl Authority {
    fn new(dir: &Path, name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        let key = KeyPair::generate().expect("key");
        let certificate = params.self_signed(&key).expect("CA");
        std::fs::write(dir.join(format!("{name}-ca.crt")), certificate.pem()).expect("write");
        Authority {
            certificate,
            key,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    /// Issues a certificate with common name `cn` for 127.0.0.1 into
    /// `<file>.crt` and `<file>.key`; returns their paths and the
    /// certificate's DER.
    fn issue(&self, file: &str, cn: &str) -> (PathBuf, PathBuf, Vec<u8>) {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().expect("key");
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("sign");
        let certificate_file = self.dir.join(format!("{file}.crt"));
        let key_file = self.dir.join(format!("{file}.key"));
        std::fs::write(&certificate_file, certificate.pem()).expect("write");
        std::fs::write(&key_file, key.serialize_pem()).expect("write");
        (certificate_file, key_file, certificate.der().to_vec())
    }
}

fn path(file: &Path) -> String {
    file.display().to_string()
}

/// TLS towards a server, as a client with `identity` (certificate, key).
fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> ClientTls {
    let options = ClientTlsOptions {
        ca: Pem::File(ca.to_path_buf()),
        identity: identity.map(|(certificate, key)| Identity {
            certificate_chain: Pem::File(certificate.to_path_buf()),
            key: Pem::File(key.to_path_buf()),
        }),
        alpn_protocols: Vec::new(),
    };
    ClientTls::new(&options, None).expect("client TLS")
}

/// Puts `key` through the regatta.v1 API at `address`.
async fn put(address: &str, tls: Option<&ClientTls>, key: &str) -> Result<(), String> {
    let endpoint = regatta_server::tls::endpoint(address, tls).map_err(|e| e.to_string())?;
    let channel = regatta_server::tls::connect(endpoint, tls)
        .await
        .map_err(|e| e.to_string())?;
    pb::kv_client::KvClient::new(channel)
        .put(pb::PutRequest {
            table: b"etcd".to_vec(),
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            prev_kv: false,
        })
        .await
        .map(|_| ())
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
}

/// Whether `key` is in the etcd table at `address`.
async fn has_key(address: &str, tls: Option<&ClientTls>, key: &str) -> Result<bool, String> {
    let endpoint = regatta_server::tls::endpoint(address, tls).map_err(|e| e.to_string())?;
    let channel = regatta_server::tls::connect(endpoint, tls)
        .await
        .map_err(|e| e.to_string())?;
    let response = pb::kv_client::KvClient::new(channel)
        .range(pb::RangeRequest {
            table: b"etcd".to_vec(),
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?;
    Ok(response.into_inner().count == 1)
}

/// Retries `put` until the cluster has a leader.
async fn put_when_ready(address: &str, tls: &ClientTls, key: &str, nodes: &[&Regatta]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match put(address, Some(tls), key).await {
            Ok(()) => return,
            Err(error) if Instant::now() >= deadline => {
                let logs: Vec<String> = nodes.iter().map(|node| node.log()).collect();
                panic!("the TLS cluster never took a write: {error}\nlogs:\n{logs:#?}");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The leaf certificate a TLS server at `address` presents now, to a
/// client with `identity`.
async fn served_certificate(
    address: std::net::SocketAddr,
    ca: &Path,
    identity: (&Path, &Path),
) -> Vec<u8> {
    let config = regatta_server::tls::client_config(&ClientTlsOptions {
        ca: Pem::File(ca.to_path_buf()),
        identity: Some(Identity {
            certificate_chain: Pem::File(identity.0.to_path_buf()),
            key: Pem::File(identity.1.to_path_buf()),
        }),
        alpn_protocols: vec![b"h2".to_vec()],
    })
    .expect("client config");
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(&config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate");
    chain[0].to_vec()
}

fn etcdctl_available() -> bool {
    if Command::new("etcdctl").arg("version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var_os("REGATTA_REQUIRE_ETCDCTL").is_none(),
        "etcdctl is not installed: `apt-get install etcd-client`"
    );
    eprintln!("SKIPPED the etcdctl part: etcdctl is not installed");
    false
}

fn etcdctl(arguments: &[String]) -> (bool, String) {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--dial-timeout=3s", "--command-timeout=5s"])
        .args(arguments)
        .output()
        .expect("etcdctl");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_on_every_link() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Authority::new(dir.path(), "cluster");
    let rogue = Authority::new(dir.path(), "rogue");
    let (node_crt, node_key, first_der) = pki.issue("node", "node");
    let (admin_crt, admin_key, _) = pki.issue("admin", "admin");
    let (stranger_crt, stranger_key, _) = pki.issue("stranger", "stranger");
    let (follower_crt, follower_key, _) = pki.issue("follower", "follower");
    let (rogue_crt, rogue_key, _) = rogue.issue("rogue-admin", "admin");
    let ca = pki.ca_file();

    let apis: Vec<_> = (0..3).map(|_| free_address()).collect();
    let rafts: Vec<_> = (0..3).map(|_| free_address()).collect();
    let replications: Vec<_> = (0..3).map(|_| free_address()).collect();
    let replication = replications[0];
    let initial = members(&rafts);
    let replication_address = replication.to_string();
    let mut flags: Vec<String> = [
        "--api.cert-filename",
        &path(&node_crt),
        "--api.key-filename",
        &path(&node_key),
        "--api.ca-filename",
        &path(&ca),
        "--api.allowed-cn",
        "admin,node",
        "--raft.cert-filename",
        &path(&node_crt),
        "--raft.key-filename",
        &path(&node_key),
        "--raft.ca-filename",
        &path(&ca),
        "--raft.allowed-cn",
        "node",
        "--replication.cert-filename",
        &path(&node_crt),
        "--replication.key-filename",
        &path(&node_key),
        "--replication.ca-filename",
        &path(&ca),
        "--replication.allowed-cn",
        "follower",
    ]
    .iter()
    .map(|flag| flag.to_string())
    .collect();
    let mut nodes = Vec::new();
    for index in 0..3 {
        let node_dir = dir.path().join(format!("node{}", index + 1));
        let mut node_flags = flags.clone();
        node_flags.extend([
            "--replication.address".to_string(),
            replications[index].to_string(),
        ]);
        let node_flags: Vec<&str> = node_flags.iter().map(String::as_str).collect();
        nodes.push(Regatta::start_member(
            &node_dir,
            index as u64 + 1,
            apis[index],
            rafts[index],
            &initial,
            &node_flags,
        ));
    }
    flags.clear();
    let admin = client_tls(&ca, Some((&admin_crt, &admin_key)));
    let address = apis[0].to_string();
    let refs: Vec<&Regatta> = nodes.iter().collect();
    put_when_ready(&address, &admin, "first", &refs).await;
    // Written through node 1 and replicated over TLS peers: node 3 has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_key(&apis[2].to_string(), Some(&admin), "first")
        .await
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "node 3 never got the write");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Refusals: plain text, no certificate, a common name not allowed,
    // another CA.
    let plain = put(&address, None, "plain").await;
    assert!(plain.is_err(), "a plain-text client was served");
    let anonymous = client_tls(&ca, None);
    let refused = put(&address, Some(&anonymous), "anonymous").await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    let stranger = client_tls(&ca, Some((&stranger_crt, &stranger_key)));
    let refused = put(&address, Some(&stranger), "stranger").await;
    assert!(refused.is_err(), "a common name not allowed was served");
    let impostor = client_tls(&ca, Some((&rogue_crt, &rogue_key)));
    let refused = put(&address, Some(&impostor), "impostor").await;
    assert!(refused.is_err(), "a certificate of another CA was served");
    assert!(
        nodes[0].log().contains("common name not allowed"),
        "the refusal of the stranger is not logged:\n{}",
        nodes[0].log()
    );

    // etcdctl with its TLS flags.
    if etcdctl_available() {
        let tls_flags = [
            format!("--endpoints=https://{address}"),
            format!("--cacert={}", path(&ca)),
            format!("--cert={}", path(&admin_crt)),
            format!("--key={}", path(&admin_key)),
        ];
        let mut put_args = tls_flags.to_vec();
        put_args.extend(["put".to_string(), "from-etcdctl".into(), "tls".into()]);
        let (success, text) = etcdctl(&put_args);
        assert!(success, "etcdctl put over mutual TLS failed: {text}");
        let mut get_args = tls_flags.to_vec();
        get_args.extend(["get".to_string(), "from-etcdctl".into()]);
        let (success, text) = etcdctl(&get_args);
        assert!(success && text.contains("tls"), "etcdctl get: {text}");
        let (success, text) = etcdctl(&[
            format!("--endpoints=https://{address}"),
            format!("--cacert={}", path(&ca)),
            "get".into(),
            "from-etcdctl".into(),
        ]);
        assert!(
            !success,
            "etcdctl without a client certificate was served: {text}"
        );
    }

    // The regatta CLI with the same flags as etcdctl.
    let output = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(["kv", "get", "etcd", "first", "--address", &address])
        .args(["--cacert", &path(&ca), "--cert", &path(&admin_crt)])
        .args(["--key", &path(&admin_key)])
        .output()
        .expect("regatta kv get");
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("first"),
        "regatta kv get over mutual TLS: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // The load tool with the same flags, and refused without the client
    // certificate the API requires.
    let bench = |with_identity: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_regatta"));
        command
            .args([
                "bench",
                "put",
                "--total",
                "200",
                "--clients",
                "4",
                "--conns",
                "2",
            ])
            .args(["--endpoints", &format!("https://{address}")])
            .args(["--cacert", &path(&ca)]);
        if with_identity {
            command
                .args(["--cert", &path(&admin_crt)])
                .args(["--key", &path(&admin_key)]);
        }
        command.output().expect("regatta bench")
    };
    let output = bench(true);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("total=200") && stdout.contains("errors=0"),
        "regatta bench over mutual TLS: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = bench(false);
    assert!(
        !output.status.success(),
        "regatta bench without a client certificate was served: {}",
        String::from_utf8_lossy(&output.stdout)
    );

    // A follower cluster replicating over mutual TLS, its own API plain.
    let follower_dir = dir.path().join("follower");
    let follower_api = free_address();
    let follower = Regatta::start_follower(
        &follower_dir,
        follower_api,
        free_address(),
        replication,
        &[
            "--replication.cert-filename",
            &path(&follower_crt),
            "--replication.key-filename",
            &path(&follower_key),
            "--replication.ca-filename",
            &path(&ca),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if has_key(&follower_api.to_string(), None, "first")
            .await
            .unwrap_or(false)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower never replicated over TLS; its log:\n{}",
            follower.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The replication API refuses a certificate that is not the follower's.
    let mut stranger_replication = regatta_replication::proto::metadata_client::MetadataClient::new(
        regatta_server::tls::connect_lazy(
            regatta_server::tls::endpoint(&replication_address, Some(&stranger)).expect("endpoint"),
            Some(&stranger),
        ),
    );
    let refused = stranger_replication
        .get(regatta_replication::proto::MetadataRequest {})
        .await;
    assert!(refused.is_err(), "the replication API served a stranger");

    // Rotate the certificate on disk: new connections get the new one,
    // without a restart, and the cluster goes on taking writes.
    assert_eq!(
        served_certificate(apis[0], &ca, (&admin_crt, &admin_key)).await,
        first_der
    );
    let (_, _, rotated_der) = pki.issue("node", "node");
    assert_ne!(rotated_der, first_der);
    let deadline = Instant::now() + Duration::from_secs(10);
    while served_certificate(apis[0], &ca, (&admin_crt, &admin_key)).await != rotated_der {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    put(&address, Some(&admin), "after-rotation")
        .await
        .expect("a write after the rotation");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_key(&follower_api.to_string(), None, "after-rotation")
        .await
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < deadline,
            "the follower stopped replicating after the rotation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `regatta leader --dev` with `flags` and expects it to stop at once
/// with a message containing `expected`.
/// GET `path` over TLS (HTTP/1.1) from `address`, as a client with
/// `identity`: the status and the body, or why it failed.
async fn https_get(
    address: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    path: &str,
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = regatta_server::tls::client_config(&ClientTlsOptions {
        ca: Pem::File(ca.to_path_buf()),
        identity: identity.map(|(certificate, key)| Identity {
            certificate_chain: Pem::File(certificate.to_path_buf()),
            key: Pem::File(key.to_path_buf()),
        }),
        alpn_protocols: vec![b"http/1.1".to_vec()],
    })
    .map_err(|error| error.to_string())?;
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|error| error.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(address.ip().into());
    let mut stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|error| format!("handshake: {error}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("write: {error}"))?;
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .map_err(|_| "no response within 10 s".to_string())?
    .map_err(|error| format!("read: {error}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// `/metrics` and `/healthz` over mutual TLS: a scraper with an allowed
/// certificate reads them; no certificate, a certificate whose common name
/// is not allowed, and plain HTTP get nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_speak_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Authority::new(dir.path(), "ops");
    let (node_crt, node_key, _) = pki.issue("node", "node");
    let (scraper_crt, scraper_key, _) = pki.issue("scraper", "prometheus");
    let (other_crt, other_key, _) = pki.issue("other", "someone-else");
    let rest = free_address();
    let rest_flag = rest.to_string();
    let (node_crt, node_key, ca) = (path(&node_crt), path(&node_key), path(&pki.ca_file()));
    let _node = Regatta::start_on(
        &dir.path().join("data"),
        free_address(),
        free_address(),
        &[
            "--rest.address",
            &rest_flag,
            "--rest.cert-filename",
            &node_crt,
            "--rest.key-filename",
            &node_key,
            "--rest.ca-filename",
            &ca,
            "--rest.allowed-cn",
            "prometheus",
        ],
    );
    let scraper = Some((scraper_crt.as_path(), scraper_key.as_path()));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match https_get(rest, &pki.ca_file(), scraper, "/healthz").await {
            Ok((200, body)) => {
                assert_eq!(body, "ok\n");
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "/healthz over TLS never answered 200; last: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, metrics) = https_get(rest, &pki.ca_file(), scraper, "/metrics")
        .await
        .expect("metrics over TLS");
    assert_eq!(status, 200);
    assert!(metrics.contains("regatta_"), "{metrics}");
    let anonymous = https_get(rest, &pki.ca_file(), None, "/metrics").await;
    assert!(anonymous.is_err(), "no client certificate: {anonymous:?}");
    let other = Some((other_crt.as_path(), other_key.as_path()));
    let refused = https_get(rest, &pki.ca_file(), other, "/metrics").await;
    assert!(refused.is_err(), "a common name not allowed: {refused:?}");
    let plain = common::http_get(rest, "/metrics");
    assert!(
        plain.as_ref().is_none_or(|(status, _)| *status != 200),
        "plain HTTP: {plain:?}"
    );
}

fn refused_at_start(dir: &Path, flags: &[&str], expected: &str) {
    let output = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(["leader", "--dev", "--data-dir"])
        .arg(dir)
        .arg("--api.address")
        .arg(free_address().to_string())
        .arg("--raft.address")
        .arg(free_address().to_string())
        .args(flags)
        .output()
        .expect("run regatta");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{flags:?} was accepted");
    assert!(
        stderr.contains(expected),
        "{flags:?}: expected {expected:?} in:\n{stderr}"
    );
}

#[test]
fn bad_tls_flags_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Authority::new(dir.path(), "cluster");
    let (crt, key, _) = pki.issue("node", "node");
    let (other_crt, _, _) = pki.issue("other", "other");
    let data = dir.path().join("data");
    let crt = path(&crt);
    let key = path(&key);
    refused_at_start(
        &data,
        &["--api.cert-filename", &crt],
        "--api.cert-filename needs --api.key-filename",
    );
    refused_at_start(
        &data,
        &[
            "--api.cert-filename",
            &crt,
            "--api.key-filename",
            &key,
            "--api.allowed-cn",
            "admin",
        ],
        "--api.allowed-cn needs --api.ca-filename",
    );
    refused_at_start(
        &data,
        &["--rest.cert-filename", &crt],
        "--rest.cert-filename needs --rest.key-filename",
    );
    refused_at_start(
        &data,
        &["--rest.cert-filename", &crt, "--rest.key-filename", &key],
        "--rest.cert-filename and --rest.key-filename need --rest.address",
    );
    refused_at_start(
        &data,
        &["--raft.cert-filename", &crt, "--raft.key-filename", &key],
        "--raft.cert-filename needs --raft.ca-filename",
    );
    refused_at_start(
        &data,
        &[
            "--api.cert-filename",
            "/nonexistent/node.crt",
            "--api.key-filename",
            &key,
        ],
        "/nonexistent/node.crt",
    );
    refused_at_start(
        &data,
        &[
            "--api.cert-filename",
            &path(&other_crt),
            "--api.key-filename",
            &key,
        ],
        "do not form an identity",
    );
    refused_at_start(
        &data,
        &[
            "--replication.cert-filename",
            &crt,
            "--replication.key-filename",
            &key,
        ],
        "need --replication.address",
    );
}
