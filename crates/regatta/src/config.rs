//! `--config FILE`: a YAML file with the same keys as the dotted flags,
//! nested or dotted (`raft: {node-id: 2}` or `raft.node-id: 2`).
//! Precedence, highest first: flags on the command line, `REGATTA_…`
//! environment variables, the file, the defaults. The file's keys become
//! flags placed before the command line's, so that those win.

use std::collections::BTreeSet;

use yaml_rust2::{Yaml, YamlLoader};

/// The environment variable of a flag: `raft.node-id` → `REGATTA_RAFT_NODE_ID`.
pub fn env_name(key: &str) -> String {
    format!("REGATTA_{}", key.to_uppercase().replace(['.', '-'], "_"))
}

/// `arguments` with the file's settings inserted after the subcommand, if
/// `--config` is given. `known` holds the long flag names of the
/// subcommand, for a precise error on an unknown key.
pub fn expand(arguments: Vec<String>, known: &BTreeSet<String>) -> Result<Vec<String>, String> {
    let mut path = None;
    let mut rest = Vec::with_capacity(arguments.len());
    let mut iter = arguments.into_iter();
    while let Some(argument) = iter.next() {
        if argument == "--config" {
            path = Some(iter.next().ok_or("--config needs a file")?);
        } else if let Some(value) = argument.strip_prefix("--config=") {
            path = Some(value.to_string());
        } else {
            rest.push(argument);
        }
    }
    let Some(path) = path else {
        return Ok(rest);
    };
    let text =
        std::fs::read_to_string(&path).map_err(|error| format!("--config {path}: {error}"))?;
    let documents =
        YamlLoader::load_from_str(&text).map_err(|error| format!("--config {path}: {error}"))?;
    let mut settings = Vec::new();
    if let Some(document) = documents.first() {
        flatten("", document, &mut settings)
            .map_err(|error| format!("--config {path}: {error}"))?;
    }
    // Flags the command line gives itself: the file's value is dropped,
    // not merged (a list flag would otherwise take both lists).
    let given: BTreeSet<&str> = rest
        .iter()
        .filter_map(|argument| argument.strip_prefix("--"))
        .map(|flag| flag.split_once('=').map_or(flag, |(name, _)| name))
        .collect();
    let mut flags = Vec::new();
    for (key, value) in settings {
        if !known.contains(&key) {
            return Err(format!("--config {path}: unknown key {key:?}"));
        }
        if std::env::var_os(env_name(&key)).is_some() || given.contains(key.as_str()) {
            continue; // the environment and the command line override the file
        }
        match value.as_str() {
            "true" => flags.push(format!("--{key}")),
            "false" => {}
            _ => {
                flags.push(format!("--{key}"));
                flags.push(value);
            }
        }
    }
    // Program name and subcommand first, then the file, then the rest.
    let split = rest.len().min(2);
    let mut expanded: Vec<String> = rest[..split].to_vec();
    expanded.extend(flags);
    expanded.extend(rest[split..].iter().cloned());
    Ok(expanded)
}

fn scalar(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(text) | Yaml::Real(text) => Some(text.clone()),
        Yaml::Integer(number) => Some(number.to_string()),
        Yaml::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

fn flatten(prefix: &str, value: &Yaml, out: &mut Vec<(String, String)>) -> Result<(), String> {
    let Yaml::Hash(map) = value else {
        return Err("the top level must be a mapping of keys to values".into());
    };
    for (key, value) in map {
        let Some(key) = scalar(key) else {
            return Err(format!("a key under {prefix:?} is not a string"));
        };
        let key = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            // `raft.initial-members: {1: host:port, ...}` as Regatta writes
            // it; `raft.peer-addresses` likewise.
            Yaml::Hash(members)
                if key == "raft.initial-members" || key == "raft.peer-addresses" =>
            {
                let pairs: Result<Vec<String>, String> = members
                    .iter()
                    .map(|(id, address)| match (scalar(id), scalar(address)) {
                        (Some(id), Some(address)) => Ok(format!("{id}={address}")),
                        _ => Err(format!("{key}: entries are id: host:port")),
                    })
                    .collect();
                out.push((key, pairs?.join(",")));
            }
            Yaml::Hash(_) => flatten(&key, value, out)?,
            Yaml::Array(items) => {
                let items: Option<Vec<String>> = items.iter().map(scalar).collect();
                let items = items.ok_or_else(|| format!("{key}: list items must be scalars"))?;
                out.push((key, items.join(",")));
            }
            other => {
                let value = scalar(other).ok_or_else(|| format!("{key}: unsupported value"))?;
                out.push((key, value));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_dotted_keys_become_flags_before_the_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("regatta.yaml");
        std::fs::write(
            &path,
            "raft:\n  node-id: 2\n  initial-members:\n    1: 127.0.0.1:5011\n    2: 127.0.0.1:5012\napi.address: 127.0.0.1:9000\ndev: false\n",
        )
        .expect("write");
        let known: BTreeSet<String> =
            ["raft.node-id", "raft.initial-members", "api.address", "dev"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let arguments = vec![
            "regatta".to_string(),
            "leader".to_string(),
            "--config".to_string(),
            path.display().to_string(),
            "--raft.node-id".to_string(),
            "3".to_string(),
        ];
        let expanded = expand(arguments, &known).expect("expand");
        assert_eq!(
            expanded,
            [
                "regatta",
                "leader",
                "--raft.initial-members",
                "1=127.0.0.1:5011,2=127.0.0.1:5012",
                "--api.address",
                "127.0.0.1:9000",
                "--raft.node-id",
                "3"
            ],
            "a flag on the command line replaces the file's value"
        );
        // A list flag too: the command line's list replaces the file's
        // instead of adding to it (`--key=value` form included).
        let arguments = vec![
            "regatta".to_string(),
            "leader".to_string(),
            "--config".to_string(),
            path.display().to_string(),
            "--raft.initial-members=1=127.0.0.1:6011".to_string(),
        ];
        let expanded = expand(arguments, &known).expect("expand");
        assert_eq!(
            expanded,
            [
                "regatta",
                "leader",
                "--raft.node-id",
                "2",
                "--api.address",
                "127.0.0.1:9000",
                "--raft.initial-members=1=127.0.0.1:6011"
            ]
        );
        std::fs::write(&path, "raft:\n  nodeid: 2\n").expect("write");
        let error = expand(
            vec![
                "regatta".into(),
                "leader".into(),
                "--config".into(),
                path.display().to_string(),
            ],
            &known,
        )
        .expect_err("unknown key");
        assert!(error.contains("raft.nodeid"), "{error}");
        assert_eq!(env_name("raft.node-id"), "REGATTA_RAFT_NODE_ID");
    }
}
