//! What a rebuild moves: every region, only those a dirty map marks, or
//! only those whose checksums differ; and whether the replica installs it
//! in place or into a staging file. Chosen with the reason, like every plan.
//!
//! **The dirty map's validity rule.** The primary's map for a replica
//! marks every region a write touched after `since`, as the primary's
//! extent took it (the shell keeps it; see `walship-io`'s
//! `Store::track_dirty`). It says where the replica differs from the
//! primary's image only if the replica's content is the primary's own
//! history at some LSN `K >= since`: its log matches the primary's by
//! epoch up to `K` (the divergence point), its extent holds nothing past
//! `K` (checkpoint `<= K`), and it applies its log through `min(K, image)`
//! before the regions are written. Anything else (a replica that diverged
//! below `since`, one whose map was lost, a failover: a new primary holds
//! no map for anyone) is compared by checksums. A map exists only while it
//! is valid for the primary's own log: the shell drops maps on any change
//! of history under them (a base install, a role change).
//!
//! **In place or staged.** In place, the replica's extent mixes old and new
//! until the image is committed; until then it holds no usable log. That
//! is allowed only when what it holds is not needed as a copy of what was
//! committed: it holds nothing (empty, or a partial image already), the
//! mode promises nothing beyond the primary (best_effort), or another
//! replica in sync holds everything committed. Otherwise the image goes
//! whole into a staging file and the switch is atomic, as before.

use crate::history::ReplicaLog;
use crate::ids::Lsn;
use serde::Serialize;
use std::fmt;

/// An install in place a replica has not finished (its hello says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct PartialImage {
    /// The primary store the image came from (opaque id).
    pub source: u64,
    /// That primary's dirty map for the replica marked every write after
    /// this LSN, at most the image's (`None`: it had none).
    pub since: Option<Lsn>,
    /// The image's LSN.
    pub image_lsn: Lsn,
    /// Bytes of the image installed durably from its start: below, the
    /// replica holds the image.
    pub cursor: u64,
    /// The regions were chosen by that map: above the cursor, the replica
    /// holds its own history, which the map covers.
    pub by_map: bool,
}

/// What a resumed install sends past its cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Above {
    /// The regions the dirty map marks (the replica holds its own history there).
    Dirty,
    /// The regions whose checksums differ (it holds whatever it held).
    Compared,
}

/// What the primary's dirty map for a replica covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DirtyMap {
    /// Writes after this LSN are marked.
    pub since: Lsn,
    /// Regions marked.
    pub dirty: u64,
    /// Regions in the volume.
    pub regions: u64,
}

/// What a rebuild moves, and how the replica installs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "transfer")]
pub enum Transfer {
    /// Every chunk into a staging file; what the replica holds stays whole
    /// until the atomic switch.
    Staged {
        /// Why not in place.
        reason: String,
    },
    /// Every region, in place.
    Whole {
        /// Why.
        reason: String,
    },
    /// The regions the dirty map marks, in place, after the replica
    /// applied its own log through `min(apply_through, image)`.
    Dirty {
        /// The map's `since`.
        since: Lsn,
        /// The replica's log is the primary's history up to here (0: it
        /// applies nothing: a partial image).
        apply_through: Lsn,
        /// Regions marked when planned.
        regions: u64,
        /// Regions in the volume.
        of: u64,
    },
    /// An install in place cut part way, resumed: below `from` the replica
    /// holds the earlier image, which differs from this one only where the
    /// dirty map (since at most that image) marks; above it, `above`.
    Resume {
        /// The map's `since`.
        since: Lsn,
        /// The replica's cursor: bytes of the earlier image it holds.
        from: u64,
        /// What goes past the cursor.
        above: Above,
        /// Regions marked when planned.
        regions: u64,
        /// Regions in the volume.
        of: u64,
    },
    /// The regions whose checksums differ, in place, after the replica
    /// applied its own log through `min(apply_through, image)` (what it
    /// shares with this log then compares equal instead of moving).
    Compared {
        /// Why no dirty map serves.
        reason: String,
        /// What the replica applies first (0: nothing; a partial image).
        apply_through: Lsn,
    },
}

