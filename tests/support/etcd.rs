//! A real etcd (Debian's `etcd-server`) for the tests: one member on
//! 127.0.0.1, free ports, a temp data dir, killed by its pid when dropped.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};
use walship::actors::testing::within;
use walship::node::etcd::etcd_client::Client;

/// A running etcd.
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub endpoint: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd and returns once it answers a read.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let held: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
            .collect();
        let port = |i: usize| held[i].local_addr().expect("local addr").port();
        let (client, peer) = (port(0), port(1));
        drop(held);
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "walship-test"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("walship-test={peer_url}")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("etcd (Debian's etcd-server) is installed");
        let etcd = Self {
            child,
            endpoint,
            dir,
        };
        let up = within(Duration::from_secs(20), || async {
            let mut client = Client::connect([&etcd.endpoint], None).await.ok()?;
            client.get("/", None).await.ok().map(|_| ())
        })
        .await;
        assert!(up.is_some(), "etcd did not answer:\n{}", etcd.log());
        etcd
    }

    /// A client of it.
    pub async fn client(&self) -> Client {
        Client::connect([&self.endpoint], None)
            .await
            .expect("connect to etcd")
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
