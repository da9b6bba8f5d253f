//! What `/metrics` renders: the process's Prometheus recorder, the
//! per-volume gauges set from a fresh status at each scrape, and the
//! totals that only grow, counted forward.

use super::*;

/// The process's Prometheus recorder: installed by the first node, before
/// any actor registers a metric; `None` when the embedder installed
/// another recorder first.
///
/// A histogram keeps every sample it records until upkeep drains it into
/// its buckets. `install_recorder` (unlike the crate's HTTP exporter, whose
/// features are off) runs no upkeep, so without scrapes the samples of
/// every mailbox and fsync histogram piled up without bound: a thread for
/// the life of the process drains them every [`UPKEEP`], as the crate's
/// own exporter does.
pub(crate) fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Fixed buckets: a histogram is a bucket count each, where
            // the default summaries keep a sketch whose memory grows with
            // the spread of the values (560 MB in a 1000-volume node).
            let handle = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()?;
            crate::help::describe();
            let upkept = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP);
                    upkept.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no metrics upkeep thread: histogram samples grow until scraped");
            }
            Some(handle)
        })
        .as_ref()
}

/// The actor kinds whose mailboxes are summed per kind.
const MAILBOX_KINDS: [&str; 3] = ["volume", "sender", "receiver"];

/// The engines' decision totals as last scraped, per engine (node, volume
/// and the term it opened in) and event. An engine counts from zero, and a
/// volume that changes role reopens with a new one in a new term; a
/// Prometheus counter must never go back, so it grows by what each engine's
/// total grew since the last scrape. (What a replaced engine decided after
/// the last scrape goes uncounted.)
/// The same goes for every total the node reports (a volume's bytes
/// shipped, the budget's bytes sent): each is a counter grown by what the
/// total grew, kept per instance (`<node>/<volume>/<term>`, or
/// `<node>/budget`) and per series; a volume reopened in a new term starts
/// a new total, and its older terms' are let go.
static TOTALS_SEEN: Mutex<BTreeMap<String, BTreeMap<String, u64>>> = Mutex::new(BTreeMap::new());

/// Grows the counter `name` with `labels` by what `total`, kept by
/// `instance`, grew since the last scrape. Only forward: two scrapes at
/// once, one holding an older status, must not count a step twice.
fn count_total(name: &'static str, labels: &[(&'static str, String)], instance: &str, total: u64) {
    let series = format!("{name}{labels:?}");
    let grown = {
        let mut seen = TOTALS_SEEN.lock().unwrap_or_else(PoisonError::into_inner);
        let last = seen
            .entry(instance.to_owned())
            .or_default()
            .entry(series)
            .or_insert(0);
        let grown = total.saturating_sub(*last);
        *last = (*last).max(total);
        grown
    };
    metrics::counter!(name, labels).increment(grown);
}

/// Lets go of the totals of `volume`'s terms on `node` other than
/// `current` (`<node>/<volume>/<term>`).
fn forget_older_terms(node: &str, volume: &str, current: &str) {
    let prefix = format!("{node}/{volume}/");
    TOTALS_SEEN
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|instance, _| !instance.starts_with(&prefix) || instance == current);
}

/// The per-replica recovery series the last scrape set, by labels
/// (volume, replica, kind). The recorder never forgets a series: one whose
/// recovery ended, or whose kind changed (queued, then running), would
/// keep its last figures, so the next scrape sets it to nothing to go.
static RECOVERY_SEEN: Mutex<BTreeSet<[String; 3]>> = Mutex::new(BTreeSet::new());

/// Sets every recovery series seen before and not now to nothing to go.
fn clear_ended_recoveries(now: BTreeSet<[String; 3]>) {
    let mut seen = RECOVERY_SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    for [volume, replica, kind] in seen.difference(&now) {
        let labels = [
            ("volume", volume.clone()),
            ("replica", replica.clone()),
            ("kind", kind.clone()),
        ];
        metrics::gauge!("walship_replica_recovery_bytes_to_go", &labels).set(0.0);
        metrics::gauge!("walship_replica_recovery_rate_bytes_per_second", &labels).set(0.0);
        metrics::gauge!("walship_replica_recovery_eta_seconds", &labels).set(-1.0);
        metrics::gauge!("walship_replica_rebuild_queue_position", &labels).set(0.0);
    }
    *seen = now;
}

