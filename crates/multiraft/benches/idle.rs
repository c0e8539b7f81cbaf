//! `cargo bench -p regatta-multiraft --bench idle`: CPU spent by idle
//! groups. 10,000 single-node groups start, elect themselves and go quiet;
//! then the process's CPU time (user + system, from /proc/self/stat) is
//! sampled over a window. For contrast, 1,000 groups with quiescence off.
//! Target: 10,000 quiesced groups cost < 2% of a core.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{HostConfig, LocalTransport, NodeHost, StateMachine, Transport};
use regatta_raft::{LogIndex, NodeId};
use regatta_wal::{GroupId, Wal, WalConfig};

struct Idle;

impl StateMachine for Idle {
    fn apply(&mut self, _index: LogIndex, _command: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        LogIndex(0)
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::new() };
        Box::new(bytes)
    }

    fn restore(&mut self, _index: LogIndex, _data: &mut dyn std::io::Read) -> std::io::Result<()> {
        Ok(())
    }
}

/// CPU seconds this process has used (user + system).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    // Fields after the command name, which is in parentheses.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    let clock_ticks: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0);
    ticks / clock_ticks
}

async fn measure(groups: u64, quiesce_after_ticks: u64, window: Duration) -> (f64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let mut config = HostConfig::new(NodeId(1), dir.path());
    config.quiesce_after_ticks = quiesce_after_ticks;
    let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let host =
        NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current()).expect("host");
    transport.register(NodeId(1), &host);
    for group in 1..=groups {
        host.start_group(GroupId(group), vec![NodeId(1)], Box::new(Idle))
            .expect("group");
    }
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    if quiesce_after_ticks > 0 {
        while host.quiesced_group_count() < groups && Instant::now() < settle_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    } else {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let quiesced = host.quiesced_group_count();
    let before = cpu_seconds();
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let used = cpu_seconds() - before;
    let share = used / start.elapsed().as_secs_f64();
    host.stop().await;
    (share, quiesced)
}

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`: skip.
    if !std::env::args().any(|argument| argument == "--bench") {
        return;
    }
    let runtime = regatta_multiraft::runtime::builder()
        .worker_threads(2)
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let window = Duration::from_secs(5);
        let (share, quiesced) = measure(10_000, 200, window).await;
        println!(
            "| 10,000 groups, quiescence after 200 ticks | {quiesced} quiesced | {:.2}% of a core |",
            share * 100.0
        );
        let (share, _) = measure(1_000, 0, window).await;
        println!(
            "| 1,000 groups, quiescence off | 0 quiesced | {:.2}% of a core |",
            share * 100.0
        );
    });
}
