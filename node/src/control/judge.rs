//! How a lost primary's replicas are judged: what etcd holds of each
//! (the primary's last report, the replica's own answer to the probe),
//! the engine's promotion rules over them, and what a commit mode adds.
//! The controller's automatic failover and an operator's promotion
//! accepting data loss both judge here.

use super::records::{DataLoss, Decision, Outcome, Probe, VolumeRecord};
use super::view::ClusterView;
use std::collections::BTreeMap;
use walship_engine::{
    evaluate_promotion, select_desperate, CommitMode, DataLossAccepted, Epoch, Ineligibility, Lsn,
    PromotionCandidate, PromotionError, ReplicaId, ReplicaState, Tick,
};

/// A live replica's reason the engine does not judge: it has not
/// reported since the controller's probe (so its report may predate a
/// write the lost primary acknowledged).
pub const UNANSWERED: &str = "unanswered: no report of its own since the controller's probe";

/// The probe that asks `record`'s replicas about its lost primary: one per
/// loss (a primary back and lost again in the same epoch, its address
/// rewritten at its start, is asked about again).
pub fn probe_of(view: &ClusterView, record: &VolumeRecord) -> Probe {
    Probe {
        epoch: record.assignment.epoch,
        lost_primary: record.assignment.primary.clone(),
        registered: view
            .addresses
            .get(&record.assignment.primary)
            .map_or(0, |a| a.revision),
    }
}

/// The revision `volume`'s probe about `record`'s lost primary was
/// written at, if it has been.
pub fn asked(view: &ClusterView, volume: &str, record: &VolumeRecord) -> Option<i64> {
    let question = probe_of(view, record);
    view.probes
        .get(volume)
        .filter(|p| p.value == question)
        .map(|p| p.revision)
}

/// A lost primary's replicas as etcd knows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidates {
    /// Each, for the engine's rules: the state is the primary's last
    /// judgement; the epoch and the durable LSN are the replica's own,
    /// fresher than the primary's report.
    pub list: Vec<PromotionCandidate>,
    /// Live replicas not yet to be judged, and why.
    pub unsettled: BTreeMap<String, &'static str>,
    /// The committed LSN the primary last reported.
    pub reported_committed: u64,
}

/// What `view` holds of `record`'s replicas: the primary's last progress
/// report and each replica's own; a live replica's counts once it
/// answers the probe written at revision `asked`.
pub fn candidates(
    view: &ClusterView,
    volume: &str,
    record: &VolumeRecord,
    asked: i64,
) -> Candidates {
    // Only a report of this record's primary in its epoch: an older one
    // (a primary promoted and lost before it reported) says nothing of
    // these replicas. A promotion writes the report it starts from.
    let progress = view
        .progress
        .get(volume)
        .filter(|p| p.epoch == record.assignment.epoch && p.primary == record.assignment.primary);
    let own = view.reports.get(volume);
    let mut list = Vec::new();
    let mut unsettled = BTreeMap::new();
    for server in record.assignment.replicas.keys() {
        let Ok(replica) = ReplicaId::new(volume, server) else {
            continue;
        };
        let state = progress
            .and_then(|p| p.replicas.get(server))
            .map_or(ReplicaState::Disconnected, |r| r.state);
        let mine = own.and_then(|own| own.get(server));
        let running = view.registered(server);
        if running && mine.is_none_or(|mine| mine.answered < asked) {
            unsettled.insert(server.clone(), UNANSWERED);
        }
        list.push(PromotionCandidate {
            replica,
            running,
            epoch: Epoch(mine.map_or(0, |r| r.epoch)),
            state,
            flushed: Lsn(mine.map_or(0, |r| r.durable)),
            last_heartbeat: Tick(0),
        });
    }
    Candidates {
        list,
        unsettled,
        reported_committed: progress.map_or(0, |p| p.committed),
    }
}

/// The controller's judgement of a volume whose primary is lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Judgement {
    /// Promoted or down, with every reason.
    pub decision: Decision,
    /// Live replicas yet to answer the probe.
    pub unsettled: BTreeMap<String, &'static str>,
}

