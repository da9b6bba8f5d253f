//! The `# HELP` line of every series `/metrics` shows, in one place: a
//! series added without one fails `tests/node.rs` (every `# TYPE` has its
//! `# HELP`).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Describes every series to the recorder (once, when it is installed).
pub(crate) fn describe() {
    crate::nbd::metrics::describe();
    // Mailboxes (the actor runtime's).
    describe_gauge!(
        "walship_mailbox_depth",
        "Messages waiting in the mailboxes of one actor kind"
    );
    describe_gauge!(
        "walship_mailbox_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest message waiting in the mailboxes of one actor kind"
    );
    describe_counter!("walship_mailbox_sent_total", "Messages sent to an actor");
    describe_counter!(
        "walship_mailbox_rejected_total",
        "Messages an actor's mailbox refused (closed or full)"
    );
    describe_counter!(
        "walship_mailbox_fenced_total",
        "Messages an actor dropped as from an older epoch"
    );
    describe_histogram!(
        "walship_mailbox_wait_seconds",
        Unit::Seconds,
        "Time a message waited in its mailbox"
    );
    describe_histogram!(
        "walship_handler_seconds",
        Unit::Seconds,
        "Time an actor's handler took for a message"
    );
    describe_histogram!(
        "walship_wal_sync_seconds",
        Unit::Seconds,
        "Time each WAL sync took (group commit), by role"
    );
    // Volumes.
    describe_gauge!("walship_volume_epoch", "The epoch the volume runs in");
    describe_gauge!(
        "walship_volume_head_lsn",
        "The last LSN in the volume's WAL"
    );
    describe_gauge!(
        "walship_volume_durable_lsn",
        "The last LSN synced in the volume's WAL"
    );
    describe_gauge!(
        "walship_volume_committed_lsn",
        "The last LSN committed under the volume's commit mode"
    );
    describe_gauge!(
        "walship_volume_checkpoint_lsn",
        "The LSN the volume's extent holds everything through"
    );
    describe_gauge!(
        "walship_volume_tail_lsn",
        "The oldest LSN the volume's WAL still holds"
    );
    describe_gauge!(
        "walship_volume_recovery_pins",
        "WAL pins held by recoveries"
    );
    describe_gauge!(
        "walship_volume_retention_holds",
        "Replicas' retention holds on the WAL"
    );
    describe_gauge!(
        "walship_volume_snapshot_pins",
        "Snapshot pins holding the checkpointer"
    );
    describe_gauge!(
        "walship_volume_write_limit_bytes_per_second",
        "The rate the volume's writes are held to for a replica that is not converging (-1: free)"
    );
    describe_histogram!(
        "walship_volume_write_delay_seconds",
        Unit::Seconds,
        "How long the answer of each write held back by backpressure waited"
    );
    // Replicas, as their primary sees them.
    describe_gauge!(
        "walship_replica_state",
        "1 for the replica's state, 0 for the others"
    );
    describe_gauge!(
        "walship_replica_lag_lsns",
        "LSNs between the primary's head and what the replica acknowledged durable"
    );
    describe_gauge!(
        "walship_replica_lag_bytes",
        "WAL bytes after what the replica acknowledged durable"
    );
    describe_counter!(
        "walship_replica_shipped_bytes_total",
        Unit::Bytes,
        "Bytes the primary sent the replica (WAL batches and image chunks)"
    );
    describe_gauge!(
        "walship_replica_not_converging",
        "1 while the replica is judged not to gain on the volume's ingest"
    );
    describe_gauge!(
        "walship_replica_convergence_step",
        "The step taken for a replica not converging: 0 none, 1 boost, 2 backpressure"
    );
    describe_gauge!(
        "walship_replica_recovery_bytes_to_go",
        "Bytes a recovering replica still needs, by kind of recovery"
    );
    describe_gauge!(
        "walship_replica_recovery_rate_bytes_per_second",
        "What a recovering replica receives per second, over the last seconds"
    );
    describe_gauge!(
        "walship_replica_recovery_eta_seconds",
        Unit::Seconds,
        "Seconds a recovery should take yet at its rate (-1: unknown)"
    );
    describe_gauge!(
        "walship_replica_rebuild_queue_position",
        "A queued rebuild's place in the node's queue (0: not queued)"
    );
    // The node's recovery budget, decisions and verifies.
    describe_counter!(
        "walship_recovery_decisions_total",
        "Recovery decisions the engines made, by event (plans, completions, aborts...)"
    );
    describe_gauge!(
        "walship_recovery_rate_limit_bytes_per_second",
        "The rate catch-ups and rebuilds sent share (0: unlimited)"
    );
    describe_gauge!(
        "walship_recovery_receive_rate_limit_bytes_per_second",
        "The rate catch-ups and rebuilds received share (0: unlimited)"
    );
    describe_gauge!(
        "walship_recovery_sending",
        "Catch-ups and rebuilds the node is sending"
    );
    describe_gauge!(
        "walship_recovery_receiving",
        "Catch-ups and rebuilds the node's replicas are receiving"
    );
    describe_gauge!(
        "walship_recovery_rebuilds_running",
        "Rebuilds holding one of the node's slots"
    );
    describe_gauge!(
        "walship_recovery_rebuilds_queued",
        "Rebuilds waiting for one of the node's slots"
    );
    describe_counter!(
        "walship_recovery_sent_bytes_total",
        Unit::Bytes,
        "Bytes recoveries sent through the node's budget"
    );
    describe_counter!(
        "walship_recovery_received_bytes_total",
        Unit::Bytes,
        "Bytes recoveries received through the node's budget"
    );
    describe_counter!(
        "walship_recovery_boosted_bytes_total",
        Unit::Bytes,
        "Of the bytes sent, those of boosted catch-ups (first call on the rate)"
    );
    describe_counter!(
        "walship_verify_runs_total",
        "Online verifies run, per volume"
    );
    describe_gauge!(
        "walship_verify_mismatched_regions",
        "Regions the last verify found different, per replica"
    );
}
