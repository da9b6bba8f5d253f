//! The recovery flow of one replica, as engine inputs:
//! connect → handshake → plan → reserve resources → execute → InSync, with
//! escalation to a rebuild and invalidation on every way out.
//!
//! Invariants kept here:
//! - every input is checked against the replica's active session id and the
//!   epoch before it touches state;
//! - a plan's grants are released exactly once: on completion, invalidation,
//!   failure, or at once when they arrive for a session that moved on;
//! - NeedsRebuild is left only through a completed rebuild.

use crate::budget::BudgetTracker;
use crate::commit::CommitMode;
use crate::delta::{select_transfer, Transfer, TransferInputs};
use crate::engine::{Engine, Timer};
use crate::error::EngineError;
use crate::events::{CatchUpProgress, Command, ExecutionFailure, HandshakeReply, RebuildProgress};
use crate::history::{
    classify_handshake, select_rebuild_source, HandshakeOutcome, RebuildSource, ReplicaLog,
};
use crate::ids::{Epoch, Lsn, ReplicaId, SessionId};
use crate::plan::{PlanKind, RecoveryPlan, ResourceGrant};
use crate::rebuild::RebuildState;
use crate::retention::RetentionHold;
use crate::retry::FailureCause;
use crate::sender::ReplicaState;
use crate::session::{Session, SessionKind, Stage, Truncation, Work};

impl Engine {
    /// Starts a new session for a replica with no live session.
    pub(crate) fn start_session(&mut self, replica: &ReplicaId, kind: SessionKind) {
        let id = SessionId(self.next_session);
        let (epoch, now) = (self.epoch, self.now);
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        debug_assert!(
            sender.active_session().is_none(),
            "one live session per sender"
        );
        let mut session = Session::new(id, kind, epoch, sender.endpoint.version, now);
        if session.start_connecting().is_err() {
            return;
        }
        self.next_session += 1;
        sender.session = Some(session);
        sender.become_connecting();
        let endpoint = sender.endpoint.clone();
        let detail = format!("kind={kind:?} epoch={epoch} endpoint={endpoint}");
        self.record(Some(replica), Some(id), "session_created", detail);
        self.commands.push(Command::Connect {
            replica: replica.clone(),
            session: id,
            epoch,
            endpoint,
        });
    }

    /// Invalidates the replica's live session, if any: tells the shell to
    /// cancel whatever the session has under way (`CancelExecution`, in every
    /// stage) and releases its grants. Returns whether there was one.
    pub(crate) fn invalidate(&mut self, replica: &ReplicaId, reason: &str) -> bool {
        let Some(sender) = self.senders.get_mut(replica) else {
            return false;
        };
        let Some(session) = sender.active_session_mut() else {
            return false;
        };
        let id = session.id;
        let was_rebuild = matches!(
            session.stage,
            Stage::Running {
                work: Work::Rebuild(_),
                ..
            }
        );
        let Ok((grants, was_running)) = session.invalidate(reason) else {
            return false;
        };
        sender.connection_lost();
        self.cancel_session_timers(replica, id);
        self.hold_while_away(replica, false);
        self.commit.set_in_sync(replica, false);
        self.record(Some(replica), Some(id), "session_invalidated", reason);
        if was_running && was_rebuild {
            self.record(Some(replica), Some(id), "rebuild_aborted", reason);
        }
        // Whatever the session has under way in the shell (a connect, a
        // handshake, a held connection, a plan) is stale from now on.
        self.commands.push(Command::CancelExecution {
            replica: replica.clone(),
            session: id,
            reason: reason.to_owned(),
        });
        self.release(replica, id, grants, reason);
        true
    }

    /// Declares the replica's catch-up non-convergent: it needs a rebuild, which starts now.
    pub(crate) fn escalate(&mut self, replica: &ReplicaId, reason: &str) {
        let session = self.active_session(replica);
        self.record(Some(replica), session, "escalated", reason);
        self.invalidate(replica, &format!("escalated: {reason}"));
        self.needs_rebuild(replica, reason);
        self.start_session(replica, SessionKind::Rebuild);
    }

    /// Marks the replica as needing a rebuild (sticky). It holds no WAL
    /// any more: no catch-up will use it.
    pub(crate) fn needs_rebuild(&mut self, replica: &ReplicaId, reason: &str) {
        if let Some(sender) = self.senders.get_mut(replica) {
            sender.become_needs_rebuild(reason);
        }
        self.release_retention(replica, &format!("needs_rebuild: {reason}"));
    }

