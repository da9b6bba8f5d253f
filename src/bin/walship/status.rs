//! `walship status --admin ADDR`: a node's status as a table for a person,
//! or its JSON (`--json`) for machines.

use anyhow::{bail, Context};
use serde_json::Value;
use std::fmt::Write as _;
use walship::node::admin;

/// Prints the status of the node whose admin endpoint is `addr`.
pub async fn run(addr: &str, json: bool, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let (status, body) = admin::request(addr, "/status", None)
        .await
        .with_context(|| format!("GET http://{addr}/status"))?;
    if !status.is_success() {
        bail!("GET http://{addr}/status: {status}: {body}");
    }
    if json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let report: Value = serde_json::from_str(&body).context("status JSON")?;
    out.write_all(render(&report).as_bytes())?;
    Ok(())
}

/// 1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, 21st.
fn ordinal(n: u64) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// The table: one block per volume, one line per replica of a primary.
pub fn render(report: &Value) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "node {}  cluster {}  replication {}  nbd {}",
        text(&report["node"]),
        text(&report["cluster"]),
        text(&report["replication"]),
        text(&report["nbd"]),
    );
    let volumes = report["volumes"].as_array().cloned().unwrap_or_default();
    let [v, r, e, h, c, d, t, p, x] = [
        "VOLUME",
        "ROLE",
        "EPOCH",
        "HEAD",
        "COMMITTED",
        "DURABLE",
        "TAIL",
        "PINS",
        "EXPORT",
    ];
    let _ = writeln!(
        out,
        "\n{v:<12} {r:<8} {e:>6} {h:>10} {c:>10} {d:>10} {t:>10} {p:>5}  {x}"
    );
    for volume in &volumes {
        let status = &volume["status"];
        let primary = volume["role"] == "primary";
        let committed = if primary {
            text(&status["registry"]["history"]["committed"])
        } else {
            "-".into()
        };
        let pins = if primary {
            let count = |key: &str| status[key].as_u64().unwrap_or(0);
            (count("recovery_pins") + count("retention_holds") + count("snapshot_pins")).to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>5}  {}",
            text(&volume["name"]),
            text(&volume["role"]),
            text(&volume["assignment"]["epoch"]),
            text(&status["head"]),
            committed,
            text(&status["durable"]),
            if primary {
                text(&status["tail"])
            } else {
                "-".into()
            },
            pins,
            text(&volume["export"]),
        );
    }
    // A primary that does not serve yet: it waits for its replicas' answers.
    for volume in volumes.iter().filter(|v| v["status"]["state"] == "peering") {
        let status = &volume["status"];
        let _ = writeln!(
            out,
            "\n{}: peering with its replicas before serving: {} of {} needed answered (round {}; {})",
            text(&volume["name"]),
            text(&status["have"]),
            text(&status["need"]),
            text(&status["round"]),
            text(&status["reason"]),
        );
    }
    for volume in volumes.iter().filter(|v| v["role"] == "primary") {
        let status = &volume["status"];
        let head = status["head"].as_u64().unwrap_or(0);
        let senders = status["registry"]["senders"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if senders.is_empty() {
            continue;
        }
        let [r, e, s, f, l, w] = ["REPLICA", "ENDPOINT", "STATE", "FLUSHED", "LAG", "WHY"];
        let _ = writeln!(out, "\n{r:<16} {e:<22} {s:<18} {f:>10} {l:>8}  {w}");
        let recovering = status["recovery"].as_array().cloned().unwrap_or_default();
        for sender in &senders {
            let flushed = sender["flushed"].as_u64().unwrap_or(0);
            let progress = recovering
                .iter()
                .find(|p| p["replica"] == sender["replica"]);
            // A rebuild waiting for one of the node's slots says where.
            let state = progress
                .and_then(|p| p["queued"].as_array().cloned())
                .map_or_else(
                    || text(&sender["state"]),
                    |q| {
                        let at = q[0].as_u64().unwrap_or(0);
                        format!("queued ({} of {})", ordinal(at), text(&q[1]))
                    },
                );
            // A recovery under way says how far it is; otherwise why not.
            let why = match (progress, &sender["rebuild_need"], &sender["failure"]) {
                (Some(p), _, _) if p["queued"].is_null() => {
                    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
                    let eta = p["eta_seconds"]
                        .as_f64()
                        .map_or("-".to_owned(), |s| format!("{s:.0}s"));
                    format!(
                        "{}: {:.1} MiB to go at {:.1} MiB/s, eta {eta}",
                        text(&p["kind"]),
                        mib(&p["bytes_to_go"]),
                        mib(&p["rate"]),
                    )
                }
                (_, need, _) if !need.is_null() => text(&need["reason"]),

                (_, _, failure) if !failure.is_null() => text(&failure["reason"]),
                _ => String::new(),
            };
            let why = match not_converging(&sender["convergence"]) {
                Some(said) if why.is_empty() => said,
                Some(said) => format!("{why}; {said}"),
                None => why,
            };
            let _ = writeln!(
                out,
                "{:<16} {:<22} {:<18} {:>10} {:>8}  {}",
                text(&sender["replica"]),
                text(&sender["endpoint"]["data_addr"]),
                state,
                flushed,
                head.saturating_sub(flushed),
                why,
            );
        }
    }
    // The control plane's last failover decision for each volume (etcd).
    for volume in &volumes {
        let decision = &volume["control_decision"];
        if decision.is_null() {
            continue;
        }
        let outcome = match &decision["promoted"] {
            Value::Null if decision["over"].is_null() => {
                "nobody promoted: the volume stays down".to_owned()
            }
            Value::Null => "nobody promoted: the volume was down".to_owned(),
            promoted => format!("{} promoted", text(promoted)),
        };
        let _ = writeln!(
            out,
            "\n{}: primary {} lost in epoch {} (committed {}); {outcome} (by {})",
            text(&volume["name"]),
            text(&decision["lost_primary"]),
            text(&decision["epoch"]),
            text(&decision["committed"]),
            text(&decision["by"]),
        );
        if !decision["over"].is_null() {
            let _ = writeln!(out, "  over: {}", text(&decision["over"]));
        }
        if !decision["blocked"].is_null() {
            let _ = writeln!(out, "  blocked: {}", text(&decision["blocked"]));
        }
        let loss = &decision["data_loss"];
        if !loss.is_null() {
            let _ = writeln!(
                out,
                "  data loss accepted: committed LSNs {} to {} lost",
                loss["after"]
                    .as_u64()
                    .map_or("-".into(), |a| (a + 1).to_string()),
                text(&loss["through"]),
            );
            if !loss["beyond"].is_null() {
                let _ = writeln!(out, "  lost besides: {}", text(&loss["beyond"]));
            }
        }
        let rejected = decision["rejected"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for (node, reasons) in &rejected {
            let reasons: Vec<String> = reasons
                .as_array()
                .map(|r| r.iter().map(text).collect())
                .unwrap_or_default();
            let _ = writeln!(out, "  {node} rejected: {}", reasons.join("; "));
        }
    }
    out
}

/// What `walship status` says of a replica the engine judged not
/// converging: what reaches it against what the volume ingests, how far
/// behind, and the step taken.
fn not_converging(c: &Value) -> Option<String> {
    if c["converging"] != false {
        return None;
    }
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
    let eta = c["eta_seconds"]
        .as_u64()
        .map_or("never".to_owned(), |s| format!("in {s}s"));
    Some(format!(
        "NOT CONVERGING: {:.1} MiB/s reach it, ingest {:.1} MiB/s, {:.1} MiB behind, caught up {eta} (step: {})",
        mib(&c["drain_rate"]),
        mib(&c["ingest_rate"]),
        mib(&c["backlog_bytes"]),
        c["step"].as_str().unwrap_or("-"),
    ))
}
