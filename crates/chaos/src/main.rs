//! `regatta-chaos`: runs the harness against the `regatta` binary and
//! prints the seed, the fault schedule, the operation counts and the
//! verdict; saves the history as JSON.
//!
//! `cargo run -p regatta-chaos -- --time-limit 600 --nemesis all --seed S`
//!
//! `regatta-chaos --check-history chaos-history.json` checks a saved
//! history again without running anything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use regatta_chaos::checker::{self, Operation, Verdict};
use regatta_chaos::harness::{self, Fault, Report, RunConfig};
use regatta_chaos::sequential::{self, FollowerRead};

/// Jepsen-style verification of Regatta: faults, concurrent clients, and
/// a linearizability check of the history.
#[derive(Parser, Debug)]
#[command(name = "regatta-chaos", version, about)]
struct Cli {
    /// Seconds the workload runs.
    #[arg(long, default_value_t = 30)]
    time_limit: u64,
    /// Faults: all, none, or a comma-separated list of kill, pause,
    /// partition, isolate-leader, minority, bridge, slow, transfer-leader,
    /// snapshot-crash, cut-location, member-replace. They are dealt like a
    /// shuffled deck: each listed fault once, in an order the seed picks,
    /// before any comes again.
    #[arg(long, default_value = "all")]
    nemesis: String,
    /// The seed of every random choice (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Nodes in the leader cluster (3 or 5).
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// Nodes in the follower cluster (0 for none, 1 or 3). It replicates
    /// the leader cluster over one link the nemesis can cut
    /// (`cut-location`), and its reads are checked for per-table
    /// sequential consistency.
    #[arg(long, default_value_t = 1)]
    follower_nodes: u64,
    /// Concurrent clients of the leader cluster.
    #[arg(long, default_value_t = 8)]
    clients: u64,
    /// MiB of ballast written before the workload, so that snapshots take
    /// long enough to install for `snapshot-crash` to cut them.
    #[arg(long, default_value_t = 16)]
    ballast_mb: u64,
    /// Keys the clients share at once.
    #[arg(long, default_value_t = 5)]
    keys: u64,
    /// Operations on a key before the clients move on to a fresh one: each
    /// key's history is checked on its own, and the search's cost grows
    /// fast with a key's operations whose outcome is unknown.
    #[arg(long, default_value_t = 1000)]
    ops_per_key: u64,
    /// The regatta binary (default: target/release/regatta, then
    /// target/debug/regatta).
    #[arg(long)]
    regatta: Option<PathBuf>,
    /// Where to save the history (JSON).
    #[arg(long, default_value = "chaos-history.json")]
    out: PathBuf,
    /// Keep the nodes' data directories and logs even after a clean run
    /// (they are always kept after one that is not).
    #[arg(long)]
    keep_dir: bool,
    /// Run nothing: check a history saved by an earlier run (its
    /// linearizability and the follower reads' sequential consistency)
    /// and print the verdict.
    #[arg(long, value_name = "PATH")]
    check_history: Option<PathBuf>,
}

/// A saved history, as `main` writes it.
#[derive(serde::Deserialize)]
struct SavedHistory {
    leader: Vec<Operation>,
    #[serde(default)]
    follower: Vec<FollowerRead>,
}

