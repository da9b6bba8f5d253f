//! `walship recovery --admin ADDR [--rate R] [--floor F] [--max-rebuilds N]
//! [--receive-rate R]`:
//! a node's recovery budget, shown, or changed at run time (each flag left
//! out keeps its value; a refused change applies nothing and exits 1).

use anyhow::{bail, Context};
use serde_json::Value;
use walship::node::admin::{self, RecoveryRequest};

/// Shows the budget of the node at `addr`, after applying `change` if it
/// changes anything.
pub async fn run(
    addr: &str,
    change: RecoveryRequest,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let body = (change != RecoveryRequest::default())
        .then(|| serde_json::to_string(&change))
        .transpose()?;
    let verb = if body.is_some() { "POST" } else { "GET" };
    let (status, answer) = admin::request(addr, "/recovery", body)
        .await
        .with_context(|| format!("{verb} http://{addr}/recovery"))?;
    if !status.is_success() {
        bail!(
            "{verb} http://{addr}/recovery: {status}: {}",
            answer.trim_end()
        );
    }
    let budget: Value = serde_json::from_str(&answer).context("recovery JSON")?;
    out.write_all(render(&budget).as_bytes())?;
    Ok(())
}

/// The budget for a person.
pub fn render(budget: &Value) -> String {
    let rate = |v: &Value| match v.as_u64() {
        Some(bytes) => format!("{:.1} MiB/s", bytes as f64 / 1048576.0),
        None => "unlimited".into(),
    };
    let limits = &budget["limits"];
    let list = |v: &Value| {
        let names: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            "-".to_owned()
        } else {
            names.join(", ")
        }
    };
    format!(
        "rate {}  floor {} per recovery  max rebuilds {}  receive rate {}\nrecoveries sending {}  bytes sent {} ({} boosted)\nrecoveries receiving {}  bytes received {}\nrebuilds running: {}\nrebuilds queued (first first): {}\n",
        rate(&limits["rate"]),
        rate(&limits["floor"]),
        limits["max_rebuilds"]
            .as_u64()
            .map_or("unlimited".to_owned(), |n| n.to_string()),
        rate(&limits["receive_rate"]),
        budget["recovering"],
        budget["bytes_sent"],
        budget["boosted_bytes"],
        budget["receiving"],
        budget["bytes_received"],
        list(&budget["rebuilds_running"]),
        list(&budget["rebuilds_queued"]),
    )
}
