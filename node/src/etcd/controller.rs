//! The controller's shell: every node campaigns in an etcd election on
//! its lease; the leader, alone, looks at the cluster every
//! [`CONTROL_EVERY`] (a view kept by a watch: one range read when elected,
//! then only the changes), lets [`Controller::decide`] judge it and
//! carries out each action as one guarded transaction ([`Store`]). An operator's
//! promotion accepting data loss ([`promote_accepting_loss`]) judges by
//! the same rules ([`accept_loss`]) and writes through the same store.

use super::keys::election_key;
use super::session::stopping;
use super::store::{Leader, Store};
use super::watched::WatchedView;
use crate::control::{
    accept_loss, asked, judge, probe_of, promotion, Action, Controller, Decision, Write,
};
use futures::StreamExt;
use std::time::Duration;
use tokio::sync::watch;
use walship_engine::DataLossAccepted;

/// How often the elected controller looks at the records.
pub const CONTROL_EVERY: Duration = Duration::from_millis(250);
/// How soon it looks again while replicas have yet to answer its probe.
pub const ANSWER_EVERY: Duration = Duration::from_millis(20);

/// Campaigns for the controller's seat on `lease`; once elected, looks at
/// the records every [`CONTROL_EVERY`].
pub(super) async fn control(
    mut client: etcd_client::Client,
    cluster: String,
    me: String,
    (lease, ttl): (i64, Duration),
    mut stopped: watch::Receiver<bool>,
) -> Option<String> {
    let election = election_key(&cluster);
    // A campaign waits until this node leads; the client's request timeout
    // cuts each wait short, and the node campaigns again (on the same
    // lease: the same candidacy). Losing the lease ends the node anyway.
    let leader: Leader = loop {
        let elected = tokio::select! {
            () = stopping(&mut stopped) => return None,
            elected = client.campaign(election.as_str(), me.as_str(), lease) => elected,
        };
        match elected {
            Ok(elected) => match elected.leader() {
                Some(leader) => break (leader.key().to_vec(), leader.rev()),
                None => return Some("controller election: elected without a leader key".into()),
            },
            Err(e) => {
                tracing::debug!(error = %e, "etcd: controller campaign: again");
                tokio::select! {
                    () = stopping(&mut stopped) => return None,
                    () = tokio::time::sleep(CONTROL_EVERY) => {}
                }
            }
        }
    };
    tracing::info!(controller = %me, "etcd: elected controller");
    let mut store = Store::new(client, &cluster, Some(leader));
    let mut view = WatchedView::new();
    let mut controller = Controller::new(&me, ttl);
    let mut pause = CONTROL_EVERY;
    loop {
        tokio::select! {
            () = stopping(&mut stopped) => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = match pass(&mut store, &mut view, &mut controller, &me).await {
            Ok(true) => ANSWER_EVERY,
            Ok(false) => CONTROL_EVERY,
            Err(e) => {
                tracing::warn!(error = %e, "etcd: controller pass failed");
                CONTROL_EVERY
            }
        };
    }
}

/// How many of a pass's transactions are in flight at once. Each action
/// concerns its own volume (and its guards hold or fail for it alone), so
/// they may land in any order;
/// one at a time, a node's failover at 10,000 volumes (3,334 probes, then
/// 3,334 promotions, each a round trip and a wait for its watch) took the
/// last volume 14 s to be promoted.
const WRITES_AT_ONCE: usize = 8;

/// The most compares, or writes, one transaction carries (etcd's
/// `--max-txn-ops`, 128 by default): a pass's actions go out that many at
/// a time, as one transaction each (128 probes, or 42 promotions),
/// each guard of each action checked. etcd's CPU was the bottleneck of a
/// failover at scale, and most of it went to one transaction per action.
const OPS_PER_TXN: usize = 128;

/// One pass: brings the view up to date, decides, carries out the
/// actions (grouped into transactions of at most [`OPS_PER_TXN`]
/// operations, [`WRITES_AT_ONCE`] at a time, at most one action per
/// volume), waits for its own writes to reach the view and says what
/// each did; whether to look again soon (answers awaited).
async fn pass(
    store: &mut Store,
    view: &mut WatchedView,
    controller: &mut Controller,
    me: &str,
) -> Result<bool, etcd_client::Error> {
    let actions = controller.decide(view.current(store).await?, std::time::Instant::now());
    let soon = actions.iter().any(Action::soon);
    // Collected first: a stream over the map's closure is not known to be
    // Send for every lifetime (rust#102211).
    let carried: Vec<_> = groups(&actions)
        .into_iter()
        .map(|group| carry_out(store.clone(), group, me))
        .collect();
    let groups: Vec<_> = futures::stream::iter(carried)
        .buffered(WRITES_AT_ONCE)
        .collect()
        .await;
    let mut written: Vec<Option<i64>> = vec![None; actions.len()];
    let mut failed = None;
    for (group, revisions, error) in groups {
        for (i, revision) in group.into_iter().zip(revisions) {
            written[i] = revision;
        }
        if let Some(e) = error {
            tracing::debug!(error = %e, "etcd controller: a group of actions not applied");
            failed.get_or_insert(e);
        }
    }
    if let Some(revision) = written.iter().flatten().max() {
        view.catch_up(store, *revision).await;
    }
    for (action, written) in actions.iter().zip(written) {
        said(store, action, written.is_some()).await?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(soon),
    }
}

/// The actions that write, as groups (indices into `actions`) of at most
/// [`OPS_PER_TXN`] compares and writes each.
fn groups(actions: &[Action]) -> Vec<Vec<(usize, &Action)>> {
    let mut groups: Vec<Vec<(usize, &Action)>> = Vec::new();
    let (mut compares, mut writes) = (0, 0);
    for (i, action) in actions.iter().enumerate() {
        let Some((guards, puts)) = action.transaction() else {
            continue;
        };
        let fits = compares + guards.len() <= OPS_PER_TXN && writes + puts.len() <= OPS_PER_TXN;
        match groups.last_mut() {
            Some(group) if fits => group.push((i, action)),
            _ => {
                groups.push(vec![(i, action)]);
                (compares, writes) = (0, 0);
            }
        }
        compares += guards.len();
        writes += puts.len();
    }
    groups
}

/// Carries out a group of actions through `store` (a clone: others are in
/// flight) as one transaction; if a guard of one failed, each on its own.
/// The group's indices, the revision each was written at (`None`: a
/// guard failed, or it was not carried out), and the error that stopped
/// it, if one did (what landed before it is kept).
async fn carry_out(
    mut store: Store,
    group: Vec<(usize, &Action)>,
    me: &str,
) -> (Vec<usize>, Vec<Option<i64>>, Option<etcd_client::Error>) {
    let (indices, actions): (Vec<usize>, Vec<&Action>) = group.into_iter().unzip();
    if actions.iter().any(|a| matches!(a, Action::Promote(_))) {
        failpoint("controller-before-promote", me).await;
    }
    let mut written = vec![None; actions.len()];
    match store.apply_all(&actions).await {
        Ok(Some(revision)) => return (indices, vec![Some(revision); actions.len()], None),
        Ok(None) if actions.len() == 1 => return (indices, written, None),
        Ok(None) => {}
        Err(e) => return (indices, written, Some(e)),
    }
    // One guard failed the whole group: each alone, to know which.
    for (i, action) in actions.iter().enumerate() {
        match store.apply(action).await {
            Ok(revision) => written[i] = revision,
            Err(e) => return (indices, written, Some(e)),
        }
    }
    (indices, written, None)
}

/// Says what `action` did (`held`: its transaction's guards held).
async fn said(store: &mut Store, action: &Action, held: bool) -> Result<(), etcd_client::Error> {
    let volume = action.volume();
    match action {
        Action::Probe { probe, .. } if held => tracing::info!(volume, epoch = probe.epoch,
            lost = %probe.lost_primary, "etcd controller: primary lost; asking its replicas"),
        Action::Await { unanswered, .. } => tracing::debug!(volume, ?unanswered,
            "etcd controller: waiting for replicas to answer"),
        Action::Promote(p) if held => {
            if !p.lost_primary_kept {
                tracing::warn!(volume, lost = %p.decision.lost_primary,
                    "etcd: the lost primary's address is unknown; it is left out");
            }
            tracing::warn!(volume, epoch = p.record.assignment.epoch, primary = %p.record.assignment.primary,
                lost = %p.decision.lost_primary, rejected = ?p.decision.rejected,
                "etcd controller: promoted")
        }
        Action::Promote(_) if !store.still_leader().await? => tracing::warn!(
            volume,
            "etcd controller: this node is no longer the controller; not promoted"
        ),
        Action::Promote(_) => tracing::info!(volume,
            "etcd controller: the record changed or the lost primary registered again meanwhile; not promoted"),
        Action::RecordDown { decision, .. } if held => tracing::warn!(volume,
            epoch = decision.epoch, reasons = ?decision.rejected, blocked = ?decision.blocked(),
            "etcd controller: no eligible replica; the volume stays down"),
        Action::EndDown { decision, .. } if held => tracing::info!(volume,
            primary = %decision.lost_primary,
            "etcd controller: the primary is back; the volume is no longer down"),
        Action::Readmit { node, record, .. } if held => tracing::info!(volume,
            epoch = record.assignment.epoch, node, "etcd controller: added back as a replica"),
        _ => tracing::debug!(volume, ?action, "etcd controller: not applied (a guard failed)"),
    }
    Ok(())
}

/// Why an operator's promotion was refused.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// etcd refused or could not be reached.
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// The volume has no record.
    #[error("volume {0} has no record in etcd")]
    NoRecord(String),
    /// The primary is registered: nothing to fail over.
    #[error("{volume}'s primary {primary} is registered (alive): nothing to fail over")]
    PrimaryAlive {
        /// The volume.
        volume: String,
        /// Its primary.
        primary: String,
    },
    /// No replica can take it, not even losing data.
    #[error("{volume}: {source}")]
    NoCandidate {
        /// The volume.
        volume: String,
        /// Why, for each replica.
        source: walship_engine::PromotionError,
    },
    /// The promotion cannot be written as judged.
    #[error("{volume}: {why}")]
    Blocked {
        /// The volume.
        volume: String,
        /// Why.
        why: &'static str,
    },
    /// The record or the registrations changed while deciding.
    #[error("{0}: the record changed or the primary registered meanwhile; nothing written")]
    Raced(String),
}

