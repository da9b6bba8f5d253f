//! The newest term each volume's primaries opened in, kept in etcd
//! (`terms/<volume>`, a decimal u64): a node that lost its disk still
//! opens in a newer term than any used (see [`crate::terms`]).

use super::prefix;
use crate::terms::TermKeeper;
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use futures::future::BoxFuture;
use std::io;

/// A record's key.
pub fn term_key(cluster: &str, volume: &str) -> String {
    format!("{}terms/{volume}", prefix(cluster))
}

/// Raising a record that others raise at once: tries, each a read and a
/// compare-and-swap on its revision.
const RECORD_TRIES: usize = 16;

/// [`TermKeeper`] on etcd. Its calls run on the runtime the client was
/// made on (the node's), whichever runtime awaits them (a volume's).
#[derive(Clone)]
pub struct EtcdTerms {
    client: Client,
    cluster: String,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for EtcdTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTerms")
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl EtcdTerms {
    /// Records under `cluster`, through `client`, on the current runtime.
    pub fn new(client: Client, cluster: &str) -> Self {
        Self {
            client,
            cluster: cluster.to_owned(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn run<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> BoxFuture<'static, io::Result<T>> {
        let task = self.runtime.spawn(work);
        Box::pin(async move {
            task.await
                .map_err(io::Error::other)?
                .map_err(io::Error::other)
        })
    }
}

/// The term recorded at `key` and the record's revision (0, 0: none).
async fn read(client: &mut Client, key: &str) -> Result<(u64, i64), etcd_client::Error> {
    let response = client.get(key, None).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok((0, 0));
    };
    let term = std::str::from_utf8(kv.value())
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            etcd_client::Error::InvalidArgs(format!("{key}: not a term: {:?}", kv.value()))
        })?;
    Ok((term, kv.mod_revision()))
}

impl TermKeeper for EtcdTerms {
    fn newest(&self, volume: &str) -> BoxFuture<'static, io::Result<u64>> {
        let (mut client, key) = (self.client.clone(), term_key(&self.cluster, volume));
        self.run(async move { Ok(read(&mut client, &key).await?.0) })
    }

    fn record(&self, volume: &str, term: u64) -> BoxFuture<'static, io::Result<()>> {
        let (mut client, key) = (self.client.clone(), term_key(&self.cluster, volume));
        self.run(async move {
            for _ in 0..RECORD_TRIES {
                let (recorded, revision) = read(&mut client, &key).await?;
                if recorded >= term {
                    return Ok(());
                }
                let unchanged = match revision {
                    0 => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                    _ => Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
                };
                let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
                    key.as_str(),
                    term.to_string(),
                    None,
                )]);
                if client.txn(txn).await?.succeeded() {
                    return Ok(());
                }
            }
            Err(etcd_client::Error::InvalidArgs(format!(
                "{key}: raced {RECORD_TRIES} times raising it to {term}"
            )))
        })
    }
}
