//! The CI-bounded chaos run: a 3-node leader cluster of real `regatta`
//! processes behind fault-injecting proxies, clients on every node, and
//! the nemesis's faults (kills, pauses, partitions of several shapes, slow
//! links, leadership moves, crashes during snapshot install, cutting the
//! link to a one-node follower cluster, member replacement) split over
//! three seeds so that each fault is injected at least once, then the
//! linearizability check of the history, the count of lost acknowledged
//! writes, the follower cluster's per-table sequential consistency, and
//! every node's convergence. Longer soaks:
//! `cargo run -p regatta-chaos -- --time-limit 600 --nemesis all`.

use std::time::Duration;

use regatta_chaos::checker::Verdict;
use regatta_chaos::harness::{self, Fault, RunConfig};

/// Long enough for four faults of about 2 s each, the slow ones included
/// (a member-replace's add may take seconds on a loaded debug build).
const DURATION_SECONDS: u64 = 18;

/// Each seed's faults: together every fault of the nemesis, the slow ones
/// (snapshot-crash, member-replace) in different seeds. A run deals its
/// faults like a deck, so a run long enough for four faults injects each
/// of its list once.
const SEEDS: [(u64, &[Fault]); 3] = [
    (
        1,
        &[
            Fault::Kill,
            Fault::Pause,
            Fault::Partition,
            Fault::SnapshotCrash,
        ],
    ),
    (
        2,
        &[
            Fault::IsolateLeader,
            Fault::Minority,
            Fault::Bridge,
            Fault::MemberReplace,
        ],
    ),
    (
        3,
        &[
            Fault::Slow,
            Fault::TransferLeader,
            Fault::CutLocation,
            Fault::Kill,
        ],
    ),
];

#[test]
fn the_seeds_cover_every_fault() {
    for fault in Fault::ALL {
        assert!(
            SEEDS.iter().any(|(_, faults)| faults.contains(&fault)),
            "{} is in no seed",
            fault.name()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn histories_under_every_fault_are_linearizable() {
    for (seed, faults) in SEEDS {
        let nemesis: Vec<&str> = faults.iter().map(|fault| fault.name()).collect();
        let nemesis = nemesis.join(",");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = RunConfig {
            binary: env!("CARGO_BIN_EXE_regatta").into(),
            dir: dir.path().to_path_buf(),
            nodes: 3,
            followers: 1,
            clients: 6,
            keys: 4,
            ops_per_key: 1000,
            duration: Duration::from_secs(DURATION_SECONDS),
            faults: faults.to_vec(),
            seed,
            // Some ballast, so that snapshot installs take long enough for
            // the kills of snapshot-crash to land inside some of them
            // (anomalies 4 and 5 of docs/verification.md were found so).
            ballast_bytes: 2 << 20,
        };
        let report = harness::run(config).await.expect("run");
        eprintln!(
            "seed {seed}: {} ok, {} fail, {} info; {} bytes over the peer proxies; schedule {:?}",
            report.ok, report.fail, report.info, report.peer_link_bytes, report.schedule
        );
        assert!(
            report.ok > 200,
            "seed {seed}: too few operations: {}",
            report.ok
        );
        for fault in faults {
            assert!(
                report.faults.contains(fault),
                "seed {seed}: {} never acted (acted: {:?}); it found nothing to act on, or a fault's inject or heal took longer than the run allows",
                fault.name(),
                report.faults
            );
        }
        if faults.contains(&Fault::SnapshotCrash) {
            // The node restarted behind the others' compaction can only
            // catch up by a snapshot.
            assert!(
                report.snapshots_installed > 0,
                "seed {seed}: snapshot-crash ran but no snapshot was installed"
            );
        }
        // Traffic really takes the fault-injecting links (a node that
        // dialled its peers directly would make every partition a no-op).
        assert!(
            report.peer_link_bytes > 1 << 20,
            "seed {seed}: only {} bytes crossed the peer proxies",
            report.peer_link_bytes
        );
        assert_eq!(
            report.unread_keys, 0,
            "seed {seed}: the final state could not be read after healing"
        );
        assert!(
            report.follower_reads.len() > 100,
            "seed {seed}: only {} follower reads",
            report.follower_reads.len()
        );
        assert!(
            report.follower_anomalies.is_empty(),
            "seed {seed}: the follower cluster is not sequentially consistent: {:?}",
            report.follower_anomalies
        );
        assert!(
            report.revision_anomalies.is_empty(),
            "seed {seed}: acknowledged writes took revisions out of order: {:?}",
            report.revision_anomalies
        );
        assert!(
            report.diverged.is_empty(),
            "seed {seed}: replicas never reached the final state: {:?}",
            report.diverged
        );
        if report.verdict != Verdict::Linearizable || report.lost_writes > 0 {
            let path = std::env::temp_dir().join(format!("regatta-chaos-failure-{seed}.json"));
            let _ = std::fs::write(
                &path,
                serde_json::to_vec(&report.history).unwrap_or_default(),
            );
            panic!(
                "seed {seed}: {:?}, {} lost writes; history in {}; replay: cargo run -p regatta-chaos -- --time-limit {DURATION_SECONDS} --clients 6 --keys 4 --ballast-mb 2 --nemesis {nemesis} --seed {seed}",
                report.verdict,
                report.lost_writes,
                path.display()
            );
        }
    }
}

/// Members replaced under load (removed, wiped, added back under a new
/// id) while partitions and kills go on: the history stays linearizable,
/// every replacement finishes, and every node, the new ones included,
/// reaches the final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_replaced_under_load_keep_the_history_linearizable() {
    let seed = 11u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = RunConfig {
        binary: env!("CARGO_BIN_EXE_regatta").into(),
        dir: dir.path().to_path_buf(),
        nodes: 3,
        followers: 0,
        clients: 6,
        keys: 4,
        ops_per_key: 1000,
        duration: Duration::from_secs(12),
        faults: vec![Fault::MemberReplace, Fault::MemberReplace, Fault::Partition],
        seed,
        ballast_bytes: 0,
    };
    let report = harness::run(config).await.expect("run");
    eprintln!(
        "seed {seed}: {} ok, {} fail, {} info; schedule {:?}",
        report.ok, report.fail, report.info, report.schedule
    );
    let added = report
        .schedule
        .iter()
        .filter(|(_, what)| what.starts_with("add node") && what.contains("start it empty"))
        .count();
    assert!(added >= 2, "seed {seed}: {added} replacements finished");
    assert!(
        report.ok > 200,
        "seed {seed}: too few operations: {}",
        report.ok
    );
    assert!(
        report.diverged.is_empty(),
        "seed {seed}: replicas never reached the final state: {:?}",
        report.diverged
    );
    assert!(
        report.verdict == Verdict::Linearizable && report.lost_writes == 0,
        "seed {seed}: {:?}, {} lost writes; replay: cargo run -p regatta-chaos -- --time-limit 12 --clients 6 --keys 4 --follower-nodes 0 --ballast-mb 0 --nemesis member-replace,member-replace,partition --seed {seed}",
        report.verdict,
        report.lost_writes
    );
}
