//! etcdctl (3.4, the OS package `etcd-client`), unmodified, against a real
//! `regatta` process. Without etcdctl the test says so and skips, unless
//! `REGATTA_REQUIRE_ETCDCTL` is set, as `.ci/run` does after installing it.

mod common;

use std::process::Command;

use common::{connect, Regatta};

fn etcdctl(endpoint: &str, arguments: &[&str], input: Option<&str>) -> (bool, String) {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(arguments);
    let output = if let Some(input) = input {
        use std::io::Write;
        let mut child = command
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("etcdctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        child.wait_with_output().expect("etcdctl")
    } else {
        command.output().expect("etcdctl")
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn ok(endpoint: &str, arguments: &[&str]) -> String {
    let (success, text) = etcdctl(endpoint, arguments, None);
    assert!(success, "etcdctl {arguments:?} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_works_unmodified() {
    if Command::new("etcdctl").arg("version").output().is_err() {
        // CI installs etcdctl and sets REGATTA_REQUIRE_ETCDCTL, so there
        // this test cannot be skipped.
        assert!(
            std::env::var("REGATTA_REQUIRE_ETCDCTL").is_err(),
            "etcdctl is not installed: `apt-get install etcd-client`"
        );
        eprintln!("SKIPPED: etcdctl is not installed (`apt-get install etcd-client`)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let regatta = Regatta::start(&dir.path().join("node"));
    drop(connect(&regatta).await);
    let endpoint = regatta.api.to_string();
    let e = endpoint.as_str();

    assert_eq!(ok(e, &["put", "fruit/apple", "red"]).trim(), "OK");
    ok(e, &["put", "fruit/banana", "yellow"]);
    ok(e, &["put", "veg/carrot", "orange"]);
    assert_eq!(ok(e, &["get", "fruit/apple"]), "fruit/apple\nred\n");
    assert_eq!(
        ok(e, &["get", "--prefix", "fruit/"]),
        "fruit/apple\nred\nfruit/banana\nyellow\n"
    );
    assert_eq!(
        ok(e, &["get", "--prefix", "--keys-only", "fruit/"]),
        "fruit/apple\n\nfruit/banana\n\n"
    );
    assert_eq!(
        ok(e, &["get", "--from-key", "fruit/b", "--limit", "1"]),
        "fruit/banana\nyellow\n"
    );
    assert_eq!(
        ok(e, &["get", "fruit/apple", "--consistency=s"]),
        "fruit/apple\nred\n"
    );
    let json = ok(e, &["get", "--prefix", "fruit/", "-w", "json"]);
    assert!(json.contains("\"count\":2"), "{json}");
    let revision = json
        .split("\"revision\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .expect("a revision")
        .to_string();
    assert_eq!(
        ok(e, &["get", "fruit/apple", "--rev", &revision]),
        "fruit/apple\nred\n"
    );

    let txn = "value(\"fruit/apple\") = \"red\"\nversion(\"fruit/apple\") = \"1\"\nmod(\"veg/carrot\") > \"0\"\ncreate(\"missing\") = \"0\"\n\nput fruit/apple green\n\nput fruit/apple wrong\n\n";
    let (success, text) = etcdctl(e, &["txn"], Some(txn));
    assert!(success && text.starts_with("SUCCESS"), "{text}");
    assert_eq!(
        ok(e, &["get", "fruit/apple", "--print-value-only"]),
        "green\n"
    );

    assert_eq!(
        ok(e, &["del", "--prefix", "--prev-kv", "fruit/"]),
        "2\nfruit/apple\ngreen\nfruit/banana\nyellow\n"
    );
    assert_eq!(ok(e, &["del", "missing"]), "0\n");

    let status = ok(e, &["endpoint", "status", "-w", "json"]);
    assert!(status.contains("\"leader\":1"), "{status}");
    let members = ok(e, &["member", "list"]);
    assert!(members.starts_with("1, started, node-1"), "{members}");
    // Membership verbs: a learner added and removed again (a learner never
    // counts towards the quorum, so this one need not run).
    let peer = format!("--peer-urls=http://{}", common::free_address());
    let added = ok(e, &["member", "add", "node-2", &peer, "--learner"]);
    assert!(added.contains("added"), "{added}");
    let members = ok(e, &["member", "list"]);
    assert!(
        members
            .lines()
            .any(|line| line.starts_with("2, ") && line.ends_with("true")),
        "the learner is not listed: {members}"
    );
    let (success, text) = etcdctl(e, &["member", "add", "bad", "--peer-urls=not-a-url"], None);
    assert!(!success, "a bad peer URL was accepted: {text}");
    // The learner moves: every node dials it at its new address.
    let moved = common::free_address();
    let peer = format!("--peer-urls=http://{moved}");
    let updated = ok(e, &["member", "update", "2", &peer]);
    assert!(updated.contains("updated"), "{updated}");
    let members = ok(e, &["member", "list"]);
    assert!(
        members
            .lines()
            .any(|line| line.starts_with("2, ") && line.contains(&moved.to_string())),
        "the new address is not listed: {members}"
    );
    let (success, text) = etcdctl(e, &["member", "update", "9", &peer], None);
    assert!(!success && text.contains("not a member"), "{text}");
    let removed = ok(e, &["member", "remove", "2"]);
    assert!(removed.contains("removed"), "{removed}");
    let members = ok(e, &["member", "list"]);
    assert_eq!(members.lines().count(), 1, "{members}");

    let (success, text) = etcdctl(e, &["lease", "grant", "10"], None);
    assert!(!success && text.contains("Unimplemented"), "{text}");
    let (success, text) = etcdctl(e, &["put", "", "v"], None);
    assert!(!success, "an empty key is refused: {text}");
}
