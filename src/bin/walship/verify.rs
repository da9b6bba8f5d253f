//! `walship verify --admin ADDR VOLUME [--repair]`: compares every in-sync
//! replica of a volume with its primary at one LSN, region by region,
//! while writes go on; prints what differs, and exits 1 when anything does
//! (or a replica could not be compared). With `--repair`, a replica that
//! differs is rebuilt, every region compared.

use anyhow::{bail, Context};
use serde_json::Value;

/// Runs a verify on the node at `addr` (the volume's primary); returns
/// whether everything compared equal.
pub async fn run(
    addr: &str,
    volume: &str,
    repair: bool,
    json: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<bool> {
    let path = match repair {
        true => format!("/volumes/{volume}/verify?repair=true"),
        false => format!("/volumes/{volume}/verify"),
    };
    let (status, body) = walship::node::admin::request(addr, &path, Some(String::new()))
        .await
        .with_context(|| format!("POST http://{addr}{path}"))?;
    if !status.is_success() {
        bail!("POST http://{addr}{path}: {status}: {}", body.trim_end());
    }
    if json {
        writeln!(out, "{body}")?;
    }
    let report: Value = serde_json::from_str(&body).context("verify JSON")?;
    let replicas = report["replicas"].as_array().cloned().unwrap_or_default();
    // Nothing compared is nothing verified.
    let mut clean = !replicas.is_empty();
    if replicas.is_empty() && !json {
        writeln!(out, "{volume}: no replica is in sync: nothing verified")?;
    }
    if !json {
        writeln!(
            out,
            "{volume}: {} in-sync replica(s) compared with the primary (its extent pinned at lsn {})",
            replicas.len(),
            report["pinned"]
        )?;
    }
    for replica in &replicas {
        let name = replica["replica"].as_str().unwrap_or("?");
        let mismatches = replica["mismatches"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let line = if let Some(error) = replica["error"].as_str() {
            clean = false;
            format!("{name}: not compared: {error}")
        } else if mismatches.is_empty() {
            format!(
                "{name}: clean at lsn {} ({} regions of {} bytes)",
                replica["lsn"], replica["regions"], replica["region_bytes"]
            )
        } else {
            clean = false;
            let ranges: Vec<String> = mismatches
                .iter()
                .map(|m| {
                    let (lba, blocks) = (
                        m["lba"].as_u64().unwrap_or(0),
                        m["blocks"].as_u64().unwrap_or(0),
                    );
                    format!("blocks {lba}-{}", lba + blocks.saturating_sub(1))
                })
                .collect();
            format!(
                "{name}: DIFFERS at lsn {}: {}{}",
                replica["lsn"],
                ranges.join(", "),
                match (&replica["repairing"], replica["repair_refused"].as_str()) {
                    (Value::Bool(true), _) => " (rebuilding what differs)".to_owned(),
                    (_, Some(why)) => format!(" ({why})"),
                    _ => String::new(),
                }
            )
        };
        if !json {
            writeln!(out, "{line}")?;
        }
    }
    Ok(clean)
}
