//! Log matching over random failover histories: the divergence point the
//! engine computes from two epoch histories is exactly where the two logs
//! stop holding the same entries, and a handshake's plan (truncate, then
//! ship from the primary) leaves the replica with the primary's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use walship_engine::*;

/// A log as the epochs of its entries: `log[i]` is the epoch of LSN `i + 1`.
type Log = Vec<u64>;

fn history_of(log: &Log) -> EpochHistory {
    let mut history = EpochHistory::new();
    for (i, epoch) in log.iter().enumerate() {
        let start = EpochStart {
            epoch: Epoch(*epoch),
            first: Lsn(i as u64 + 1),
        };
        if history.newest().map(|e| e.epoch) != Some(start.epoch) {
            history.record(start).unwrap();
        }
    }
    history
}

/// How many leading entries two logs share.
fn common_prefix(a: &Log, b: &Log) -> u64 {
    a.iter().zip(b).take_while(|(x, y)| x == y).count() as u64
}

/// One step of a cluster's life: node `primary` leads a new epoch, appends
/// `writes` entries, then ships its log to `to`, up to `upto` entries of it.
#[derive(Debug, Clone)]
struct Step {
    primary: usize,
    writes: usize,
    shipments: Vec<(usize, usize)>,
}

const NODES: usize = 4;

fn step() -> impl Strategy<Value = Step> {
    (
        0..NODES,
        0..40usize,
        proptest::collection::vec((0..NODES, 0..120usize), 0..4),
    )
        .prop_map(|(primary, writes, shipments)| Step {
            primary,
            writes,
            shipments,
        })
}

/// Plays the steps with replication that keeps log matching true (a replica
/// drops what it does not share with the primary before it takes more).
fn play(steps: &[Step]) -> Vec<Log> {
    let mut logs: Vec<Log> = vec![Vec::new(); NODES];
    for (epoch, step) in steps.iter().enumerate() {
        let epoch = epoch as u64 + 1;
        let primary = step.primary;
        logs[primary].extend(std::iter::repeat_n(epoch, step.writes));
        for &(to, upto) in &step.shipments {
            if to == primary {
                continue;
            }
            let source = logs[primary].clone();
            let keep = common_prefix(&logs[to], &source) as usize;
            let upto = upto.clamp(keep, source.len());
            logs[to].truncate(keep);
            logs[to].extend_from_slice(&source[keep..upto]);
        }
    }
    logs
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_divergence_point_is_where_the_logs_stop_matching(
        steps in proptest::collection::vec(step(), 1..12),
        primary in 0..NODES,
        replica in 0..NODES,
    ) {
        let logs = play(&steps);
        let (p, r) = (&logs[primary], &logs[replica]);
        let d = divergence(&history_of(p), Lsn(p.len() as u64), &history_of(r), Lsn(r.len() as u64));
        prop_assert_eq!(d.point, Lsn(common_prefix(p, r)));
        let shorter = p.len().min(r.len()) as u64;
        prop_assert_eq!(d.conflict.is_some(), d.point.get() < shorter);
    }

    #[test]
    fn a_handshake_plan_leaves_the_replica_with_the_primarys_log(
        steps in proptest::collection::vec(step(), 1..12),
        primary in 0..NODES,
        replica in 0..NODES,
        committed_back in 0..30u64,
    ) {
        let logs = play(&steps);
        let (p, r) = (&logs[primary], &logs[replica]);
        let head = Lsn(p.len() as u64);
        let committed = Lsn(head.get().saturating_sub(committed_back));
        let history = RetainedHistory { head, tail: Lsn::ZERO, committed, checkpoint: Lsn::ZERO, checkpoint_trusted: true };
        let log = ReplicaLog { flushed: Lsn(r.len() as u64), checkpoint: Lsn::ZERO, epochs: history_of(r), committed: Lsn::ZERO, partial: None };
        let mut result = r.clone();
        match classify_handshake(&log, &history, &history_of(p)) {
            HandshakeOutcome::ZeroGap { .. } => {}
            HandshakeOutcome::CatchUp { start, target, truncate_to, .. } => {
                if let Some(to) = truncate_to {
                    prop_assert_eq!(to, start);
                    result.truncate(to.get() as usize);
                }
                prop_assert_eq!(result.len() as u64, start.get(), "ships from where the replica ends");
                result.extend_from_slice(&p[start.get() as usize..target.get() as usize]);
            }
            HandshakeOutcome::NeedsRebuild { proof } => {
                prop_assert!(false, "nothing is recycled, yet: {}", proof.reason);
            }
        }
        // In sync at committed: the replica holds exactly the primary's committed prefix.
        prop_assert_eq!(&result[..], &p[..committed.get() as usize]);
    }
}
