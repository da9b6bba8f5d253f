//! The newest term each volume's primaries opened in, kept in etcd
//! (`terms/<volume>`: the term in decimal, a space, the node that opened
//! in it): a node that lost its disk still opens in a newer term than any
//! used (see [`crate::terms`]).

use super::keys::term_key;
use super::session::not_answering;
use crate::terms::TermKeeper;
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use futures::future::BoxFuture;
use std::io;
use std::time::Duration;

/// Raising a record that others raise at once: tries, each a read and a
/// compare-and-swap on its revision.
const RECORD_TRIES: usize = 16;
/// How long a call keeps trying while etcd does not answer (an etcd
/// restart, a leader election) before the opening fails.
const PATIENCE: Duration = Duration::from_secs(10);
/// How soon it tries again.
const RETRY: Duration = Duration::from_millis(200);

/// [`TermKeeper`] on etcd. Its calls run on the runtime the client was
/// made on (the node's), whichever runtime awaits them (a volume's).
#[derive(Clone)]
pub struct EtcdTerms {
    client: Client,
    cluster: String,
    node: String,
    runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for EtcdTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTerms")
            .field("cluster", &self.cluster)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A record: the term, the node that opened in it, its revision.
#[derive(Debug)]
struct Record {
    term: u64,
    node: String,
    /// 0: no record yet.
    revision: i64,
}

fn invalid(what: String) -> etcd_client::Error {
    etcd_client::Error::InvalidArgs(what)
}

/// The record at `key` (term and revision 0: none).
async fn read(client: &mut Client, key: &str) -> Result<Record, etcd_client::Error> {
    let response = client.get(key, None).await?;
    let Some(kv) = response.kvs().first() else {
        return Ok(Record {
            term: 0,
            node: String::new(),
            revision: 0,
        });
    };
    let bad = || invalid(format!("{key}: not a term record: {:?}", kv.value()));
    let text = std::str::from_utf8(kv.value()).map_err(|_| bad())?;
    let (term, node) = text.split_once(' ').ok_or_else(bad)?;
    Ok(Record {
        term: term.parse().map_err(|_| bad())?,
        node: node.to_owned(),
        revision: kv.mod_revision(),
    })
}

/// Raises the record at `key` to `term`, opened in by `node`.
async fn raise(
    client: &mut Client,
    key: &str,
    term: u64,
    node: &str,
) -> Result<(), etcd_client::Error> {
    for _ in 0..RECORD_TRIES {
        let recorded = read(client, key).await?;
        if recorded.term == term && recorded.node == node {
            return Ok(());
        }
        if recorded.term >= term {
            return Err(invalid(format!(
                "{key}: {} opened in term {}; this opening's {term} is not newer",
                recorded.node, recorded.term
            )));
        }
        let unchanged = match recorded.revision {
            0 => Compare::create_revision(key, CompareOp::Equal, 0),
            revision => Compare::mod_revision(key, CompareOp::Equal, revision),
        };
        let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
            key,
            format!("{term} {node}"),
            None,
        )]);
        if client.txn(txn).await?.succeeded() {
            return Ok(());
        }
    }
    Err(invalid(format!(
        "{key}: raced {RECORD_TRIES} times raising it to {term}"
    )))
}

impl EtcdTerms {
    /// Records of `node` under `cluster`, through `client`, on the current
    /// runtime.
    pub fn new(client: Client, cluster: &str, node: &str) -> Self {
        Self {
            client,
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Runs `work` on the node's runtime, again while etcd does not
    /// answer (for up to [`PATIENCE`]).
    fn run<T, F>(&self, work: F) -> BoxFuture<'static, io::Result<T>>
    where
        T: Send + 'static,
        F: Fn(Client) -> BoxFuture<'static, Result<T, etcd_client::Error>> + Send + 'static,
    {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                match work(client.clone()).await {
                    Err(e) if not_answering(&e) && tokio::time::Instant::now() < deadline => {
                        tracing::warn!(error = %e, "etcd: not answering a term's record; trying again");
                        tokio::time::sleep(RETRY).await;
                    }
                    done => return done,
                }
            }
        });
        Box::pin(async move {
            task.await
                .map_err(io::Error::other)?
                .map_err(io::Error::other)
        })
    }
}

impl TermKeeper for EtcdTerms {
    fn newest(&self, volume: &str) -> BoxFuture<'static, io::Result<u64>> {
        let key = term_key(&self.cluster, volume);
        self.run(move |mut client| {
            let key = key.clone();
            Box::pin(async move { Ok(read(&mut client, &key).await?.term) })
        })
    }

    /// Refuses a term older than the one recorded, or the same term opened
    /// in by another node: it was used already, and this opening must not
    /// go on in it.
    fn record(&self, volume: &str, term: u64) -> BoxFuture<'static, io::Result<()>> {
        let (key, node) = (term_key(&self.cluster, volume), self.node.clone());
        self.run(move |mut client| {
            let (key, node) = (key.clone(), node.clone());
            Box::pin(async move { raise(&mut client, &key, term, &node).await })
        })
    }
}