impl Transfer {
    /// The recovery log's event for it.
    pub fn event_name(&self) -> &'static str {
        match self {
            Self::Staged { .. } => "plan_rebuild_staged",
            Self::Whole { .. } => "plan_rebuild_whole",
            Self::Dirty { .. } => "plan_rebuild_delta",
            Self::Resume { .. } => "plan_rebuild_resume",
            Self::Compared { .. } => "plan_rebuild_checksum",
        }
    }

    /// Whether the replica installs it in place.
    pub fn in_place(&self) -> bool {
        !matches!(self, Self::Staged { .. })
    }

    /// The dirty map's `since` it was chosen by, if any.
    pub fn dirty_since(&self) -> Option<Lsn> {
        match self {
            Self::Dirty { since, .. } | Self::Resume { since, .. } => Some(*since),
            _ => None,
        }
    }
}

impl fmt::Display for Transfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Staged { reason } | Self::Whole { reason } | Self::Compared { reason, .. } => {
                f.write_str(reason)
            }
            Self::Resume {
                since,
                from,
                above,
                regions,
                of,
            } => {
                let above = match above {
                    Above::Dirty => "the same map",
                    Above::Compared => "compare region checksums",
                };
                write!(
                    f,
                    "rebuild_interrupted at byte {from}: below it regions={regions} of {of} (dirty map since lsn {since}); above it {above}"
                )
            }
            Self::Dirty {
                since,
                apply_through,
                regions,
                of,
            } => {
                write!(f, "regions={regions} of {of} (dirty map since lsn {since}")?;
                if *apply_through > Lsn::ZERO {
                    write!(f, "; the replica applies its log through {apply_through}")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// What the choice is made from.
#[derive(Debug, Clone, Copy)]
pub struct TransferInputs<'a> {
    /// Delta rebuilds are on (off: every rebuild is staged, as before).
    pub enabled: bool,
    /// What the replica said of its log.
    pub replica: &'a ReplicaLog,
    /// The replica's log is the primary's history up to here: the lower of
    /// its durable LSN and the divergence point.
    pub agreed: Lsn,
    /// The image holds at least this LSN (the snapshot's, or the committed
    /// LSN a full base holds at least).
    pub image_floor: Lsn,
    /// The primary's dirty map for it, if it has one.
    pub map: Option<DirtyMap>,
    /// The primary store's image source id.
    pub source: u64,
    /// What the replica holds is not needed as a copy of what was
    /// committed (see the module docs).
    pub other_copy: bool,
    /// An online verify found regions that differ (why): no map covers
    /// them, so every region is compared.
    pub mismatch: Option<&'a str>,
}

/// Chooses what a rebuild moves (see the module docs for the rules).
pub fn select_transfer(inputs: &TransferInputs<'_>) -> Transfer {
    let log = inputs.replica;
    if !inputs.enabled {
        return Transfer::Staged {
            reason: "delta rebuilds are off".into(),
        };
    }
    if let Some(partial) = log.partial {
        // The same primary's map, since at most the earlier image: it
        // marks every region where that image and this one differ.
        let resumes = inputs.map.filter(|map| {
            partial.source == inputs.source && partial.since.is_some_and(|s| map.since <= s)
        });
        return match resumes {
            Some(map) => Transfer::Resume {
                since: map.since,
                from: partial.cursor,
                above: if partial.by_map {
                    Above::Dirty
                } else {
                    Above::Compared
                },
                regions: map.dirty,
                of: map.regions,
            },
            None => Transfer::Compared {
                apply_through: Lsn::ZERO,
                reason: format!(
                    "rebuild_interrupted: the replica holds part of an image at {}{}",
                    partial.image_lsn,
                    match (partial.source == inputs.source, partial.since.is_some()) {
                        (false, _) => " from another primary",
                        (true, false) => " and no dirty map covers it",
                        (true, true) => " and its dirty map is gone",
                    }
                ),
            },
        };
    }
    if log.flushed == Lsn::ZERO && log.checkpoint == Lsn::ZERO && log.epochs.newest().is_none() {
        return Transfer::Whole {
            reason: "replica_empty: it holds nothing to compare".into(),
        };
    }
    if !inputs.other_copy {
        return Transfer::Staged {
            reason:
                "its log may be the only other copy of what was committed: staged, not in place"
                    .into(),
        };
    }
    let agreed = inputs.agreed;
    if let Some(found) = inputs.mismatch {
        return Transfer::Compared {
            reason: format!("compare region checksums: {found}"),
            apply_through: if log.checkpoint <= agreed {
                agreed
            } else {
                Lsn::ZERO
            },
        };
    }
    let why_not = match inputs.map {
        None => "no dirty map for this replica (a failover, a restart before it was persisted, or it was never in sync here)".to_owned(),
        Some(map) if map.since > agreed => format!(
            "dirty map since lsn {} is past what the replica shares with this log ({agreed})",
            map.since
        ),
        Some(_) if log.checkpoint > agreed => format!(
            "the replica's checkpoint {} is past what it shares with this log ({agreed})",
            log.checkpoint
        ),
        // The map covers writes up to the image: one that starts past it
        // says nothing of (image, since]; an extent past the image holds
        // writes no region of it would undo.
        Some(map) if map.since > inputs.image_floor || log.checkpoint > inputs.image_floor => {
            format!(
                "the image at {} is older than the dirty map (since lsn {}) or the replica's checkpoint ({})",
                inputs.image_floor, map.since, log.checkpoint
            )
        }
        Some(map) => {
            return Transfer::Dirty {
                since: map.since,
                apply_through: agreed,
                regions: map.dirty,
                of: map.regions,
            }
        }
    };
    // Its log up to what it shares goes into its extent first, unless
    // its checkpoint is already past that (then nothing of it is applied).
    Transfer::Compared {
        reason: format!("compare region checksums: {why_not}"),
        apply_through: if log.checkpoint <= agreed {
            agreed
        } else {
            Lsn::ZERO
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Epoch;

    fn log(flushed: u64, checkpoint: u64) -> ReplicaLog {
        ReplicaLog {
            checkpoint: Lsn(checkpoint),
            ..ReplicaLog::single_epoch(Lsn(flushed), Epoch(1))
        }
    }

    fn map(since: u64) -> Option<DirtyMap> {
        Some(DirtyMap {
            since: Lsn(since),
            dirty: 37,
            regions: 4096,
        })
    }

    fn pick(log: &ReplicaLog, agreed: u64, map: Option<DirtyMap>, other_copy: bool) -> Transfer {
        select_transfer(&TransferInputs {
            enabled: true,
            replica: log,
            image_floor: Lsn(1000),
            agreed: Lsn(agreed),
            map,
            source: 7,
            other_copy,
            mismatch: None,
        })
    }

    fn partial(source: u64, since: u64) -> ReplicaLog {
        ReplicaLog {
            partial: Some(PartialImage {
                source,
                since: (since > 0).then_some(Lsn(since)),
                image_lsn: Lsn(500),
                cursor: 3 << 20,
                by_map: true,
            }),
            ..ReplicaLog::single_epoch(Lsn::ZERO, Epoch(1))
        }
    }

    #[test]
    #[allow(clippy::type_complexity)]
    fn the_transfer_table() {
        let dirty = |since: u64, through: u64| Transfer::Dirty {
            since: Lsn(since),
            apply_through: Lsn(through),
            regions: 37,
            of: 4096,
        };
        let resume = |since: u64| Transfer::Resume {
            since: Lsn(since),
            from: 3 << 20,
            above: Above::Dirty,
            regions: 37,
            of: 4096,
        };
        let name = |t: &Transfer| t.event_name();
        // (replica log, agreed, map, other copy) → expected
        let cases: Vec<(&str, ReplicaLog, u64, Option<DirtyMap>, bool, Transfer)> = vec![
            (
                "a map since what it shares",
                log(900, 800),
                900,
                map(850),
                true,
                dirty(850, 900),
            ),
            (
                "a map since exactly what it shares",
                log(900, 900),
                900,
                map(900),
                true,
                dirty(900, 900),
            ),
            (
                "it diverged below the map",
                log(900, 100),
                700,
                map(850),
                true,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn(700),
                },
            ),
            (
                "its checkpoint holds another history",
                log(900, 800),
                700,
                map(600),
                true,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn::ZERO,
                },
            ),
            (
                "no map (a failover)",
                log(900, 800),
                900,
                None,
                true,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn(900),
                },
            ),
            (
                "only other copy",
                log(900, 800),
                900,
                map(850),
                false,
                Transfer::Staged {
                    reason: String::new(),
                },
            ),
            (
                "empty replica, even if the only copy",
                log(0, 0),
                0,
                None,
                false,
                Transfer::Whole {
                    reason: String::new(),
                },
            ),
            (
                "partial from this map",
                partial(7, 850),
                0,
                map(850),
                false,
                resume(850),
            ),
            (
                "partial, the map is older",
                partial(7, 850),
                0,
                map(600),
                false,
                resume(600),
            ),
            (
                "partial, the map is newer",
                partial(7, 850),
                0,
                map(900),
                false,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn::ZERO,
                },
            ),
            (
                "partial from another primary",
                partial(8, 850),
                0,
                map(850),
                false,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn::ZERO,
                },
            ),
            (
                "partial no map covered",
                partial(7, 0),
                0,
                map(10),
                false,
                Transfer::Compared {
                    reason: String::new(),
                    apply_through: Lsn::ZERO,
                },
            ),
        ];
        for (what, log, agreed, map, other, want) in cases {
            let got = pick(&log, agreed, map, other);
            assert_eq!(name(&got), name(&want), "{what}: {got}");
            match (&got, &want) {
                (
                    Transfer::Compared {
                        apply_through: a, ..
                    },
                    Transfer::Compared {
                        apply_through: b, ..
                    },
                ) => assert_eq!(a, b, "{what}: what the replica applies first"),
                (_, Transfer::Dirty { .. } | Transfer::Resume { .. }) => {
                    assert_eq!(got, want, "{what}")
                }
                _ => {}
            }
        }
    }

    #[test]
    fn off_is_always_staged_and_every_choice_says_why() {
        let off = select_transfer(&TransferInputs {
            enabled: false,
            image_floor: Lsn(1000),
            replica: &partial(7, 850),
            agreed: Lsn::ZERO,
            map: map(850),
            source: 7,
            other_copy: true,
            mismatch: None,
        });
        assert_eq!(off.to_string(), "delta rebuilds are off");
        assert_eq!(
            pick(&log(900, 800), 900, map(850), true).to_string(),
            "regions=37 of 4096 (dirty map since lsn 850; the replica applies its log through 900)"
        );
        assert!(pick(&log(900, 100), 700, map(850), true)
            .to_string()
            .contains(
                "dirty map since lsn 850 is past what the replica shares with this log (700)"
            ));
        assert!(pick(&partial(8, 850), 0, map(850), true)
            .to_string()
            .starts_with(
            "rebuild_interrupted: the replica holds part of an image at 500 from another primary"
        ));
        assert!(pick(&log(900, 800), 900, None, true)
            .to_string()
            .contains("no dirty map"));
        // An image older than the map (a checkpoint behind the replica's
        // return) says nothing of what the map starts past: compared.
        let older = select_transfer(&TransferInputs {
            enabled: true,
            replica: &log(900, 800),
            agreed: Lsn(900),
            image_floor: Lsn(820),
            map: map(850),
            source: 7,
            other_copy: true,
            mismatch: None,
        });
        assert!(
            older.to_string().contains("the image at 820 is older"),
            "{older}"
        );
        let behind = select_transfer(&TransferInputs {
            image_floor: Lsn(790),
            map: map(700),
            ..TransferInputs {
                enabled: true,
                replica: &log(900, 800),
                agreed: Lsn(900),
                image_floor: Lsn(0),
                map: None,
                source: 7,
                other_copy: true,
                mismatch: None,
            }
        });
        assert_eq!(behind.event_name(), "plan_rebuild_checksum", "{behind}");
    }
}