/// Judges `record`'s replicas, whose primary is lost, by the answers to
/// the probe written at `asked`: the best eligible one is promoted
/// unless the commit mode forbids it (best_effort: never automatically;
/// sync_quorum: only once enough replicas answered).
pub fn judge(
    view: &ClusterView,
    volume: &str,
    record: &VolumeRecord,
    asked: i64,
    by: &str,
) -> Judgement {
    let Candidates {
        list,
        unsettled,
        reported_committed,
    } = candidates(view, volume, record, asked);
    let (committed, blocked) = match record.assignment.commit_mode {
        CommitMode::SyncQuorum => quorum_judgement(record, &list, &unsettled, reported_committed),
        CommitMode::SyncAll => (reported_committed, None),
        CommitMode::BestEffort => (
            reported_committed,
            Some(format!(
                "best_effort: the lost primary acknowledged writes once they were durable on \
                 it alone, so one acknowledged after its last report (committed \
                 {reported_committed}) may be on no replica; no automatic promotion can \
                 know. An operator's (walship promote --accept-data-loss) takes the replica \
                 with the most data and gives up the rest"
            )),
        ),
    };
    let report = evaluate_promotion(&list, Epoch(record.assignment.epoch), Lsn(committed));
    let mut rejected = reasons_by_node(&report.rejected);
    for (server, reason) in &unsettled {
        rejected
            .entry(server.clone())
            .or_default()
            .push((*reason).to_owned());
    }
    let promoted = report
        .ranked
        .iter()
        .map(|r| r.server())
        .find(|server| !unsettled.contains_key(*server))
        .filter(|_| blocked.is_none())
        .map(str::to_owned);
    let outcome = match promoted {
        Some(promoted) => Outcome::Promoted { promoted },
        None => Outcome::Down {
            blocked,
            over: None,
        },
    };
    Judgement {
        decision: Decision {
            epoch: record.assignment.epoch,
            lost_primary: record.assignment.primary.clone(),
            committed,
            outcome,
            rejected,
            by: by.to_owned(),
        },
        unsettled,
    }
}

/// The desperate path, an operator's explicit act, never the
/// controller's: the running replica with the most data, whatever its
/// state or epoch short of a partial image, is promoted; the decision
/// says which committed LSNs it lacks (lost) and which rules were waived.
pub fn accept_loss(
    view: &ClusterView,
    volume: &str,
    record: &VolumeRecord,
    asked: i64,
    (by, accepted): (&str, DataLossAccepted),
) -> Result<Decision, PromotionError> {
    let Candidates {
        list,
        reported_committed,
        ..
    } = candidates(view, volume, record, asked);
    let committed = Lsn(reported_committed);
    let report = evaluate_promotion(&list, Epoch(record.assignment.epoch), committed);
    let pick = select_desperate(&list, Epoch(record.assignment.epoch), committed, accepted)?;
    Ok(Decision {
        epoch: record.assignment.epoch,
        lost_primary: record.assignment.primary.clone(),
        committed: committed.get(),
        outcome: Outcome::AcceptedLoss {
            promoted: pick.replica.server().to_owned(),
            data_loss: DataLoss {
                after: pick.lost_from_exclusive.get(),
                through: pick.lost_to_inclusive.get(),
                waived: pick.waived.iter().map(ToString::to_string).collect(),
                beyond: (record.assignment.commit_mode == CommitMode::BestEffort).then(|| {
                    format!(
                        "best_effort: any write {} acknowledged after its last report \
                         (committed {}), on its own disk alone; how many, no report shows",
                        record.assignment.primary,
                        committed.get()
                    )
                }),
            },
        },
        rejected: reasons_by_node(&report.rejected),
        by: by.to_owned(),
    })
}

/// The node names of `reasons`' replicas, each with its reasons as text.
fn reasons_by_node(reasons: &[(ReplicaId, Vec<Ineligibility>)]) -> BTreeMap<String, Vec<String>> {
    reasons
        .iter()
        .map(|(replica, reasons)| {
            let reasons = reasons.iter().map(ToString::to_string).collect();
            (replica.server().to_owned(), reasons)
        })
        .collect()
}

/// Under sync_quorum a committed write is durable on a majority of the
/// members, so on at least `quorum − 1` replicas; the replicas that
/// answered (running, reported, settled) must be enough that every such
/// set includes one of them, or a write could be on dead replicas only.
/// Those answers bound what may have been committed: the committed LSN
/// judged against is the highest durable LSN among them in the current
/// epoch, so only a replica holding all of it is eligible.
pub(super) fn quorum_judgement(
    record: &VolumeRecord,
    candidates: &[PromotionCandidate],
    unsettled: &BTreeMap<String, &str>,
    reported_committed: u64,
) -> (u64, Option<String>) {
    let replicas = record.assignment.replicas.len();
    let members = replicas + 1;
    let quorum = members / 2 + 1;
    let needed = replicas + 2 - quorum;
    let answered: Vec<&PromotionCandidate> = candidates
        .iter()
        .filter(|c| c.running && !unsettled.contains_key(c.replica.server()))
        .collect();
    let highest = answered
        .iter()
        .filter(|c| c.epoch == Epoch(record.assignment.epoch))
        .map(|c| c.flushed.get())
        .fold(reported_committed, u64::max);
    let blocked = (answered.len() < needed).then(|| {
        format!(
            "sync_quorum: {} of {replicas} replicas answered, {needed} needed so that one \
             holds every committed write",
            answered.len()
        )
    });
    (highest, blocked)
}