    /// The shell connected for `session`; the handshake comes next.
    pub fn handle_connected(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "connected")?;
        if let Some(s) = self.sender_mut(replica)?.active_session_mut() {
            s.connected()?;
        }
        self.record(Some(replica), Some(session), "connected", "");
        Ok(())
    }

    /// The replica answered the handshake: classify, then go InSync, plan a
    /// catch-up, or plan a rebuild.
    pub fn handle_handshake(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        reply: HandshakeReply,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "handshake")?;
        self.fence(Some(replica), Some(session), reply.epoch, "handshake")?;
        if reply.replica != *replica {
            let detail = format!("peer claims {}", reply.replica);
            self.record(Some(replica), Some(session), "identity_mismatch", detail);
            self.invalidate(replica, "identity_mismatch");
            return Err(EngineError::IdentityMismatch {
                expected: replica.clone(),
                claimed: reply.replica,
            });
        }
        let sender = self.sender_mut(replica)?;
        if let Some(s) = sender.active_session() {
            s.expect_handshake()?;
        }
        let flushed = reply.log.flushed;
        sender.flushed = flushed;
        self.commit.note_told(replica, reply.log.committed);
        let sender = self.sender_mut(replica)?;
        let sticky = sender.rebuild_need().map(|need| need.reason.clone());
        let released = match &sender.hold {
            RetentionHold::Released { reason } => Some(reason.clone()),
            _ => None,
        };
        let history = self.history();
        if let Some(reason) = self.primary_behind(replica, &reply.log, &history) {
            // The replica holds committed entries this primary lacks (it
            // opened without peering, or its peering did not hear from this
            // replica): truncating or rebuilding it would lose them.
            // Nothing is planned; the session fails and is retried after a
            // backoff, and every retry says so again.
            self.record(
                Some(replica),
                Some(session),
                "primary_behind",
                reason.clone(),
            );
            self.invalidate(replica, &reason);
            self.record_failure(replica, FailureCause::Network, &reason);
            return Ok(());
        }
        let outcome = classify_handshake(&reply.log, &history, &self.epochs);
        let agreed = flushed.min(outcome.proof().divergence.point);
        if let Some(sender) = self.senders.get_mut(replica) {
            sender.holds = Some((reply.log.clone(), agreed));
        }
        let mut detail = format!(
            "flushed={flushed} committed={}: {}",
            history.committed,
            outcome.proof().reason
        );
        if let (HandshakeOutcome::NeedsRebuild { .. }, Some(released)) = (&outcome, released) {
            // Why the WAL it needed is gone.
            detail.push_str(&format!(" (its retention hold was released: {released})"));
        }
        self.record(Some(replica), Some(session), "handshake", detail);
        if let Some(reason) = sticky {
            let detail = format!("needs_rebuild is sticky: {reason}");
            self.record(Some(replica), Some(session), "rebuild_required", detail);
            self.plan_rebuild(replica, session, false);
            return Ok(());
        }
        match outcome {
            HandshakeOutcome::ZeroGap { .. } => self.finish_in_sync(replica, flushed, None),
            HandshakeOutcome::CatchUp {
                start,
                target,
                truncate_to,
                ..
            } => {
                let budget = self.config.budget;
                if let Err(violation) = BudgetTracker::admit_gap(&budget, start.entries_to(target))
                {
                    let reason = violation.to_string();
                    self.record(Some(replica), Some(session), "escalated", reason.clone());
                    self.needs_rebuild(replica, &reason);
                    self.plan_rebuild(replica, session, false);
                    return Ok(());
                }
                let kind = PlanKind::CatchUp {
                    start,
                    frozen_target: target,
                    truncate_to,
                    budget,
                };
                self.reserve(replica, session, kind);
            }
            HandshakeOutcome::NeedsRebuild { proof } => {
                self.needs_rebuild(replica, &proof.reason);
                self.plan_rebuild(replica, session, false);
            }
        }
        Ok(())
    }

    /// Plans the rebuild of `replica` against the WAL as it is now; with
    /// `slot_held` (a queued rebuild's slot came) it reserves at once
    /// rather than queueing.
    fn plan_rebuild(&mut self, replica: &ReplicaId, session: SessionId, slot_held: bool) {
        if self.config.rebuild_slots && !slot_held {
            // The node runs only so many rebuilds at once: this one waits
            // its turn before it is planned or pins anything.
            let queued = self
                .senders
                .get_mut(replica)
                .and_then(|s| s.active_session_mut())
                .is_some_and(|s| s.queue().is_ok());
            if queued {
                self.record(Some(replica), Some(session), "rebuild_queued", "");
                self.commands.push(Command::AwaitRebuildSlot {
                    replica: replica.clone(),
                    session,
                });
            }
            return;
        }
        let history = self.history();
        let refused = self
            .senders
            .get(replica)
            .and_then(|s| s.rebuild_need())
            .and_then(|need| need.snapshot_refused.clone());
        let source = match refused {
            Some(reason) => RebuildSource::FullBase {
                min_base_lsn: history.committed,
                reason: format!("snapshot_unavailable: {reason}"),
            },
            None => select_rebuild_source(&history),
        };
        let image_floor = match &source {
            RebuildSource::SnapshotTail { snapshot_lsn, .. } => *snapshot_lsn,
            RebuildSource::FullBase { min_base_lsn, .. } => *min_base_lsn,
        };
        let transfer = self.select_transfer(replica, image_floor);
        if transfer.in_place() {
            // A cut install resumes by what changed after its image: a
            // map starts before the image is pinned, so at most at it. One
            // older than that serves an install by the map (the replica
            // keeps its own history wherever nothing is sent); any other
            // install starts a fresh one, which marks far less.
            if transfer.dirty_since().is_none() {
                self.forget_dirty(replica);
            }
            self.track_dirty(replica, Lsn::ZERO);
        }
        self.reserve(replica, session, PlanKind::Rebuild { source, transfer });
    }

    /// What the rebuild of `replica` moves (see [`crate::delta`]), from
    /// what its last handshake said it holds.
    fn select_transfer(&self, replica: &ReplicaId, image_floor: Lsn) -> Transfer {
        let empty = ReplicaLog::default();
        let (log, agreed) = self
            .senders
            .get(replica)
            .and_then(|s| s.holds.as_ref())
            .map_or((&empty, Lsn::ZERO), |(log, agreed)| (log, *agreed));
        select_transfer(&TransferInputs {
            enabled: self.config.delta_rebuilds,
            replica: log,
            image_floor,
            agreed,
            map: self.dirty_maps.get(replica).copied(),
            source: self.image_source,
            other_copy: self.other_copy(replica),
            mismatch: self
                .senders
                .get(replica)
                .and_then(|s| s.verify_mismatch.as_deref()),
        })
    }

    /// Whether what `replica` holds is not needed as a copy of what was
    /// committed: best_effort promises nothing beyond the primary, or
    /// another replica in sync is durable through the committed LSN.
    fn other_copy(&self, replica: &ReplicaId) -> bool {
        let committed = self.commit.committed();
        self.commit.mode() == CommitMode::BestEffort
            || self.senders.iter().any(|(id, sender)| {
                id != replica
                    && sender.state() == ReplicaState::InSync
                    && self
                        .commit
                        .replica_durable(id)
                        .is_some_and(|durable| durable >= committed)
            })
    }

    /// Binds the plan, logs it and asks for its resources (or runs it at once
    /// when it needs none).
    fn reserve(&mut self, replica: &ReplicaId, session: SessionId, kind: PlanKind) {
        let plan = RecoveryPlan {
            session,
            replica: replica.clone(),
            epoch: self.epoch,
            kind,
        };
        self.record(
            Some(replica),
            Some(session),
            plan.event_name(),
            plan.describe(),
        );
        if let PlanKind::Rebuild { transfer, .. } = &plan.kind {
            // What of the image moves, and why: a decision of its own.
            let (event, detail) = (transfer.event_name(), transfer.to_string());
            self.record(Some(replica), Some(session), event, detail);
        }
        self.reserve_resources(replica, session, plan);
    }

    /// An online verify found that `replica`'s content differs from the
    /// primary's (`found` says where): it leaves sync and is rebuilt,
    /// every region compared (no dirty map knows of what a verify finds).
    /// Only a replica still in sync is rebuilt (one that left meanwhile is
    /// being recovered anyway, and its content may differ for that):
    /// returns whether it was.
    pub fn handle_verify_mismatch(
        &mut self,
        replica: &ReplicaId,
        found: &str,
    ) -> Result<bool, EngineError> {
        if self.sender(replica)?.state() != ReplicaState::InSync {
            let detail = format!("{found}; not in sync any more: not rebuilt for it");
            self.record(Some(replica), None, "verify_mismatch", detail);
            return Ok(false);
        }
        let reason = format!("verify_mismatch: {found}");
        self.record(Some(replica), None, "verify_mismatch", found);
        self.leave_sync(replica, &reason);
        self.invalidate(replica, &reason);
        if let Some(sender) = self.senders.get_mut(replica) {
            sender.verify_mismatch = Some(format!("an online verify found {found}"));
        }
        self.forget_dirty(replica);
        self.needs_rebuild(replica, &reason);
        self.start_session(replica, SessionKind::Rebuild);
        Ok(true)
    }

    /// A queued rebuild got its slot: its resources are asked for now.
    pub fn handle_rebuild_slot(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "rebuild_slot")?;
        if let Some(s) = self.sender(replica)?.active_session() {
            s.expect_queued()?;
        }
        self.record(Some(replica), Some(session), "rebuild_slot_granted", "");
        // Planned again against the WAL as it is now: the queue may have
        // taken long, and the checkpoint a snapshot plan bound has moved.
        self.plan_rebuild(replica, session, true);
        Ok(())
    }

    /// Asks for the plan's resources (or runs it at once when it needs none).
    fn reserve_resources(&mut self, replica: &ReplicaId, session: SessionId, plan: RecoveryPlan) {
        let requests = plan.resources();
        let deadline = self.now.after(self.config.pin_reservation_ticks);
        let Some(s) = self
            .senders
            .get_mut(replica)
            .and_then(|s| s.active_session_mut())
        else {
            return;
        };
        if s.reserve(plan, deadline).is_err() {
            return;
        }
        if requests.is_empty() {
            self.start_running(replica, session, Vec::new());
            return;
        }
        self.schedule(
            deadline,
            Timer::PinReservation {
                replica: replica.clone(),
                session,
            },
        );
        self.commands.push(Command::AcquireResources {
            replica: replica.clone(),
            session,
            requests,
            deadline,
        });
    }

    /// The shell pinned the plan's resources. Grants for a session that moved
    /// on are released at once and refused.
    pub fn handle_resources_granted(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        grants: Vec<ResourceGrant>,
    ) -> Result<(), EngineError> {
        let plan = self
            .senders
            .get(replica)
            .and_then(|s| s.active_session())
            .filter(|s| s.id == session)
            .and_then(|s| match &s.stage {
                Stage::Reserving { plan, .. } => Some(plan.clone()),
                _ => None,
            });
        let Some(plan) = plan else {
            self.release(replica, session, grants, "stale_grant");
            self.check_session(replica, session, "grant")?;
            let phase = self
                .sender(replica)?
                .active_session()
                .map_or("none", |s| s.stage_name());
            return Err(EngineError::Phase(crate::session::PhaseError {
                session,
                input: "grant",
                phase,
            }));
        };
        if let Err(detail) = plan.check_grants(&grants) {
            self.release(replica, session, grants, "bad_grants");
            self.fail_reservation(replica, &format!("bad_grants: {detail}"));
            return Err(EngineError::BadGrants { session, detail });
        }
        self.start_running(replica, session, grants);
        Ok(())
    }

    fn start_running(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        grants: Vec<ResourceGrant>,
    ) {
        let now = self.now;
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let Some(s) = sender.active_session_mut() else {
            return;
        };
        let Some(plan) = s.plan().cloned() else {
            return;
        };
        let image_lsn = plan.check_grants(&grants).ok().flatten();
        if s.run(grants.clone(), image_lsn, now).is_err() {
            self.release(replica, session, grants, "run_refused");
            return;
        }
        // The reservation is over: its timeout has nothing left to guard.
        let reservation = Timer::PinReservation {
            replica: replica.clone(),
            session,
        };
        let next_budget_check = match &s.stage {
            Stage::Running {
                work: Work::CatchUp { budget, .. },
                ..
            } => budget.next_deadline(),
            _ => None,
        };
        match plan.kind {
            PlanKind::CatchUp { .. } => sender.become_catching_up(),
            PlanKind::Rebuild { .. } => sender.become_rebuilding(),
        }
        self.cancel(&reservation);
        if let Some(at) = next_budget_check {
            self.schedule(
                at,
                Timer::CatchUpBudget {
                    replica: replica.clone(),
                    session,
                },
            );
        }
        self.record(
            Some(replica),
            Some(session),
            "exec_started",
            plan.describe(),
        );
        self.commands.push(Command::Execute {
            replica: replica.clone(),
            session,
            plan,
            grants,
        });
    }

    /// The shell could not pin the plan's resources. The session is invalidated;
    /// a failed WAL pin escalates to a rebuild, a failed snapshot pin falls back
    /// to a full base, a failed full base waits for the next heartbeat.
    pub fn handle_resources_failed(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        reason: &str,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "resources_failed")?;
        self.fail_reservation(replica, reason);
        Ok(())
    }

    pub(crate) fn fail_reservation(&mut self, replica: &ReplicaId, reason: &str) {
        let Some(plan) = self
            .senders
            .get(replica)
            .and_then(|s| s.active_session())
            .and_then(|s| s.plan().cloned())
        else {
            return;
        };
        self.invalidate(replica, &format!("pin_failed: {reason}"));
        if matches!(plan.kind, PlanKind::CatchUp { .. }) {
            self.needs_rebuild(replica, &format!("wal_pin_failed: {reason}"));
            self.start_session(replica, SessionKind::Rebuild);
            return;
        }
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        match plan.kind {
            PlanKind::CatchUp { .. } => {}
            PlanKind::Rebuild {
                source: RebuildSource::SnapshotTail { .. },
                ..
            } => {
                sender.refuse_snapshot(reason);
                let detail = format!("snapshot pin failed ({reason}); next plan uses a full base");
                self.record(
                    Some(replica),
                    Some(plan.session),
                    "rebuild_fallback",
                    detail,
                );
                self.start_session(replica, SessionKind::Rebuild);
            }
            PlanKind::Rebuild {
                source: RebuildSource::FullBase { .. },
                ..
            } => {
                let detail = format!("full base pin failed ({reason}); retried after a backoff");
                self.record(
                    Some(replica),
                    Some(plan.session),
                    "rebuild_deferred",
                    detail,
                );
                let reason = format!("full base pin failed: {reason}");
                self.record_failure(replica, FailureCause::Rebuild, &reason);
            }
        }
    }

    fn catch_up_work(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        epoch: Epoch,
        input: &'static str,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, input)?;
        self.fence(Some(replica), Some(session), epoch, input)?;
        let Some(s) = self.sender_mut(replica)?.active_session_mut() else {
            return Ok(());
        };
        match s.work_mut(input)? {
            Work::CatchUp { .. } => Ok(()),
            Work::Rebuild(_) => Err(EngineError::WrongWork {
                session,
                runs: "rebuild",
                input,
            }),
        }
    }

    /// The replica truncated to `to`, as the plan required.
    pub fn handle_truncated(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        epoch: Epoch,
        to: Lsn,
    ) -> Result<(), EngineError> {
        self.catch_up_work(replica, session, epoch, "truncated")?;
        let sender = self.sender_mut(replica)?;
        let Some(Work::CatchUp {
            truncation,
            applied,
            target,
            ..
        }) = sender
            .active_session_mut()
            .and_then(|s| s.work_mut("truncated").ok())
        else {
            return Ok(());
        };
        let Truncation::Required { to: required } = *truncation else {
            return Err(EngineError::TruncationNotRequired {
                replica: replica.clone(),
            });
        };
        if to != required {
            return Err(EngineError::TruncationMismatch {
                replica: replica.clone(),
                required,
                reported: to,
            });
        }
        *truncation = Truncation::Recorded { to };
        let done = *applied == *target;
        sender.flushed = to;
        self.commit.reset_replica_durable(replica, to);
        self.record(
            Some(replica),
            Some(session),
            "truncation_recorded",
            format!("to {to}"),
        );
        if done {
            self.finish_in_sync(replica, to, None);
        }
        Ok(())
    }

    /// Catch-up progress: monotonic, at most the frozen target, after any
    /// required truncation, within budget. Reaching the target completes the
    /// session and the replica goes InSync.
    pub fn handle_catchup_progress(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        epoch: Epoch,
        progress: CatchUpProgress,
    ) -> Result<(), EngineError> {
        self.catch_up_work(replica, session, epoch, "catchup_progress")?;
        let now = self.now;
        let sender = self.sender_mut(replica)?;
        let Some(Work::CatchUp {
            truncation,
            applied,
            target,
            budget,
        }) = sender
            .active_session_mut()
            .and_then(|s| s.work_mut("catchup_progress").ok())
        else {
            return Ok(());
        };
        if let Truncation::Required { to } = *truncation {
            return Err(EngineError::TruncationPending {
                replica: replica.clone(),
                to,
            });
        }
        if progress.applied < *applied {
            return Err(EngineError::NonMonotonicProgress {
                replica: replica.clone(),
                from: *applied,
                to: progress.applied,
            });
        }
        if progress.applied > *target {
            return Err(EngineError::PastTarget {
                replica: replica.clone(),
                reported: progress.applied,
                target: *target,
            });
        }
        *applied = progress.applied;
        let done = *applied == *target;
        let verdict = budget.record(now, progress.entries, progress.bytes);
        sender.flushed = progress.applied;
        self.commit.reset_replica_durable(replica, progress.applied);
        if let Err(violation) = verdict {
            self.escalate(replica, &violation.to_string());
            return Ok(());
        }
        if done {
            self.finish_in_sync(replica, progress.applied, None);
        }
        Ok(())
    }

    /// Rebuild progress, checked by the rebuild FSM. Completion is the only way
    /// out of NeedsRebuild.
    pub fn handle_rebuild_progress(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        epoch: Epoch,
        progress: RebuildProgress,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "rebuild_progress")?;
        self.fence(Some(replica), Some(session), epoch, "rebuild_progress")?;
        let sender = self.sender_mut(replica)?;
        let Some(s) = sender.active_session_mut() else {
            return Ok(());
        };
        let fsm = match s.work_mut("rebuild_progress")? {
            Work::Rebuild(fsm) => fsm,
            Work::CatchUp { .. } => {
                return Err(EngineError::WrongWork {
                    session,
                    runs: "catch-up",
                    input: "rebuild_progress",
                })
            }
        };
        match progress {
            RebuildProgress::Transferred { bytes } => fsm.transferred(bytes)?,
            RebuildProgress::ImageInstalled { at } => fsm.transfer_done(at)?,
            RebuildProgress::TailReplayed { through } => fsm.tail_replayed(through)?,
        }
        let completed = fsm.completed_at();
        let installed =
            matches!(progress, RebuildProgress::ImageInstalled { .. }).then(|| fsm.state().clone());
        if let Some(RebuildState::TailReplay {
            image_lsn, target, ..
        }) = installed
        {
            let detail = format!(
                "image at {image_lsn}, replaying {}-{target}",
                image_lsn.next()
            );
            self.record(
                Some(replica),
                Some(session),
                "rebuild_image_installed",
                detail,
            );
        }
        if let Some(flushed) = completed {
            self.finish_in_sync(replica, flushed, Some(flushed));
        }
        Ok(())
    }

    /// Completes the active session and puts the replica InSync.
    /// `rebuilt` is set when a rebuild completed (the only way out of NeedsRebuild).
    fn finish_in_sync(&mut self, replica: &ReplicaId, flushed: Lsn, rebuilt: Option<Lsn>) {
        let epoch = self.epoch;
        let Some(sender) = self.senders.get_mut(replica) else {
            return;
        };
        let Some(s) = sender.active_session_mut() else {
            return;
        };
        let session = s.id;
        let Ok(grants) = s.complete(flushed) else {
            return;
        };
        match rebuilt {
            Some(lsn) => sender.rebuild_completed(lsn),
            None => {
                if !sender.become_in_sync() {
                    return;
                }
                sender.flushed = flushed;
            }
        }
        self.cancel_session_timers(replica, session);
        let event = if rebuilt.is_some() {
            "rebuild_completed"
        } else {
            "session_completed"
        };
        self.record(
            Some(replica),
            Some(session),
            event,
            format!("in sync at {flushed}"),
        );
        // The hold takes over from the plan's pins before they go.
        self.hold_retention(replica, flushed, false);
        self.forget_dirty(replica);
        if let Some(sender) = self.senders.get_mut(replica) {
            sender.barrier_requested = None;
        }
        self.release(replica, session, grants, "completed");
        self.commit.reset_replica_durable(replica, flushed);
        self.commit.set_in_sync(replica, true);
        self.advance_commit();
        self.commands.push(Command::StartLiveShipping {
            replica: replica.clone(),
            session,
            epoch,
            from: flushed,
        });
    }

    /// Why `log` holds entries it knows were committed that this
    /// primary's log lacks, if it does: its committed LSN is past the
    /// primary's, or the two logs disagree (different epochs) at or below
    /// it. Only under sync_all and sync_quorum: under best_effort a
    /// replica's committed was the old primary's own disk, which a
    /// promotion may lose.
    fn primary_behind(
        &self,
        replica: &ReplicaId,
        log: &crate::history::ReplicaLog,
        history: &crate::history::RetainedHistory,
    ) -> Option<String> {
        if self.commit.mode() == CommitMode::BestEffort || log.committed == Lsn::ZERO {
            return None;
        }
        if log.committed > history.committed {
            return Some(format!(
                "primary_behind: {replica} knows {} committed, this primary's log ends at {}: neither truncated nor rebuilt",
                log.committed, history.committed
            ));
        }
        let floor = log.committed.min(log.flushed);
        let diverged =
            crate::epochs::divergence(&self.epochs, history.head, &log.epochs, log.flushed);
        let conflict = diverged
            .conflict
            .filter(|c| c.lsn <= floor && c.replica_epoch.is_some() && c.primary_epoch.is_some())?;
        Some(format!(
            "primary_behind: {replica} knows {} committed, but its entry {} is of epoch {} and this primary's of {}: neither truncated nor rebuilt",
            log.committed,
            conflict.lsn,
            conflict.replica_epoch.map_or(0, |e| e.get()),
            conflict.primary_epoch.map_or(0, |e| e.get())
        ))
    }

    /// An execution (or connection attempt) of the active session failed.
    /// The replica is retried after a backoff for the failure's cause;
    /// unrecoverable failures escalate to a rebuild at once (or, for a
    /// failed rebuild, wait like the others).
    pub fn handle_execution_failed(
        &mut self,
        replica: &ReplicaId,
        session: SessionId,
        failure: ExecutionFailure,
    ) -> Result<(), EngineError> {
        self.check_session(replica, session, "execution_failed")?;
        match &failure {
            ExecutionFailure::Transient(reason) => {
                self.invalidate(replica, &format!("transient: {reason}"));
            }
            ExecutionFailure::ReplicaStorage(reason) => {
                self.invalidate(replica, &format!("replica_storage_failed: {reason}"));
            }
            ExecutionFailure::Unrecoverable(reason) => {
                if self.sender(replica)?.rebuild_need().is_none() {
                    self.escalate(replica, reason);
                    return Ok(());
                }
                self.invalidate(replica, &format!("rebuild_failed: {reason}"));
            }
        }
        self.record_failure(replica, failure.cause(), failure.reason());
        Ok(())
    }

    /// The connection to a replica dropped (live shipping or an idle
    /// connection), for `failure`.
    pub fn handle_disconnected(
        &mut self,
        replica: &ReplicaId,
        failure: &ExecutionFailure,
    ) -> Result<(), EngineError> {
        self.sender(replica)?;
        let reason = failure.reason();
        self.leave_sync(replica, reason);
        self.invalidate(replica, &format!("connection_lost: {reason}"));
        self.record_failure(replica, failure.cause(), reason);
        let state = self.sender(replica)?.state();
        self.record(
            Some(replica),
            None,
            "disconnected",
            format!("{reason}; now {state:?}"),
        );
        Ok(())
    }

    /// A replica is reachable in `epoch`. A replica with no live session that
    /// is not InSync gets a new one (catch-up, or rebuild when it needs one).
    pub fn handle_heartbeat(
        &mut self,
        replica: &ReplicaId,
        epoch: Epoch,
    ) -> Result<(), EngineError> {
        self.fence(Some(replica), None, epoch, "heartbeat")?;
        let now = self.now;
        let sender = self.sender_mut(replica)?;
        sender.last_heartbeat = now;
        let idle = sender.active_session().is_none()
            && matches!(
                sender.state(),
                ReplicaState::Disconnected | ReplicaState::Degraded | ReplicaState::NeedsRebuild
            );
        if idle && self.may_retry(replica) {
            let Ok(sender) = self.sender(replica) else {
                return Ok(());
            };
            let kind = if sender.rebuild_need().is_some() {
                SessionKind::Rebuild
            } else {
                SessionKind::CatchUp
            };
            self.start_session(replica, kind);
        }
        Ok(())
    }
}