/// How often histogram samples are drained into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Bucket bounds of every histogram, in seconds: 10 µs to 10 s, where
/// mailbox waits, handlers and fsyncs fall.
const SECONDS_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Sets the per-volume gauges from a fresh status of each volume, then
/// renders everything the recorder holds (mailboxes included).
pub(super) async fn metrics(node: &Node) -> String {
    let Some(prometheus) = prometheus() else {
        return "# another metrics recorder was installed before the node\n".into();
    };
    // Per actor kind: messages queued, and the oldest one's age (zero for
    // a kind this node has no actor of any more).
    let mut mailboxes: BTreeMap<&'static str, (u64, u64)> =
        MAILBOX_KINDS.iter().map(|&kind| (kind, (0, 0))).collect();
    let mut recovering = BTreeSet::new();
    for report in node.report().await {
        for mailbox in report.status.mailboxes() {
            let kind = mailboxes.entry(mailbox.kind).or_default();
            kind.0 += mailbox.depth;
            kind.1 = kind.1.max(mailbox.oldest_age_us);
        }
        let volume = report.name.clone();
        let gauge = |name: &'static str, value: u64| {
            metrics::gauge!(name, "volume" => volume.clone()).set(value as f64);
        };
        gauge("walship_volume_epoch", report.assignment.epoch);
        match &report.status {
            NodeStatus::Primary(status) => {
                let history = &status.registry.history;
                gauge("walship_volume_head_lsn", status.head);
                gauge("walship_volume_durable_lsn", status.durable);
                gauge("walship_volume_committed_lsn", history.committed.get());
                gauge("walship_volume_tail_lsn", status.tail);
                gauge("walship_volume_checkpoint_lsn", status.checkpoint);

                gauge("walship_volume_recovery_pins", status.recovery_pins as u64);
                gauge(
                    "walship_volume_retention_holds",
                    status.retention_holds as u64,
                );
                gauge("walship_volume_snapshot_pins", status.snapshot_pins as u64);
                // Recoveries by outcome: every plan, completion, abort and
                // invalidation the engine decided, counted since it opened.
                let engine = format!(
                    "{}/{volume}/{}",
                    node.config().node,
                    report.assignment.term()
                );
                forget_older_terms(&node.config().node, &volume, &engine);
                for (event, count) in &status.registry.decision_totals {
                    let labels = [("volume", volume.clone()), ("event", (*event).to_owned())];
                    count_total("walship_recovery_decisions_total", &labels, &engine, *count);
                }
                for sender in &status.registry.senders {
                    let labels = [
                        ("volume", volume.clone()),
                        ("replica", sender.replica.to_string()),
                    ];
                    let lag = status.head.saturating_sub(sender.flushed.get());
                    metrics::gauge!("walship_replica_lag_lsns", &labels).set(lag as f64);
                    for state in walship_engine::ReplicaState::ALL {
                        let mut labels = labels.to_vec();
                        labels.push(("state", state.as_str().to_owned()));
                        let on = f64::from(u8::from(sender.state == state));
                        metrics::gauge!("walship_replica_state", &labels).set(on);
                    }
                    // Behind and not gaining on the ingest, and the step
                    // taken about it (0 watching or not watched, 1 boost,
                    // 2 backpressure).
                    let convergence = sender.convergence.as_ref();
                    let not = convergence.is_some_and(|c| c.converging == Some(false));
                    metrics::gauge!("walship_replica_not_converging", &labels)
                        .set(f64::from(u8::from(not)));
                    let step = convergence.map_or(0u8, |c| match c.step {
                        walship_engine::ConvergenceStep::Watching => 0,
                        walship_engine::ConvergenceStep::Boost => 1,
                        walship_engine::ConvergenceStep::Backpressure => 2,
                    });
                    metrics::gauge!("walship_replica_convergence_step", &labels)
                        .set(f64::from(step));
                }
                let held = &status.write_backpressure;
                let limit = held.limit.map_or(-1.0, |rate| rate as f64);
                metrics::gauge!("walship_volume_write_limit_bytes_per_second", "volume" => volume.clone())
                    .set(limit);
                for progress in &status.recovery {
                    recovering.insert([
                        volume.clone(),
                        progress.replica.to_string(),
                        progress.kind.clone(),
                    ]);
                    let labels = [
                        ("volume", volume.clone()),
                        ("replica", progress.replica.to_string()),
                        ("kind", progress.kind.clone()),
                    ];
                    metrics::gauge!("walship_replica_recovery_bytes_to_go", &labels)
                        .set(progress.bytes_to_go as f64);
                    metrics::gauge!("walship_replica_recovery_rate_bytes_per_second", &labels)
                        .set(progress.rate as f64);
                    metrics::gauge!("walship_replica_recovery_eta_seconds", &labels)
                        .set(progress.eta_seconds.unwrap_or(-1.0));
                    let place = progress.queued.map_or(0, |(at, _)| at);
                    metrics::gauge!("walship_replica_rebuild_queue_position", &labels)
                        .set(place as f64);
                }
                for (replica, lag) in &status.lag_bytes {
                    let labels = [("volume", volume.clone()), ("replica", replica.to_string())];
                    metrics::gauge!("walship_replica_lag_bytes", &labels).set(*lag as f64);
                }
                for (replica, sent) in &status.bytes_sent {
                    let labels = [("volume", volume.clone()), ("replica", replica.to_string())];
                    count_total(
                        "walship_replica_shipped_bytes_total",
                        &labels,
                        &engine,
                        *sent,
                    );
                }
            }
            NodeStatus::Replica(status) => {
                gauge("walship_volume_head_lsn", status.head);
                gauge("walship_volume_durable_lsn", status.durable);
                gauge("walship_volume_checkpoint_lsn", status.checkpoint);
            }
            NodeStatus::Peering(_) => {}
        }
    }
    clear_ended_recoveries(recovering);
    // The node's recovery budget.
    let recovery = node.recovery().status();
    let budget = format!("{}/budget", node.config().node);
    let rate = recovery.limits.rate.unwrap_or(0) as f64;
    metrics::gauge!("walship_recovery_rate_limit_bytes_per_second").set(rate);
    metrics::gauge!("walship_recovery_sending").set(recovery.recovering as f64);
    metrics::gauge!("walship_recovery_rebuilds_running")
        .set(recovery.rebuilds_running.len() as f64);
    metrics::gauge!("walship_recovery_rebuilds_queued").set(recovery.rebuilds_queued.len() as f64);
    count_total(
        "walship_recovery_sent_bytes_total",
        &[],
        &budget,
        recovery.bytes_sent,
    );
    let receive = recovery.limits.receive_rate.unwrap_or(0) as f64;
    metrics::gauge!("walship_recovery_receive_rate_limit_bytes_per_second").set(receive);
    metrics::gauge!("walship_recovery_receiving").set(recovery.receiving as f64);
    count_total(
        "walship_recovery_received_bytes_total",
        &[],
        &budget,
        recovery.bytes_received,
    );
    count_total(
        "walship_recovery_boosted_bytes_total",
        &[],
        &budget,
        recovery.boosted_bytes,
    );
    for (kind, (depth, oldest_us)) in mailboxes {
        metrics::gauge!("walship_mailbox_depth", "actor" => kind).set(depth as f64);
        metrics::gauge!("walship_mailbox_oldest_age_seconds", "actor" => kind)
            .set(oldest_us as f64 / 1e6);
    }
    prometheus.render()
}
