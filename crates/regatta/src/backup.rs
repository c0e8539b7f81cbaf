//! `regatta backup`, `regatta restore` and `regatta reset`: clients of the
//! regatta.v1 `Maintenance` service. The backup directory's format is in
//! `docs/backup.md`.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use regatta_server::proto::regatta::v1 as pb;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use serde_json::json;

use crate::client::{channel, print, Connection, Output};

/// The manifest's file name in a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What a manifest's `format` field says.
const MANIFEST_FORMAT: &str = "regatta-backup";

/// The manifest version this binary writes and reads.
const MANIFEST_VERSION: u32 = 1;

/// Bytes of table data in one restore chunk.
const RESTORE_CHUNK_BYTES: usize = 1 << 20;

/// Restore chunks buffered ahead of the gRPC stream.
const RESTORE_BUFFER_CHUNKS: usize = 4;

/// `regatta backup`.
#[derive(Args, Debug)]
pub struct BackupArgs {
    #[command(flatten)]
    connection: Connection,
    /// The directory to write; it must not hold a backup already. It gets
    /// one file per table and a manifest with their checksums.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Back up only this table (repeat for several); every table when
    /// not given.
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
}

/// `regatta restore`.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    connection: Connection,
    /// A directory written by `regatta backup`.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// Restore only this table of the backup (repeat for several); every
    /// table when not given.
    #[arg(long = "table", value_name = "NAME")]
    tables: Vec<String>,
    /// Really replace the tables' contents. Without it, restore checks
    /// the backup, says what it would do, and changes nothing.
    #[arg(long = "yes-i-know-this-overwrites-data")]
    confirm: bool,
}

/// `regatta reset`.
#[derive(Args, Debug)]
pub struct ResetArgs {
    #[command(flatten)]
    connection: Connection,
    /// The follower cluster's table to resynchronise.
    #[arg(
        long,
        value_name = "NAME",
        required_unless_present = "all",
        conflicts_with = "all"
    )]
    table: Option<String>,
    /// Resynchronise every table of the follower cluster.
    #[arg(long)]
    all: bool,
}

/// A backup directory's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `regatta-backup`.
    pub format: String,
    /// The manifest version, 1.
    pub version: u32,
    /// When the backup finished, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The node the backup was read from.
    pub source: String,
    /// The `regatta` version that wrote it.
    pub regatta_version: String,
    /// The tables, in the order they were read.
    pub tables: Vec<TableEntry>,
}

/// One table of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// The table's name.
    pub name: String,
    /// Its file, relative to the directory.
    pub file: String,
    /// The table's revision the copy holds.
    pub revision: u64,
    /// Keys in the copy.
    pub keys: u64,
    /// The file's length.
    pub bytes: u64,
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
}