fn check_saved_history(path: &std::path::Path) -> ExitCode {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            eprintln!("regatta-chaos: read {}: {error}", path.display());
            return ExitCode::from(2);
        }
    };
    let saved: SavedHistory = match serde_json::from_slice(&bytes) {
        Ok(saved) => saved,
        Err(error) => {
            eprintln!(
                "regatta-chaos: {} is not a saved history: {error}",
                path.display()
            );
            return ExitCode::from(2);
        }
    };
    let count = |outcome: fn(&checker::Outcome) -> bool| {
        saved
            .leader
            .iter()
            .filter(|operation| outcome(&operation.outcome))
            .count()
    };
    println!(
        "{}: {} operations ({} fail, {} info), {} follower reads",
        path.display(),
        saved.leader.len(),
        count(|outcome| *outcome == checker::Outcome::Fail),
        count(|outcome| *outcome == checker::Outcome::Info),
        saved.follower.len()
    );
    let started = std::time::Instant::now();
    let verdict = checker::check(&saved.leader);
    println!(
        "linearizability checked in {} ms",
        started.elapsed().as_millis()
    );
    let started = std::time::Instant::now();
    let anomalies = sequential::check_follower(&saved.leader, &saved.follower);
    println!(
        "follower reads checked in {} ms: {} anomalies",
        started.elapsed().as_millis(),
        anomalies.len()
    );
    for anomaly in anomalies.iter().take(20) {
        println!("follower anomaly: {anomaly}");
    }
    println!("verdict: {}", describe(&verdict));
    if verdict == Verdict::Linearizable && anomalies.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn faults(spec: &str) -> Result<Vec<Fault>, String> {
    match spec {
        "all" => Ok(Fault::ALL.to_vec()),
        "none" => Ok(Vec::new()),
        list => list
            .split(',')
            .map(|name| {
                Fault::from_name(name.trim()).ok_or_else(|| {
                    let known: Vec<&str> = Fault::ALL.iter().map(|fault| fault.name()).collect();
                    format!(
                        "--nemesis: unknown fault {name:?} (known: {}, or all, none)",
                        known.join(", ")
                    )
                })
            })
            .collect(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_history {
        return check_saved_history(path);
    }
    let config = match run_config(&cli) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("regatta-chaos: {error}");
            return ExitCode::from(2);
        }
    };
    let (seed, dir) = (config.seed, config.dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    println!("seed {seed}");
    let report = match run_harness(config) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("regatta-chaos: {error}");
            return ExitCode::FAILURE;
        }
    };
    print_report(&report, cli.follower_nodes);
    save_history(&report, &cli.out);
    for node in &report.diverged {
        println!("diverged: {node}");
    }
    if is_clean(&report) && !cli.keep_dir {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("the nodes' data and logs are kept in {}", dir.display());
    }
    print_verdict(&report, seed)
}

/// Checks the flags' values, so that a bad one fails before anything
/// starts.
fn validate(cli: &Cli) -> Result<(), String> {
    if cli.nodes != 3 && cli.nodes != 5 {
        return Err(format!("--nodes must be 3 or 5, not {}", cli.nodes));
    }
    if ![0, 1, 3].contains(&cli.follower_nodes) {
        return Err(format!(
            "--follower-nodes must be 0, 1 or 3, not {}",
            cli.follower_nodes
        ));
    }
    if cli.clients == 0 || cli.keys == 0 || cli.ops_per_key == 0 {
        return Err("--clients, --keys and --ops-per-key must be at least 1".into());
    }
    Ok(())
}

/// The `regatta` binary: `--regatta`, else the release build if there is
/// one, else the debug build; it must exist.
fn regatta_binary(cli: &Cli) -> Result<PathBuf, String> {
    let binary = cli.regatta.clone().unwrap_or_else(|| {
        let release = PathBuf::from("target/release/regatta");
        if release.exists() {
            release
        } else {
            PathBuf::from("target/debug/regatta")
        }
    });
    if !binary.exists() {
        return Err(format!(
            "{} does not exist; build it (cargo build --release -p regatta) or pass --regatta",
            binary.display()
        ));
    }
    Ok(binary)
}

/// The run's settings from the flags; the seed defaults to one from the
/// clock, made odd so that it is never 0.
fn run_config(cli: &Cli) -> Result<RunConfig, String> {
    validate(cli)?;
    let faults = faults(&cli.nemesis)?;
    let binary = regatta_binary(cli)?;
    let seed = cli.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    Ok(RunConfig {
        binary,
        dir: std::env::temp_dir().join(format!("regatta-chaos-{seed}")),
        nodes: cli.nodes,
        followers: cli.follower_nodes,
        clients: cli.clients,
        keys: cli.keys,
        ops_per_key: cli.ops_per_key,
        duration: Duration::from_secs(cli.time_limit),
        faults,
        seed,
        ballast_bytes: cli.ballast_mb * 1024 * 1024,
    })
}

/// Runs the harness on a multi-threaded runtime of its own.
fn run_harness(config: RunConfig) -> Result<Report, String> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|error| error.to_string())?;
    runtime
        .block_on(harness::run(config))
        .map_err(|error| error.to_string())
}