/// How long an operator's promotion waits for the live replicas to
/// answer its probe before it judges by what there is.
const ANSWERS_WAITED: Duration = Duration::from_secs(5);

/// The desperate path, an operator's explicit act (`walship promote
/// --accept-data-loss`), never the controller's: `volume`'s primary is
/// lost and no replica is eligible; the running replica with the most
/// data, whatever its state or epoch short of a partial image, becomes
/// primary in the next epoch ([`accept_loss`]). The decision, written with
/// it, says which committed LSNs it lacks (lost) and which rules were
/// waived.
pub async fn promote_accepting_loss(
    client: &mut etcd_client::Client,
    cluster: &str,
    volume: &str,
    by: &str,
    accepted: DataLossAccepted,
) -> Result<Decision, PromoteError> {
    let mut store = Store::new(client.clone(), cluster, None);
    let view = store.read().await?;
    let Some(record) = view.volumes.get(volume).cloned() else {
        return Err(PromoteError::NoRecord(volume.to_owned()));
    };
    if view.registered(&record.value.assignment.primary) {
        return Err(PromoteError::PrimaryAlive {
            volume: volume.to_owned(),
            primary: record.value.assignment.primary,
        });
    }
    // Fresh answers from the live replicas, as the controller asks; after
    // a few seconds, what there is.
    let asked = match asked(&view, volume, &record.value) {
        Some(revision) => revision,
        None => {
            let probe = probe_of(&view, &record.value);
            store.write(&Write::Probe(volume.to_owned(), probe)).await?
        }
    };
    let deadline = tokio::time::Instant::now() + ANSWERS_WAITED;
    let view = loop {
        let view = store.read().await?;
        let answered = judge(&view, volume, &record.value, asked, by)
            .unsettled
            .is_empty();
        if answered || tokio::time::Instant::now() >= deadline {
            break view;
        }
        tokio::time::sleep(ANSWER_EVERY).await;
    };
    let decision =
        accept_loss(&view, volume, &record.value, asked, (by, accepted)).map_err(|source| {
            PromoteError::NoCandidate {
                volume: volume.to_owned(),
                source,
            }
        })?;
    // Only about the record as first read, its primary still lost.
    let promotion =
        promotion(&view, volume, &record, decision, []).map_err(|why| PromoteError::Blocked {
            volume: volume.to_owned(),
            why,
        })?;
    let action = Action::Promote(promotion);
    if store.apply(&action).await?.is_none() {
        return Err(PromoteError::Raced(volume.to_owned()));
    }
    let Action::Promote(promotion) = action else {
        unreachable!("built as a promotion above")
    };
    tracing::warn!(volume, primary = %promotion.record.assignment.primary,
        loss = ?promotion.decision.data_loss(), "etcd: promoted by an operator, accepting data loss");
    Ok(promotion.decision)
}