fn status(error: tonic::Status) -> String {
    format!("{:?}: {}", error.code(), error.message())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

/// A bar over `total` bytes, or a byte counter when the total is unknown;
/// drawn on stderr when it is a terminal.
fn progress(total: Option<u64>, prefix: String) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {prefix} {bytes} {binary_bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_prefix(prefix);
    bar
}

/// Counts the items of a table's stream, checking their framing.
#[derive(Default)]
struct ItemCounter {
    pending: Vec<u8>,
    keys: u64,
}

impl ItemCounter {
    fn feed(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.pending.extend_from_slice(bytes);
        let mut position = 0;
        while let Some((_, used)) = regatta_kv::split_table_item(&self.pending[position..])
            .map_err(|error| format!("a bad item: {error}"))?
        {
            position += used;
            self.keys += 1;
        }
        self.pending.drain(..position);
        Ok(())
    }

    fn finish(self) -> Result<u64, String> {
        if self.pending.is_empty() {
            Ok(self.keys)
        } else {
            Err(format!(
                "the data ends inside an item ({} bytes left over)",
                self.pending.len()
            ))
        }
    }
}

/// Writes `bytes` to `path` through a temporary file, fsynced and renamed
/// into place, then fsyncs the directory.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let partial = dir.join(format!("{name}.partial"));
    let mut file = File::create(&partial)
        .map_err(|error| format!("cannot create {}: {error}", partial.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    fs::rename(&partial, dir.join(name))
        .map_err(|error| format!("cannot rename {}: {error}", partial.display()))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| format!("cannot sync {}: {error}", dir.display()))
}

/// `regatta backup`: every table (or the named ones) into `--dir`.
pub async fn backup(args: BackupArgs) -> Result<(), String> {
    let dir = &args.dir;
    for name in &args.tables {
        regatta_server::validate_table_name(name).map_err(|error| format!("--table: {error}"))?;
    }
    if dir.join(MANIFEST_FILE).exists() {
        return Err(format!(
            "{} holds a backup already; choose another directory",
            dir.display()
        ));
    }
    fs::create_dir_all(dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let channel = channel(&args.connection).await?;
    let names = tables_to_back_up(&args, &channel).await?;
    if names.is_empty() {
        return Err("the cluster has no tables to back up".into());
    }
    let started = Instant::now();
    let mut client = pb::maintenance_client::MaintenanceClient::new(channel)
        .max_decoding_message_size(4 * RESTORE_CHUNK_BYTES);
    let mut entries = Vec::with_capacity(names.len());
    for (position, name) in names.iter().enumerate() {
        let prefix = format!("[{}/{}] {name}", position + 1, names.len());
        let entry = match backup_table(&mut client, &args.connection, dir, name, prefix).await {
            Ok(entry) => entry,
            Err(error) => {
                let _ = fs::remove_file(dir.join(format!("{name}.table.partial")));
                return Err(error);
            }
        };
        eprintln!(
            "backup: table {name}: {} keys, {} bytes at revision {}",
            entry.keys, entry.bytes, entry.revision
        );
        entries.push(entry);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        created_unix_ms: now_unix_ms(),
        source: args.connection.address.clone(),
        regatta_version: env!("CARGO_PKG_VERSION").into(),
        tables: entries,
    };
    let json = serde_json::to_vec_pretty(&manifest)
        .map_err(|error| format!("cannot encode the manifest: {error}"))?;
    write_durably(dir, MANIFEST_FILE, &json)?;
    print_backup(
        args.connection.output,
        dir,
        &manifest,
        started.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// The tables `--table` names, or else every table of the cluster, by
/// name.
async fn tables_to_back_up(
    args: &BackupArgs,
    channel: &tonic::transport::Channel,
) -> Result<Vec<String>, String> {
    if !args.tables.is_empty() {
        return Ok(args.tables.clone());
    }
    let mut tables = pb::tables_client::TablesClient::new(channel.clone());
    let listed = tables
        .list(pb::ListTablesRequest {})
        .await
        .map_err(status)?
        .into_inner();
    let mut names: Vec<String> = listed.tables.into_iter().map(|t| t.name).collect();
    names.sort();
    Ok(names)
}

/// Says what a finished backup holds.
fn print_backup(output: Output, dir: &Path, manifest: &Manifest, seconds: f64) {
    let bytes: u64 = manifest.tables.iter().map(|t| t.bytes).sum();
    print(
        output,
        json!({
            "dir": dir.display().to_string(),
            "seconds": seconds,
            "tables": manifest.tables.iter().map(|table| json!({
                "name": table.name,
                "keys": table.keys,
                "bytes": table.bytes,
                "revision": table.revision,
            })).collect::<Vec<_>>(),
        }),
        vec![format!(
            "backed up {} tables ({bytes} bytes) to {} in {seconds:.1} s",
            manifest.tables.len(),
            dir.display(),
        )],
    );
}

async fn backup_table(
    client: &mut pb::maintenance_client::MaintenanceClient<tonic::transport::Channel>,
    connection: &Connection,
    dir: &Path,
    name: &str,
    prefix: String,
) -> Result<TableEntry, String> {
    let file_name = format!("{name}.table");
    let partial = dir.join(format!("{file_name}.partial"));
    let file = File::create(&partial)
        .map_err(|error| format!("cannot create {}: {error}", partial.display()))?;
    let mut out = BufWriter::new(file);
    let request = connection.admin(pb::BackupRequest {
        table: name.as_bytes().to_vec(),
    })?;
    let mut stream = client
        .backup(request)
        .await
        .map_err(|error| format!("table {name}: {}", status(error)))?
        .into_inner();
    let bar = progress(None, prefix);
    let mut hasher = Sha256::new();
    let mut counter = ItemCounter::default();
    let mut offset = 0u64;
    let mut revision = None;
    let mut complete = false;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|error| format!("table {name}: {}", status(error)))?
    {
        if !chunk_follows(&chunk, offset, &mut revision) {
            return Err(format!(
                "table {name}: a damaged chunk at offset {} (expected offset {offset})",
                chunk.offset
            ));
        }
        counter
            .feed(&chunk.data)
            .map_err(|error| format!("table {name}: {error}"))?;
        hasher.update(&chunk.data);
        out.write_all(&chunk.data)
            .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
        offset += chunk.len;
        bar.set_position(offset);
        if chunk.last {
            complete = true;
            break;
        }
    }
    bar.finish_and_clear();
    if !complete {
        return Err(format!(
            "table {name}: the stream ended after {offset} bytes, before its last chunk"
        ));
    }
    let keys = counter
        .finish()
        .map_err(|error| format!("table {name}: {error}"))?;
    publish_durably(out, &partial, &dir.join(&file_name))?;
    sync_dir(dir)?;
    Ok(TableEntry {
        name: name.to_string(),
        file: file_name,
        revision: revision.unwrap_or(0),
        keys,
        bytes: offset,
        sha256: hex(&hasher.finalize()),
    })
}

/// Whether `chunk` is intact and follows on at `offset`, from the same
/// revision as the chunks before it (`revision`, set by the first).
fn chunk_follows(chunk: &pb::SnapshotChunk, offset: u64, revision: &mut Option<u64>) -> bool {
    chunk.offset == offset
        && chunk.len == chunk.data.len() as u64
        && crc32c::crc32c(&chunk.data) == chunk.crc32c
        && *revision.get_or_insert(chunk.index) == chunk.index
}

/// Flushes and syncs the file written through `out` at `partial`, then
/// renames it to `path` (the caller syncs the directory).
fn publish_durably(out: BufWriter<File>, partial: &Path, path: &Path) -> Result<(), String> {
    let file = out
        .into_inner()
        .map_err(|error| format!("cannot write {}: {error}", partial.display()))?;
    file.sync_all()
        .map_err(|error| format!("cannot sync {}: {error}", partial.display()))?;
    fs::rename(partial, path)
        .map_err(|error| format!("cannot rename {}: {error}", partial.display()))
}

/// Reads and checks a backup directory's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = fs::read(&path).map_err(|error| {
        format!(
            "cannot read {}: {error} (is it a directory written by `regatta backup`?)",
            path.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|error| format!("{} is not a backup manifest: {error}", path.display()))?;
    if manifest.format != MANIFEST_FORMAT || manifest.version != MANIFEST_VERSION {
        return Err(format!(
            "{} is format {:?} version {}; this regatta reads {MANIFEST_FORMAT:?} version \
             {MANIFEST_VERSION}",
            path.display(),
            manifest.format,
            manifest.version
        ));
    }
    for table in &manifest.tables {
        regatta_server::validate_table_name(&table.name)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        if table.file != format!("{}.table", table.name) {
            return Err(format!(
                "{}: table {}'s file is {:?}; a backup names it {:?}",
                path.display(),
                table.name,
                table.file,
                format!("{}.table", table.name)
            ));
        }
    }
    Ok(manifest)
}

/// Checks a table file against its manifest entry: length, SHA-256 and
/// item framing (and key count).
fn verify_table(dir: &Path, table: &TableEntry, bar: &ProgressBar) -> Result<(), String> {
    let path = dir.join(&table.file);
    let mut file =
        File::open(&path).map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut counter = ItemCounter::default();
    let mut buffer = vec![0u8; RESTORE_CHUNK_BYTES];
    let mut length = 0u64;
    loop {
        let read = file
            .read(&mut buffer)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        counter
            .feed(&buffer[..read])
            .map_err(|error| format!("{}: {error}", path.display()))?;
        length += read as u64;
        bar.inc(read as u64);
    }
    if length != table.bytes {
        return Err(format!(
            "{} has {length} bytes; the manifest says {}",
            path.display(),
            table.bytes
        ));
    }
    let digest = hex(&hasher.finalize());
    if digest != table.sha256 {
        return Err(format!(
            "{} does not match its checksum in the manifest (SHA-256 {digest}, expected {})",
            path.display(),
            table.sha256
        ));
    }
    let keys = counter
        .finish()
        .map_err(|error| format!("{}: {error}", path.display()))?;
    if keys != table.keys {
        return Err(format!(
            "{} holds {keys} keys; the manifest says {}",
            path.display(),
            table.keys
        ));
    }
    Ok(())
}

/// `regatta restore`: checks every file of the backup, then replaces each
/// table's contents with it.
/// The backup's tables that `--table` picks (all by default), each
/// checked against the manifest's checksum first.
fn tables_to_restore(args: &RestoreArgs) -> Result<Vec<TableEntry>, String> {
    let manifest = read_manifest(&args.dir)?;
    let mut tables: Vec<TableEntry> = manifest.tables.clone();
    if !args.tables.is_empty() {
        for name in &args.tables {
            if !manifest.tables.iter().any(|table| &table.name == name) {
                return Err(format!(
                    "the backup in {} has no table {name:?}",
                    args.dir.display()
                ));
            }
        }
        tables.retain(|table| args.tables.contains(&table.name));
    }
    let total: u64 = tables.iter().map(|table| table.bytes).sum();
    let bar = progress(Some(total), "verifying".into());
    for table in &tables {
        verify_table(&args.dir, table, &bar)?;
    }
    bar.finish_and_clear();
    eprintln!(
        "restore: the backup checks out: {} tables, {total} bytes",
        tables.len()
    );
    Ok(tables)
}

pub async fn restore(args: RestoreArgs) -> Result<(), String> {
    let tables = tables_to_restore(&args)?;
    if !args.confirm {
        for table in &tables {
            eprintln!(
                "restore: would replace table {} on {} with {} keys (revision {} of the backup)",
                table.name, args.connection.address, table.keys, table.revision
            );
        }
        return Err(
            "nothing was changed: restore replaces each table's contents; pass \
             --yes-i-know-this-overwrites-data to do it"
                .into(),
        );
    }
    let channel = channel(&args.connection).await?;
    let mut client = pb::maintenance_client::MaintenanceClient::new(channel);
    let started = Instant::now();
    let mut restored = Vec::with_capacity(tables.len());
    for (position, table) in tables.iter().enumerate() {
        let prefix = format!("[{}/{}] {}", position + 1, tables.len(), table.name);
        let response = restore_table(&mut client, &args, table, prefix)
            .await
            .map_err(|error| {
                let done: Vec<&str> = tables[..position].iter().map(|t| t.name.as_str()).collect();
                format!(
                    "table {}: {error} (a restore that fails before its commit leaves the table \
                     as it was; after a timeout, check the table; restored before it: {})",
                    table.name,
                    if done.is_empty() {
                        "none".to_string()
                    } else {
                        done.join(", ")
                    }
                )
            })?;
        eprintln!(
            "restore: table {}: {} keys, {} bytes{}; its revision is now {}",
            table.name,
            response.keys,
            response.bytes,
            if response.created { " (created)" } else { "" },
            response.revision
        );
        restored.push(json!({
            "name": table.name,
            "keys": response.keys,
            "bytes": response.bytes,
            "created": response.created,
            "revision": response.revision,
        }));
    }
    let seconds = started.elapsed().as_secs_f64();
    print(
        args.connection.output,
        json!({
            "dir": args.dir.display().to_string(),
            "seconds": seconds,
            "tables": restored,
        }),
        vec![format!(
            "restored {} tables from {} in {seconds:.1} s",
            tables.len(),
            args.dir.display(),
        )],
    );
    Ok(())
}

/// Reads a backup file (on a blocking thread) and sends it as restore
/// chunks while the stream sends. It hashes what it sends and marks the
/// last chunk only if the whole matches the manifest, so a file changed
/// since the check makes the server abort instead of commit.
fn send_file_chunks(
    mut file: File,
    path: &Path,
    table: &TableEntry,
    sender: &tokio::sync::mpsc::Sender<pb::RestoreMessage>,
    bar: &ProgressBar,
) -> Result<(), String> {
    let length = table.bytes;
    let mut offset = 0u64;
    let mut hasher = Sha256::new();
    loop {
        let want = (length - offset).min(RESTORE_CHUNK_BYTES as u64) as usize;
        let mut data = vec![0u8; want];
        let mut filled = 0;
        while filled < data.len() {
            let read = file
                .read(&mut data[filled..])
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        if filled < want {
            return Err(format!(
                "{} became shorter while being restored",
                path.display()
            ));
        }
        hasher.update(&data);
        let last = offset + filled as u64 >= length;
        if last && hex(&hasher.clone().finalize()) != table.sha256 {
            return Err(format!(
                "{} changed while being restored (its checksum no longer matches)",
                path.display()
            ));
        }
        let chunk = pb::SnapshotChunk {
            len: filled as u64,
            index: table.revision,
            crc32c: crc32c::crc32c(&data),
            offset,
            last,
            data,
        };
        offset += filled as u64;
        let message = pb::RestoreMessage {
            data: Some(pb::restore_message::Data::Chunk(chunk)),
        };
        if sender.blocking_send(message).is_err() {
            return Ok(());
        }
        bar.set_position(offset);
        if last {
            return Ok(());
        }
    }
}

async fn restore_table(
    client: &mut pb::maintenance_client::MaintenanceClient<tonic::transport::Channel>,
    args: &RestoreArgs,
    table: &TableEntry,
    prefix: String,
) -> Result<pb::RestoreResponse, String> {
    let path = args.dir.join(&table.file);
    let file =
        File::open(&path).map_err(|error| format!("cannot open {}: {error}", path.display()))?;
    let (sender, receiver) = tokio::sync::mpsc::channel(RESTORE_BUFFER_CHUNKS);
    let info = pb::RestoreMessage {
        data: Some(pb::restore_message::Data::Info(pb::RestoreInfo {
            table: table.name.as_bytes().to_vec(),
        })),
    };
    let _ = sender.send(info).await;
    let bar = progress(Some(table.bytes), prefix);
    let (entry, reader_bar) = (table.clone(), bar.clone());
    let reader = tokio::task::spawn_blocking(move || {
        send_file_chunks(file, &path, &entry, &sender, &reader_bar)
    });
    let request = args
        .connection
        .admin(tokio_stream::wrappers::ReceiverStream::new(receiver))?;
    let response = client.restore(request).await;
    bar.finish_and_clear();
    // The reader's error explains a stream that ended early.
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => return Err(error),
        Err(error) => return Err(format!("the file reader failed: {error}")),
    }
    Ok(response.map_err(status)?.into_inner())
}

/// `regatta reset`: makes follower tables install the leader's snapshot.
pub async fn reset(args: ResetArgs) -> Result<(), String> {
    let channel = channel(&args.connection).await?;
    let mut client = pb::maintenance_client::MaintenanceClient::new(channel);
    let request = args.connection.admin(pb::ResetRequest {
        table: args.table.clone().unwrap_or_default().into_bytes(),
        reset_all: args.all,
    })?;
    let response = client.reset(request).await.map_err(status)?.into_inner();
    let mut lines: Vec<String> = response
        .tables
        .iter()
        .map(|table| {
            format!("table {table}: installing a fresh copy of the leader cluster's table")
        })
        .collect();
    if lines.is_empty() {
        lines.push("no tables to reset".into());
    }
    print(
        args.connection.output,
        json!({ "reset": response.tables }),
        lines,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value);
        out
    }

    #[test]
    fn items_are_counted_across_chunk_boundaries_and_a_torn_end_is_an_error() {
        let mut bytes = item(b"a", b"0123456789abcdefghij".repeat(3).as_slice());
        bytes.extend(item(b"bb", b"x".repeat(40).as_slice()));
        for split in 0..bytes.len() {
            let mut counter = ItemCounter::default();
            counter.feed(&bytes[..split]).expect("feed");
            counter.feed(&bytes[split..]).expect("feed");
            assert_eq!(counter.finish(), Ok(2), "split at {split}");
        }
        let mut counter = ItemCounter::default();
        counter.feed(&bytes[..bytes.len() - 1]).expect("feed");
        assert!(counter.finish().is_err());
    }

    #[test]
    fn a_manifest_with_a_path_for_a_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            created_unix_ms: 1,
            source: "127.0.0.1:1".into(),
            regatta_version: "0".into(),
            tables: vec![TableEntry {
                name: "t".into(),
                file: "t.table".into(),
                revision: 3,
                keys: 0,
                bytes: 0,
                sha256: hex(&Sha256::digest(b"")),
            }],
        };
        let write = |manifest: &Manifest| {
            fs::write(
                dir.path().join(MANIFEST_FILE),
                serde_json::to_vec(manifest).expect("json"),
            )
            .expect("write")
        };
        write(&manifest);
        assert_eq!(read_manifest(dir.path()), Ok(manifest.clone()));
        manifest.tables[0].file = "../etc/passwd".into();
        write(&manifest);
        assert!(read_manifest(dir.path())
            .expect_err("refused")
            .contains("a backup names it"));
        manifest.tables[0].file = "t.table".into();
        manifest.version = 2;
        write(&manifest);
        assert!(read_manifest(dir.path())
            .expect_err("refused")
            .contains("version 2"));
    }
}