/// Prints the schedule, the operation counts and every anomaly but the
/// verdict's; the follower cluster's line only when there is one.
fn print_report(report: &Report, follower_nodes: u64) {
    for (at, event) in &report.schedule {
        println!("{at:>8} ms  {event}");
    }
    println!(
        "faults: {} acted, {} found nothing to act on",
        report.faults.len(),
        report.faults_not_acted
    );
    println!("revision anomalies: {}", report.revision_anomalies.len());
    for anomaly in report.revision_anomalies.iter().take(20) {
        println!("revision anomaly: {anomaly}");
    }
    println!(
        "operations: {} ok, {} fail, {} info; lost acknowledged writes: {}; snapshots installed: {} ({} cut short by a kill); bytes over the peer proxies: {}",
        report.ok,
        report.fail,
        report.info,
        report.lost_writes,
        report.snapshots_installed,
        report.installs_cut,
        report.peer_link_bytes
    );
    if follower_nodes > 0 {
        println!(
            "follower cluster: {} reads; {} anomalies",
            report.follower_reads.len(),
            report.follower_anomalies.len()
        );
        for anomaly in report.follower_anomalies.iter().take(20) {
            println!("follower anomaly: {anomaly}");
        }
    }
    if report.unread_keys > 0 {
        println!(
            "warning: the final value of {} key(s) could not be read; their lost writes are not counted",
            report.unread_keys
        );
    }
}

/// Saves the leader history and the follower reads as JSON at `out`, for
/// `--check-history`; a failure to save is reported and does not fail
/// the run.
fn save_history(report: &Report, out: &std::path::Path) {
    let saved = serde_json::json!({
        "leader": &report.history,
        "follower": &report.follower_reads,
    });
    match serde_json::to_vec_pretty(&saved) {
        Ok(json) => {
            if let Err(error) = std::fs::write(out, json) {
                eprintln!("regatta-chaos: write {}: {error}", out.display());
            } else {
                println!("history saved to {}", out.display());
            }
        }
        Err(error) => eprintln!("regatta-chaos: {error}"),
    }
}

/// Whether the run found nothing wrong at all, so its data need not be
/// kept.
fn is_clean(report: &Report) -> bool {
    report.verdict == Verdict::Linearizable
        && report.lost_writes == 0
        && report.unread_keys == 0
        && report.diverged.is_empty()
        && report.follower_anomalies.is_empty()
        && report.revision_anomalies.is_empty()
}

/// Prints the verdict with the replay seed; success only for a clean run.
fn print_verdict(report: &Report, seed: u64) -> ExitCode {
    match &report.verdict {
        Verdict::Linearizable if !report.follower_anomalies.is_empty() => {
            println!(
                "verdict: linearizable on the leader cluster, but the follower cluster is not sequentially consistent (replay: --seed {seed})"
            );
            ExitCode::FAILURE
        }
        Verdict::Linearizable if !report.revision_anomalies.is_empty() => {
            println!(
                "verdict: linearizable by value, but {} acknowledged write(s) took revisions out of order (replay: --seed {seed})",
                report.revision_anomalies.len()
            );
            ExitCode::FAILURE
        }
        Verdict::Linearizable if report.unread_keys > 0 => {
            println!(
                "verdict: linearizable, but the final value of {} key(s) could not be read, so lost writes are not known (replay: --seed {seed})",
                report.unread_keys
            );
            ExitCode::FAILURE
        }
        Verdict::Linearizable if report.lost_writes == 0 && report.diverged.is_empty() => {
            println!("verdict: linearizable (replay: --seed {seed})");
            ExitCode::SUCCESS
        }
        Verdict::Linearizable if report.lost_writes == 0 => {
            println!(
                "verdict: linearizable, but {} node(s) never converged (replay: --seed {seed})",
                report.diverged.len()
            );
            ExitCode::FAILURE
        }
        Verdict::Linearizable => {
            println!(
                "verdict: linearizable, but {} acknowledged write(s) lost (replay: --seed {seed})",
                report.lost_writes
            );
            ExitCode::FAILURE
        }
        verdict => {
            println!("verdict: {} (replay: --seed {seed})", describe(verdict));
            ExitCode::FAILURE
        }
    }
}

/// A verdict for people: a failure lists its reduced history one
/// operation per line.
fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Linearizable => "linearizable".to_string(),
        Verdict::Unknown { key } => {
            format!("unknown: the search on key {key} ran out of states; nothing is claimed")
        }
        Verdict::NotLinearizable { key, minimal } => {
            let mut text = format!(
                "NOT linearizable on key {key}; a failing sub-history of {} operations \
                 (times in µs from the start):",
                minimal.len()
            );
            for operation in minimal {
                text.push_str(&format!(
                    "\n  process {:>3}  {:>12} .. {:<12}  {:?} -> {:?}",
                    operation.process,
                    operation.call,
                    operation.ret,
                    operation.op,
                    operation.outcome
                ));
            }
            text
        }
    }
}
