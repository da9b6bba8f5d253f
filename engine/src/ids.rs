//! Identifiers and ordered newtypes the engine speaks in.
//!
//! `Lsn`, `Epoch`, `Tick`, `SessionId`, `BarrierId` and `ResourceId` are plain
//! ordered integers wrapped so they cannot be mixed up. `ReplicaId` is the
//! stable identity of a replica (`<volume>/<server>`); it is never derived
//! from an address, so a replica that restarts on a new address keeps it.
//! `Endpoint` is where a replica is reachable now, with a version that only
//! grows.

use serde::Serialize;
use std::fmt;

macro_rules! ordered_newtype {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize)]
        #[serde(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The zero value.
            pub const ZERO: Self = Self(0);

            /// The raw integer.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

ordered_newtype!(
    /// Log sequence number. LSN 0 means "nothing written"; the first frame is 1.
    Lsn,
    ""
);
ordered_newtype!(
    /// Fencing epoch. Traffic from an older epoch is rejected everywhere.
    Epoch,
    "e"
);
ordered_newtype!(
    /// Logical time. The shell decides how long a tick is; the engine only compares.
    Tick,
    "t"
);
ordered_newtype!(
    /// Identity of one recovery session. Unique for the life of an engine.
    SessionId,
    "s"
);
ordered_newtype!(
    /// Identity of one commit barrier.
    BarrierId,
    "b"
);
ordered_newtype!(
    /// Identity of one resource (pin) granted by the shell.
    ResourceId,
    "r"
);

impl Lsn {
    /// The next LSN.
    pub const fn next(self) -> Lsn {
        Lsn(self.0 + 1)
    }

    /// Number of LSNs in `(self, to]`, zero when `to <= self`.
    pub const fn entries_to(self, to: Lsn) -> u64 {
        to.0.saturating_sub(self.0)
    }
}

impl Tick {
    /// `self + ticks`, saturating.
    pub const fn after(self, ticks: u64) -> Tick {
        Tick(self.0.saturating_add(ticks))
    }

    /// Ticks elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub const fn since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

/// Stable identity of a replica: `<volume>/<server>`.
///
/// Both parts are non-empty and contain no `/`. The identity never changes
/// when the replica's address does.
///
/// Its `Debug` is its text (`v/s2`), like its `Display`: it appears in
/// errors and logs, where `ReplicaId("v/s2")` only adds noise.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ReplicaId(String);

/// A replica id that is not of the form `<volume>/<server>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replica id {0:?}: expected <volume>/<server> with both parts non-empty")]
pub struct InvalidReplicaId(pub String);

impl ReplicaId {
    /// Builds `<volume>/<server>`.
    pub fn new(volume: &str, server: &str) -> Result<Self, InvalidReplicaId> {
        Self::parse(&format!("{volume}/{server}"))
    }

    /// Parses `<volume>/<server>`.
    pub fn parse(text: &str) -> Result<Self, InvalidReplicaId> {
        match text.split_once('/') {
            Some((volume, server))
                if !volume.is_empty() && !server.is_empty() && !server.contains('/') =>
            {
                Ok(Self(text.to_owned()))
            }
            _ => Err(InvalidReplicaId(text.to_owned())),
        }
    }

    /// The volume part.
    pub fn volume(&self) -> &str {
        self.0.split_once('/').map_or("", |(volume, _)| volume)
    }

    /// The server part.
    pub fn server(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, server)| server)
    }

    /// The whole id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a replica can be reached now. A higher `version` supersedes a lower one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Endpoint {
    /// Address of the data (WAL shipping) channel.
    pub data_addr: String,
    /// Address of the control channel.
    pub ctrl_addr: String,
    /// Monotonic version assigned by the control plane.
    pub version: u64,
}

impl Endpoint {
    /// An endpoint whose data and control channels share one address.
    pub fn new(addr: impl Into<String>, version: u64) -> Self {
        let addr = addr.into();
        Self {
            ctrl_addr: addr.clone(),
            data_addr: addr,
            version,
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@v{}", self.data_addr, self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_id_keeps_volume_and_server() {
        let id = ReplicaId::new("vol1", "srv-a").unwrap();
        assert_eq!(id.as_str(), "vol1/srv-a");
        assert_eq!(id.volume(), "vol1");
        assert_eq!(id.server(), "srv-a");
    }

    #[test]
    fn replica_id_rejects_malformed_text() {
        for bad in ["", "vol", "/srv", "vol/", "a/b/c"] {
            assert_eq!(
                ReplicaId::parse(bad),
                Err(InvalidReplicaId(bad.to_owned())),
                "{bad}"
            );
        }
    }

    #[test]
    fn lsn_entries_and_tick_arithmetic_saturate() {
        assert_eq!(Lsn(5).entries_to(Lsn(9)), 4);
        assert_eq!(Lsn(9).entries_to(Lsn(5)), 0);
        assert_eq!(Tick(u64::MAX).after(3), Tick(u64::MAX));
        assert_eq!(Tick(3).since(Tick(10)), 0);
    }
}