/// The environment variable that names a [`failpoint`] to stop at.
pub const FAILPOINT_ENV: &str = "WALSHIP_FAILPOINT";

/// With [`FAILPOINT_ENV`] set, where node `<me>` holds at the failpoint:
/// for as long as `<this path>.<me>` exists (at most a minute).
pub const FAILPOINT_HOLD_ENV: &str = "WALSHIP_FAILPOINT_HOLD";

/// A test hook: with [`FAILPOINT_ENV`] set to `name`, node `me` says it
/// reached `name` and stalls there (three seconds, or while its
/// [`FAILPOINT_HOLD_ENV`] file exists), for a test to stop, kill or hold
/// it at a known point (the controller between its decision and its
/// transaction). Compiled only with the feature `failpoints` (the tests
/// turn it on); a release binary carries none.
#[cfg(feature = "failpoints")]
async fn failpoint(name: &str, me: &str) {
    if std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == name) {
        tracing::warn!(failpoint = name, "failpoint reached");
        let Ok(hold) = std::env::var(FAILPOINT_HOLD_ENV) else {
            tokio::time::sleep(Duration::from_secs(3)).await;
            return;
        };
        let file = std::path::PathBuf::from(format!("{hold}.{me}"));
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        while file.exists() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(failpoint = name, "failpoint released");
    }
}

/// Without the feature `failpoints`, nothing.
#[cfg(not(feature = "failpoints"))]
async fn failpoint(_name: &str, _me: &str) {}
