//! fio through walship's NBD export, for the benches that measure a block
//! client: one run's figures from fio's JSON.

use crate::nodes::run;
use anyhow::{bail, Context as _};
use serde_json::Value;
use std::time::Duration;

/// One fio run's figures.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub flush_p50_us: f64,
    pub flush_p99_us: f64,
}

/// 4 KiB random writes over the first `size_mib` of the export at `uri`,
/// `depth` in flight, a flush every `depth` writes, for `seconds`.
pub async fn fio(uri: &str, depth: u32, seconds: u64, size_mib: u64) -> anyhow::Result<Figures> {
    let name = format!("--name=qd{depth}");
    let uri = format!("--uri={uri}");
    let depth_arg = format!("--iodepth={depth}");
    // fio's nbd engine flushes on fsync (fdatasync is EINVAL there).
    let flush = format!("--fsync={depth}");
    let runtime = format!("--runtime={seconds}");
    let size = format!("--size={size_mib}M");
    let args = [
        name.as_str(),
        "--ioengine=nbd",
        &uri,
        "--rw=randwrite",
        "--bs=4k",
        &size,
        &depth_arg,
        &flush,
        "--time_based",
        &runtime,
        "--output-format=json",
    ];
    let limit = Duration::from_secs(seconds + 60);
    let output = run("fio", &args, limit).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "fio {args:?}: {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // The engine says "connected to NBD server" before the JSON.
    let json = stdout.find('{').map_or("", |at| &stdout[at..]);
    let json: Value = serde_json::from_str(json).context("fio JSON")?;
    let job = &json["jobs"][0];
    let percentile = |lat: &Value, p: &str| lat["percentile"][p].as_f64().unwrap_or(f64::NAN) / 1e3;
    Ok(Figures {
        iops: job["write"]["iops"].as_f64().unwrap_or(0.0),
        p50_us: percentile(&job["write"]["clat_ns"], "50.000000"),
        p99_us: percentile(&job["write"]["clat_ns"], "99.000000"),
        flush_p50_us: percentile(&job["sync"]["lat_ns"], "50.000000"),
        flush_p99_us: percentile(&job["sync"]["lat_ns"], "99.000000"),
    })
}

/// The median (NaN of none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
