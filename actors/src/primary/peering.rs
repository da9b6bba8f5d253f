//! Peering before a primary serves: the shell of
//! [`walship_engine::decide_peering`].
//!
//! Before the `VolumeActor` opens, the primary asks every replica what it
//! holds (`Peer`, answered with a `HelloAck` and the replica's term),
//! rounds after rounds until the engine has the answers the commit mode
//! needs. If the engine finds a replica holding entries this log lacks
//! that may have been acknowledged, the primary says hello in its new term
//! (fencing anything older) and pulls that replica's whole volume at its
//! durable LSN (`PullImage`, `PullChunk`, `PullDone`) into its own store,
//! through the same base install a replica's rebuild uses. The chosen term
//! is persisted (`Peering::on_term`) before any replica hears it.

use super::ship::connect;
use crate::config::{PrimaryConfig, ReplicaSpec, Tuning};
use crate::error::{ExecError, VolumeError};
use crate::mux::PeerLinks;
use crate::replica::install::{InstallWriter, Sink};
use crate::transport::{self, recv, Conn};
use futures::SinkExt;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;
use walship_engine::{
    decide_peering, required_answers, Epoch, EpochHistory, LocalLog, Lsn, PeerAnswer, Peering,
    ReplicaId, Terms,
};
use walship_io::{Envelope, Message, Store, BLOCK_SIZE};

/// Image requests a pull keeps in flight.
const PULL_WINDOW: u64 = 4;

