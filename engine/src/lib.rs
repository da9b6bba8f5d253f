//! # walship-engine
//!
//! The pure recovery engine of walship: every decision about replicating a
//! volume's write-ahead log and bringing replicas back in sync, with no IO,
//! no clock, no threads and no randomness. Time arrives as [`Tick`]s; the
//! shell executes the [`Command`]s the engine emits and feeds results back as
//! inputs.
//!
//! ```
//! use walship_engine::*;
//!
//! let mut engine = Engine::new(EngineConfig::new("vol1"));
//! let replica = ReplicaId::new("vol1", "b").unwrap();
//! let written_in_epoch_1 = EpochStart { epoch: Epoch(1), first: Lsn(1) };
//! engine
//!     .handle_wal_state(WalState {
//!         head: Lsn(100),
//!         tail: Lsn(40),
//!         newest_epoch: Some(written_in_epoch_1),
//!         ..WalState::default()
//!     })
//!     .unwrap();
//! engine.handle_local_durable(Lsn(0), Lsn(100));
//! engine
//!     .handle_assignment(Assignment {
//!         epoch: Epoch(1),
//!         commit_mode: CommitMode::BestEffort,
//!         replicas: vec![ReplicaAssignment { id: replica.clone(), endpoint: Endpoint::new("10.0.0.2:7000", 1) }],
//!     })
//!     .unwrap();
//! let session = engine.active_session(&replica).unwrap();
//! engine.handle_connected(&replica, session).unwrap();
//! // The replica is 30 entries behind; they are still in the retained WAL.
//! let reply = HandshakeReply {
//!     replica: replica.clone(),
//!     epoch: Epoch(1),
//!     log: ReplicaLog::single_epoch(Lsn(70), Epoch(1)),
//! };
//! engine.handle_handshake(&replica, session, reply).unwrap();
//! let commands = engine.take_commands();
//! assert!(matches!(
//!     commands.last(),
//!     Some(Command::AcquireResources { requests, .. })
//!         if requests == &[ResourceRequest::WalRetention { from: Lsn(70) }]
//! ));
//! let plan = engine.log().events().find(|e| e.event == "plan_catchup").unwrap();
//! assert_eq!(plan.detail, "ship 71-100");
//! ```
//!
//! Modules: identifiers ([`ids`]), epoch histories and divergence,
//! recoverability ([`history`]), budgets,
//! the rebuild FSM, plans and executors, commit modes, promotion, the
//! recovery log and status snapshots. [`Engine`] ties them together; its
//! module docs state the calling order.

#![forbid(unsafe_code)]

mod budget;
mod commit;
mod converge;
mod delta;
mod engine;
mod epochs;
mod error;
mod events;
mod executor;
mod history;
pub mod ids;
mod log;
mod peering;
mod plan;
mod promotion;
mod rebuild;
mod recovery;
mod retention;
mod retry;
mod sender;
mod session;
mod status;

pub use budget::{BudgetTracker, BudgetViolation, CatchUpBudget};
pub use commit::{check_topology, BarrierFailure, CommitError, CommitMode, CommitTracker, Lagging};
pub use converge::{
    judge, next_step, ConvergencePolicy, ConvergenceStatus, ConvergenceStep, Judgement, LagSample,
};
pub use delta::{select_transfer, Above, DirtyMap, PartialImage, Transfer, TransferInputs};
pub use engine::Engine;
pub use epochs::{divergence, Conflict, Divergence, EpochHistory, EpochOrderError, EpochStart};
pub use error::EngineError;
pub use events::{
    Ack, Assignment, CatchUpProgress, Command, EngineConfig, ExecutionFailure, HandshakeReply,
    Input, RebuildProgress, ReplicaAssignment, WalState,
};
pub use executor::{
    CatchUpExecutor, ExecutorError, HookAction, RebuildExecutor, Step, StepHook, StepInfo,
};
pub use history::{
    classify_handshake, select_rebuild_source, HandshakeOutcome, HistoryError, RebuildSource,
    RecoverabilityProof, ReplicaLog, RetainedHistory, Verdict,
};
pub use ids::{
    BarrierId, Endpoint, Epoch, InvalidReplicaId, Lsn, ReplicaId, ResourceId, SessionId, Tick,
};
pub use log::{RecoveryEvent, RecoveryLog};
pub use peering::{decide_peering, required_answers, LocalLog, PeerAnswer, Peering, Terms};
pub use plan::{GrantedResource, PlanKind, RecoveryPlan, ResourceGrant, ResourceRequest};
pub use promotion::{
    evaluate as evaluate_promotion, ineligibility, select as select_promotion, select_desperate,
    DataLossAccepted, DesperatePromotion, Ineligibility, PromotionCandidate, PromotionError,
    PromotionReport,
};
pub use rebuild::{RebuildError, RebuildFsm, RebuildState};
pub use retention::{RetentionBudget, RetentionHold};
pub use retry::{Backoff, FailureCause, FailureRecord, RetryPolicy};
pub use sender::{RebuildNeed, ReplicaState};
pub use session::{PhaseError, SessionKind, SessionPhase, Truncation, Work};
pub use status::{RegistryStatus, SenderStatus, SessionSnapshot};
