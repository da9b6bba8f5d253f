//! What a replica admits, decided from what it knows alone: its identity,
//! the epoch it accepts, the current primary's connection and its WAL head.
//! The receiver asks these in order for every frame (identity and epoch at
//! hello; epoch and connection for everything after; order for WAL
//! batches), and a refusal closes the connection with the message it names.

use walship_io::{Message, CODE_IDENTITY, CODE_OUT_OF_ORDER, CODE_SUPERSEDED};

/// Who a replica is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    /// Its volume.
    pub(crate) volume: String,
    /// Its replica id.
    pub(crate) replica: String,
}

/// Why a frame is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A hello for another volume or replica.
    Identity(String),
    /// An older epoch than the replica accepts: the sender is fenced.
    Fenced { current: u64 },
    /// Not the current primary's connection, or not its epoch.
    Superseded,
    /// A WAL batch that does not start right after the head.
    OutOfOrder { first: u64, head: u64 },
}

impl Refusal {
    /// What tells the peer, before the connection closes.
    pub(crate) fn message(&self) -> Message {
        let (code, message) = match self {
            Self::Fenced { current } => {
                return Message::Fence {
                    current_epoch: *current,
                }
            }
            Self::Identity(why) => (CODE_IDENTITY, why.clone()),
            Self::Superseded => (
                CODE_SUPERSEDED,
                "not the current primary connection; say hello".to_owned(),
            ),
            Self::OutOfOrder { first, head } => (
                CODE_OUT_OF_ORDER,
                format!("batch starts at {first}, head is {head}"),
            ),
        };
        Message::Error { code, message }
    }

    /// Whether the refusal is for an old epoch (counted as fenced, not rejected).
    pub(crate) fn is_fence(&self) -> bool {
        matches!(self, Self::Fenced { .. })
    }
}

/// A hello from a primary of `epoch` for `replica` of `volume`, to a replica
/// that accepts `current`. Admitted, it returns the epoch the replica takes
/// on: newer than `current` means it must be persisted before anything else.
pub(crate) fn hello(
    us: &Identity,
    current: u64,
    volume: &str,
    replica: &str,
    epoch: u64,
) -> Result<u64, Refusal> {
    if volume != us.volume || replica != us.replica {
        return Err(Refusal::Identity(format!(
            "this is {} of volume {}, not {replica} of {volume}",
            us.replica, us.volume
        )));
    }
    if epoch < current {
        return Err(Refusal::Fenced { current });
    }
    Ok(epoch)
}

/// Any frame but hello, in `epoch` on connection `conn`, to a replica that
/// accepts `current` from connection `active`.
pub(crate) fn frame(
    current: u64,
    active: Option<u64>,
    conn: u64,
    epoch: u64,
) -> Result<(), Refusal> {
    if epoch < current {
        return Err(Refusal::Fenced { current });
    }
    if active != Some(conn) || epoch != current {
        return Err(Refusal::Superseded);
    }
    Ok(())
}

/// A WAL batch from `first` onto a WAL whose head is `head`.
pub(crate) fn batch(head: u64, first: u64) -> Result<(), Refusal> {
    if first != head + 1 {
        return Err(Refusal::OutOfOrder { first, head });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us() -> Identity {
        Identity {
            volume: "vol".into(),
            replica: "vol/s2".into(),
        }
    }

    #[test]
    fn hello_checks_identity_before_epoch() {
        assert_eq!(hello(&us(), 3, "vol", "vol/s2", 3), Ok(3));
        assert_eq!(
            hello(&us(), 3, "vol", "vol/s2", 5),
            Ok(5),
            "newer: taken on"
        );
        assert_eq!(
            hello(&us(), 3, "vol", "vol/s2", 2),
            Err(Refusal::Fenced { current: 3 })
        );
        // Someone else's hello is refused for who it names, whatever its epoch.
        for (volume, replica) in [("vol", "vol/s3"), ("other", "vol/s2")] {
            let refused = hello(&us(), 3, volume, replica, 2).unwrap_err();
            assert!(matches!(&refused, Refusal::Identity(why) if why.contains(replica)));
            assert!(matches!(
                refused.message(),
                Message::Error {
                    code: CODE_IDENTITY,
                    ..
                }
            ));
        }
    }

    #[test]
    fn frames_come_from_the_current_primary_connection_in_its_epoch() {
        assert_eq!(frame(3, Some(7), 7, 3), Ok(()));
        let fenced = frame(3, Some(7), 7, 2).unwrap_err();
        assert!(fenced.is_fence());
        assert_eq!(fenced.message(), Message::Fence { current_epoch: 3 });
        // Another connection, none at all, or an epoch not yet greeted.
        for (active, conn, epoch) in [(Some(7), 8, 3), (None, 7, 3), (Some(7), 7, 4)] {
            let refused = frame(3, active, conn, epoch).unwrap_err();
            assert_eq!(refused, Refusal::Superseded);
            assert!(!refused.is_fence());
            assert!(matches!(
                refused.message(),
                Message::Error {
                    code: CODE_SUPERSEDED,
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_batch_starts_right_after_the_head() {
        assert_eq!(batch(10, 11), Ok(()));
        for first in [10, 12, 0] {
            let refused = batch(10, first).unwrap_err();
            assert_eq!(refused, Refusal::OutOfOrder { first, head: 10 });
            assert!(
                matches!(refused.message(), Message::Error { code: CODE_OUT_OF_ORDER, message } if message.contains("head is 10"))
            );
        }
    }
}