/// Runs peering for `config` on its opened `store`: returns the decision,
/// with `config.epoch` set to the term it chose and anything recovered
/// already in the store. Each round that must wait is told to `waiting`
/// (round, answers had, answers needed, why).
///
/// An empty store counts as lost, whether it was created at this open or
/// an earlier open created it and never got to serve: an empty log is
/// never authoritative; so does one holding part of an image. `cut`:
/// opening the store cut a torn tail.
pub(crate) async fn peer_before_serving(
    config: &mut PrimaryConfig,
    links: &PeerLinks,
    store: &Arc<Store>,
    tasks: &TaskTracker,
    cut: bool,
    waiting: impl Fn(u64, usize, usize, &str),
) -> Result<Peering, VolumeError> {
    // A store holding part of an image (a rebuild in place cut) has no
    // log to trust: lost too, so a replica's image is pulled first.
    let lost = {
        let wal = store.wal();
        let empty =
            wal.epochs().is_empty() && wal.head() == 0 && store.superblock().checkpoint == 0;
        empty || store.partial().is_some()
    };
    let terms = Terms {
        configured: Epoch(config.epoch),
        ceiling: Epoch(match config.peering.term_ceiling {
            0 => u64::MAX,
            ceiling => ceiling,
        }),
    };
    // A lost or cut log waits for every replica (up to the peer timeout):
    // a late answer may hold the most, or a term not to reuse.
    let (need, _) = required_answers(config.commit_mode, config.replicas.len(), lost);
    let enough = if lost || cut { usize::MAX } else { need };
    let mut backoff = Duration::from_millis(100);
    for round in 1u64.. {
        // What the store holds now: a recovery that failed may have
        // appended part of a replica's log, which the next decision must
        // see (or it would append another's after it). Lost and cut stay
        // as they were at open until a recovery completes.
        let local = local_log(config, store, lost, cut).await?;
        let answers = ask_all(config, links, enough).await;
        let decided = decide_peering(
            config.commit_mode,
            config.replicas.len(),
            &local,
            terms,
            &answers,
        );
        match &decided {
            Peering::Wait { have, need, reason } => {
                waiting(round, *have, *need, reason);
                if round == 1 || round.is_power_of_two() {
                    tracing::warn!(volume = %config.volume, have, need, %reason, round,
                        "peering: waiting for replicas before serving");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Peering::Superseded { replica, term } => {
                return Err(VolumeError::Superseded {
                    replica: replica.to_string(),
                    term: term.0,
                })
            }
            Peering::TermsExhausted { seen } => {
                return Err(VolumeError::EpochNotNewer {
                    assigned: config.epoch,
                    wal: seen.0,
                })
            }
            Peering::Serve { term, proof } => {
                tracing::info!(volume = %config.volume, "{proof}");
                choose_term(config, store, tasks, *term).await?;
            }
            Peering::Recover {
                from,
                through,
                catch_up,
                term,
                proof,
            } => {
                tracing::warn!(volume = %config.volume, "{proof}");
                choose_term(config, store, tasks, *term).await?;
                let spec = config
                    .replicas
                    .iter()
                    .find(|r| r.server == from.server())
                    .cloned()
                    .ok_or_else(|| failed(from, "not among the replicas"))?;
                let caught_up = if *catch_up {
                    match catch_up_from(config, links, &spec, store, tasks, through.0).await {
                        Ok(head) => Some(head),
                        Err(reason) => {
                            // Its WAL no longer holds them, or the link
                            // broke: the image instead.
                            tracing::warn!(volume = %config.volume, replica = %from, %reason,
                                "peering: the catch-up from the replica failed; pulling its image");
                            None
                        }
                    }
                } else {
                    None
                };
                let pulled = match caught_up {
                    Some(head) => Ok(head),
                    None => pull(config, links, &spec, store, tasks)
                        .await
                        .map_err(|e| e.to_string()),
                };
                let pulled = match pulled {
                    Ok(image_lsn) if image_lsn >= through.0 => Ok(image_lsn),
                    Ok(image_lsn) => Err(format!(
                        "what it sent ends at {image_lsn}, it said {}",
                        through.0
                    )),
                    Err(e) => Err(e),
                };
                let image_lsn = match pulled {
                    Ok(image_lsn) => image_lsn,
                    // A link cut or a replica restarted mid-pull: peer again
                    // (the install was not committed; the store is as it was).
                    Err(reason) => {
                        tracing::warn!(volume = %config.volume, replica = %from, %reason,
                            "peering: recovering from the replica failed; asking again");
                        let why = format!("recovering from {from} failed ({reason}); asking again");
                        waiting(round, answers.len(), need, &why);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                tracing::info!(volume = %config.volume, replica = %from, image_lsn,
                    "peering: recovered the replica's log before serving");
            }
        }
        return Ok(decided);
    }
    unreachable!("rounds are counted by an unbounded range")
}

/// The local log as peering sees it: its head made durable first (a
/// failed catch-up may have left appended frames unsynced).
async fn local_log(
    config: &PrimaryConfig,
    store: &Arc<Store>,
    lost: bool,
    cut: bool,
) -> Result<LocalLog, VolumeError> {
    let head = store.head();
    let store = Arc::clone(store);
    let durable = tokio::task::spawn_blocking(move || store.sync_to(head).map(|_| store))
        .await
        .map_err(|e| VolumeError::Runtime(format!("peering: sync task: {e}")))??;
    let wal = durable.wal();
    Ok(LocalLog {
        head: Lsn(wal.durable()),
        epochs: transport::engine_epochs(&wal.epochs())
            .map_err(walship_engine::EngineError::from)?,
        lost,
        cut,
        // The newest term this volume's primaries are known to have used:
        // the store's, or a control plane's record of one this store
        // never saw (it was lost, or another node's).
        term: Epoch(durable.superblock().epoch.max(config.peering.term_floor)),
    })
}

fn failed(from: &ReplicaId, reason: &str) -> VolumeError {
    VolumeError::PeeringFailed {
        replica: from.to_string(),
        reason: reason.to_string(),
    }
}

/// Persists `term` in the store (so no later opening chooses it again,
/// written or not) and with the embedder (`on_term`, the configured term
/// included: a control plane records every term opened in), then opens in
/// it.
async fn choose_term(
    config: &mut PrimaryConfig,
    store: &Arc<Store>,
    tasks: &TaskTracker,
    term: Epoch,
) -> Result<(), VolumeError> {
    if store.superblock().epoch < term.0 {
        blocking(store, tasks, move |store| store.persist_epoch(term.0))
            .await
            .map_err(|e| VolumeError::Runtime(format!("persist term {}: {e}", term.0)))?;
    }
    if let Some(on_term) = &config.peering.on_term {
        (on_term.0)(term.0)
            .await
            .map_err(|e| VolumeError::Runtime(format!("persist term {}: {e}", term.0)))?;
    }
    config.epoch = term.0;
    Ok(())
}

/// How long a round waits for the replicas it does not need, once it has
/// the answers it needs: what they say of terms and commits is worth a
/// moment, not a failover's worth of a partitioned node's timeout.
const ROUND_GRACE: Duration = Duration::from_millis(300);

/// One round: every replica asked at once; the answers that came by the
/// time all did, or `need` did and the grace passed, or the peer timeout.
async fn ask_all(config: &PrimaryConfig, links: &PeerLinks, need: usize) -> Vec<PeerAnswer> {
    use futures::stream::{FuturesUnordered, StreamExt};
    let mut asks: FuturesUnordered<_> = config
        .replicas
        .iter()
        .map(|spec| async move {
            let answer = ask(config, links, spec).await;
            if let Err(error) = &answer {
                tracing::debug!(volume = %config.volume, replica = %spec.server, %error,
                    "peering: no answer");
            }
            answer.ok()
        })
        .collect();
    let grace = tokio::time::sleep(ROUND_GRACE);
    tokio::pin!(grace);
    let mut answers = Vec::new();
    let mut asked = asks.len();
    while asked > 0 {
        tokio::select! {
            Some(answer) = asks.next() => {
                asked -= 1;
                answers.extend(answer);
            }
            () = &mut grace, if answers.len() >= need => break,
        }
    }
    answers
}

fn replica_id(config: &PrimaryConfig, spec: &ReplicaSpec) -> Result<ReplicaId, ExecError> {
    ReplicaId::new(&config.volume, &spec.server).map_err(|e| ExecError::Protocol(e.to_string()))
}

async fn ask(
    config: &PrimaryConfig,
    links: &PeerLinks,
    spec: &ReplicaSpec,
) -> Result<PeerAnswer, ExecError> {
    let tuning = &config.tuning;
    let id = replica_id(config, spec)?;
    let limit = tuning.peer_timeout;
    // Connected first: a session waiting for its turn among those opening
    // to the peer (`mux::OPENING_PER_LINK`) is queued, not late.
    let mut conn = connect(tuning, links, &spec.addr).await?;
    let exchange = async {
        let message = Message::Peer {
            cluster: config.cluster.clone(),
            volume: config.volume.clone(),
            replica: id.as_str().to_owned(),
        };
        conn.send(Envelope {
            epoch: config.epoch,
            message,
        })
        .await?;
        recv(&mut conn, limit).await
    };
    let answer = tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| ExecError::Timeout(limit))??;
    let term = Epoch(answer.epoch);
    let Message::HelloAck {
        replica,
        flushed,
        epochs,
        committed,
        partial,
        ..
    } = answer.message
    else {
        return Err(ExecError::Protocol(format!(
            "peer: expected a hello ack, got {:?}",
            answer.message
        )));
    };
    if replica != id.as_str() {
        return Err(ExecError::Protocol(format!(
            "peer: {replica} answered for {id}"
        )));
    }
    let epochs: EpochHistory =
        transport::engine_epochs(&epochs).map_err(|e| ExecError::Protocol(format!("peer: {e}")))?;
    Ok(PeerAnswer {
        replica: id,
        term,
        flushed: Lsn(flushed),
        committed: Lsn(committed),
        epochs,
        partial: partial.is_some(),
    })
}

/// Says hello to `spec` in the term `config.epoch` (fencing anything
/// older): the connection to pull over.
async fn hello_for_pull(
    config: &PrimaryConfig,
    links: &PeerLinks,
    spec: &ReplicaSpec,
) -> Result<Conn, ExecError> {
    let id = replica_id(config, spec)?;
    let mut conn = connect(&config.tuning, links, &spec.addr).await?;
    let hello = Message::Hello {
        cluster: config.cluster.clone(),
        volume: config.volume.clone(),
        replica: id.as_str().to_owned(),
        session: 0,
        durable_commits: config.commit_mode != walship_engine::CommitMode::BestEffort,
    };
    conn.send(Envelope {
        epoch: config.epoch,
        message: hello,
    })
    .await?;
    transport::handshake_reply(recv(&mut conn, config.tuning.peer_timeout).await?)?;
    Ok(conn)
}

/// A reverse catch-up: `spec`'s WAL frames after this store's head,
/// through `through`, appended to this store's WAL and synced; returns the
/// new head. The replica's log extends this one (the engine checked), so
/// its frames follow this log's.
async fn catch_up_from(
    config: &PrimaryConfig,
    links: &PeerLinks,
    spec: &ReplicaSpec,
    store: &Arc<Store>,
    tasks: &TaskTracker,
    through: u64,
) -> Result<u64, ExecError> {
    let limit = config.tuning.peer_timeout;
    let mut conn = hello_for_pull(config, links, spec).await?;
    let mut head = store.head();
    while head < through {
        conn.send(Envelope {
            epoch: config.epoch,
            message: Message::PullFrames { after: head },
        })
        .await?;
        let (last, frames) = match recv(&mut conn, limit).await?.message {
            Message::WalBatch {
                first_lsn,
                last_lsn,
                frames,
                ..
            } if first_lsn == head + 1 => (last_lsn, frames),
            other => return Err(ExecError::Protocol(format!("pull frames: got {other:?}"))),
        };
        if frames.is_empty() {
            break;
        }
        // Committed 0: nothing goes straight to the extent; the WAL
        // checks every frame and its order. Its writes (and a rotation's
        // sync) block: off the volumes' arbiter, which other volumes share.
        let appended = blocking(store, tasks, move |store| {
            store.apply_replicated(&frames, 0)
        })
        .await?;
        if appended != last {
            return Err(ExecError::Protocol(format!(
                "pull frames: the batch claimed {last}, its frames end at {appended}"
            )));
        }
        head = appended;
    }
    blocking(store, tasks, move |store| store.sync_to(head)).await?;
    Ok(head)
}

/// Runs `work` on `store` on a blocking thread. The job holds a token of
/// the volume's tasks: a stop that drops the caller still waits for it
/// before the store reopens.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    tasks: &TaskTracker,
    work: impl FnOnce(&Store) -> Result<T, walship_io::StoreError> + Send + 'static,
) -> Result<T, ExecError> {
    let (store, token) = (Arc::clone(store), tasks.token());
    tokio::task::spawn_blocking(move || {
        let _token = token;
        work(&store)
    })
    .await
    .map_err(|e| ExecError::Protocol(format!("pull: store task: {e}")))?
    .map_err(ExecError::from)
}

/// Pulls `spec`'s whole volume at its durable LSN into `store`, in the
/// term `config.epoch`; returns the image's LSN.
async fn pull(
    config: &PrimaryConfig,
    links: &PeerLinks,
    spec: &ReplicaSpec,
    store: &Arc<Store>,
    tasks: &TaskTracker,
) -> Result<u64, ExecError> {
    let tuning: &Tuning = &config.tuning;
    let limit = tuning.peer_timeout;
    let epoch = config.epoch;
    let mut conn = hello_for_pull(config, links, spec).await?;
    conn.send(Envelope {
        epoch,
        message: Message::PullImage,
    })
    .await?;
    let (image_lsn, image_bytes) = match recv(&mut conn, limit).await?.message {
        Message::RebuildBegin {
            image_lsn,
            image_bytes,
            ..
        } => (image_lsn, image_bytes),
        other => return Err(ExecError::Protocol(format!("pull: got {other:?}"))),
    };
    let expected = store.block_count() * BLOCK_SIZE as u64;
    if image_bytes != expected {
        return Err(ExecError::Protocol(format!(
            "pull: image of {image_bytes} bytes, this volume is {expected}"
        )));
    }
    let install = store.begin_install(image_lsn).map_err(ExecError::from)?;
    let mut writer = InstallWriter::start(Sink::Staging(install));
    let chunk = (tuning.image_chunk_bytes as u64 / BLOCK_SIZE as u64).max(1) * BLOCK_SIZE as u64;
    let mut requested = 0;
    let mut received = 0;
    while received < image_bytes {
        while requested < image_bytes && requested - received < PULL_WINDOW * chunk {
            let len = chunk.min(image_bytes - requested);
            request_chunk(&mut conn, epoch, requested, len).await?;
            requested += len;
        }
        match recv(&mut conn, limit).await?.message {
            Message::RebuildChunk { offset, data, .. } if offset == received => {
                received += data.len() as u64;
                writer.write(offset, data).map_err(ExecError::from)?;
            }
            other => return Err(ExecError::Protocol(format!("pull: got {other:?}"))),
        }
    }
    conn.send(Envelope {
        epoch,
        message: Message::PullDone,
    })
    .await?;
    let (checksum, epochs) = match recv(&mut conn, limit).await?.message {
        Message::RebuildDone {
            image_lsn: done,
            checksum,
            epochs,
            ..
        } if done == image_lsn => (checksum, epochs),
        other => return Err(ExecError::Protocol(format!("pull: got {other:?}"))),
    };
    // The writer's last chunks, the image's fsync and the superblock switch
    // block for as long as the disk takes: off the volumes' arbiter. The
    // job holds a token of the volume's tasks, so a stop that drops this
    // future still waits for the switch to end before the store reopens.
    blocking(store, tasks, move |store| {
        match writer.finish()? {
            Sink::Staging(install) => store.commit_install(install, checksum, epoch, &epochs),
            // A pull only ever starts a staging install.
            Sink::InPlace(_) => Err(walship_io::StoreError::BaseIncomplete {
                received: 0,
                expected: 0,
            }),
        }
    })
    .await?;
    Ok(image_lsn)
}

async fn request_chunk(
    conn: &mut Conn,
    epoch: u64,
    offset: u64,
    len: u64,
) -> Result<(), ExecError> {
    let len = u32::try_from(len).map_err(|_| ExecError::Protocol("pull chunk too large".into()))?;
    conn.send(Envelope {
        epoch,
        message: Message::PullChunk { offset, len },
    })
    .await?;
    Ok(())
}
