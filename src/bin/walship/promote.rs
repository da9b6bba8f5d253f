//! `walship promote --etcd URL --cluster C --volume V --accept-data-loss`:
//! the desperate path, an operator's explicit act. The controller never
//! takes it: when no replica is eligible it leaves the volume down with the
//! reasons (`walship status`); this promotes the running replica with the
//! most data anyway and says which committed writes are lost.

use std::io::Write;

/// Promotes on the desperate path and prints the decision.
pub async fn run(
    endpoints: &[String],
    cluster: &str,
    volume: &str,
    accept_data_loss: bool,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    if !accept_data_loss {
        anyhow::bail!(
            "promoting a replica that is not eligible loses committed writes: \
             say so with --accept-data-loss"
        );
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (endpoints, cluster, volume, out);
        anyhow::bail!("this walship was built without etcd (cargo build --features etcd)");
    }
    #[cfg(feature = "etcd")]
    {
        use anyhow::Context as _;
        use walship::node::etcd::{etcd_client::Client, promote_accepting_loss};
        let mut client = Client::connect(endpoints, None)
            .await
            .with_context(|| format!("etcd at {}", endpoints.join(",")))?;
        let accepted = walship::engine::DataLossAccepted;
        let decision =
            promote_accepting_loss(&mut client, cluster, volume, "operator", accepted).await?;
        writeln!(out, "{}", serde_json::to_string_pretty(&decision)?)?;
        Ok(())
    }
}
