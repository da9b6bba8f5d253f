//! Nodes as processes (`walship serve`), with real NBD clients: qemu-io,
//! fio, nbdcopy, qemu-img. Three nodes on loopback: node1 primary of vol0
//! (sync_all), node2 and node3 its replicas, exporting it read-only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/nbd_client.rs"]
mod nbd_client;
#[path = "support/nodes.rs"]
mod nodes;
#[path = "support/workload.rs"]
mod workload;

use nbd_client::*;
use nodes::{run, run_ok, NodeCluster, VolumeOptions};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use walship::node::admin;
use workload::*;

const CONVERGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_write_through_the_primary_and_every_replica_compares_identical() {
    let mut cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let primary = cluster.nodes[0].uri("vol0");

    // An operator's view: the table, and the JSON behind it.
    let admin = cluster.nodes[0].admin_addr();
    let table = run_ok(nodes::WALSHIP, &["status", "--admin", &admin], CLIENT).await;
    for row in [
        "vol0         primary",
        "vol0/node2",
        "vol0/node3",
        "in_sync",
        "read-write",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
    let json = run_ok(
        nodes::WALSHIP,
        &["status", "--admin", &admin, "--json"],
        CLIENT,
    )
    .await;
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        report["volumes"][0]["status"]["registry"]["senders"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let down = run(
        nodes::WALSHIP,
        &["status", "--admin", "127.0.0.1:1"],
        CLIENT,
    )
    .await;
    assert!(
        !down.status.success(),
        "a node that does not answer is an error"
    );

    // qemu-io: patterns written, read back, and an unaligned write that
    // qemu aligns itself (it honours the advertised 4 KiB minimum).
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0x5a 1000 3000",
            "-c",
            "write -P 0x17 4M 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1000",
            "-c",
            "read -P 0x5a 1000 3000",
            "-c",
            "read -P 0xab 4000 1044576",
            "-c",
            "read -P 0x17 4M 64k",
            &primary,
        ],
        CLIENT,
    )
    .await;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert_eq!(out.matches("read ").count(), 4, "{out}");

    // fio with its nbd engine, verifying every block it wrote, at QD 1 and 32.
    for depth in ["1", "32"] {
        let out = run_ok(
            "fio",
            &[
                &format!("--name=qd{depth}"),
                "--ioengine=nbd",
                &format!("--uri={primary}"),
                "--rw=randwrite",
                "--bs=4k",
                &format!("--iodepth={depth}"),
                "--size=8M",
                "--offset=16M",
                "--verify=crc32c",
                "--do_verify=1",
                // No verify-state file in the working directory.
                "--verify_state_save=0",
                "--end_fsync=1",
            ],
            CLIENT,
        )
        .await;
        assert!(out.contains("err= 0"), "fio QD{depth}:\n{out}");
    }

    // nbdcopy: an image in, flushed, and back out, byte for byte.
    let image = cluster.dir().join("in.img");
    let back = cluster.dir().join("out.img");
    let data: Vec<u8> = (0..16u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &data).unwrap();
    run_ok(
        "nbdcopy",
        &["--flush", image.to_str().unwrap(), &primary],
        CLIENT,
    )
    .await;
    run_ok("nbdcopy", &[&primary, back.to_str().unwrap()], CLIENT).await;
    let copied = std::fs::read(&back).unwrap();
    assert_eq!(copied.len() as u64, 64 << 20);
    assert!(
        copied[..data.len()] == data[..],
        "the image did not come back as written"
    );

    // Every replica's read-only export equals the primary's.
    cluster.wait_converged(CONVERGE).await;
    assert_replicas_identical(&cluster, 0).await;
    // A replica's export is read-only: qemu sees the flag and refuses to
    // open it for writing (the server's own EPERM: tests/nbd.rs).
    let refused = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 1 0 4k",
            &cluster.nodes[1].uri("vol0"),
        ],
        CLIENT,
    )
    .await;
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("Permission denied"),
        "{said}"
    );

    // SIGTERM: each node answers what it was asked, stops, and exits 0.
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_mid_write_restarts_with_every_acknowledged_write_on_all_three_nodes() {
    let mut cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let addr = nbd_addr(&cluster.nodes[0]);
    let acked = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_blocks(addr, 0..4000, true, Arc::clone(&acked)));
    wait_acked(&acked, 200, CLIENT).await;
    cluster.kill(0).await;
    let done = writer.await.unwrap();
    assert!(done.len() < 4000, "the writer saw the kill");

    // The offline tools read the crashed store as it is: it verifies (a
    // torn tail is not a fault: the next open cuts it), and stays intact.
    let store = cluster.nodes[0].data_dir.join("vol0/store");
    let store = store.to_str().unwrap();
    let verified = run_ok(nodes::WALSHIP, &["store", "verify", store], CLIENT).await;
    assert!(
        verified.contains("verified: the superblock and every WAL frame"),
        "{verified}"
    );
    let inspected = run_ok(nodes::WALSHIP, &["store", "inspect", store], CLIENT).await;
    assert!(
        inspected.contains("(not in use)")
            && inspected.contains(&format!("epoch history: epoch {} from 1", 1 << 20)),
        "{inspected}"
    );

    // The same config again: a new epoch, every acknowledged write kept.
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    let volume = cluster.primary_volume().await;
    // The control plane's epoch stays; the primary opens in a new term.
    assert_eq!(volume["assignment"]["epoch"], 1);
    assert_eq!(volume["assignment"]["incarnation"], 1);
    assert_eq!(volume["status"]["registry"]["epoch"], (1 << 20) + 1);
    cluster.wait_converged(CONVERGE).await;
    assert_blocks(addr, &done).await;
    assert_replicas_identical(&cluster, 0).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// sync_quorum, so writes commit (and FUA is acknowledged) while one
/// replica is away, which then needs a catch-up or a rebuild (under
/// sync_all nothing commits without it, and it returns to a zero gap);
/// streams with 32 KiB in flight, so that recovery lasts long enough for
/// the test to see it and kill it.
fn quorum_with_slow_streams(volume: VolumeOptions) -> VolumeOptions {
    VolumeOptions {
        commit_mode: "sync_quorum".into(),
        tuning: format!("{}inflight_bytes = 32768\n", volume.tuning),
        ..volume
    }
}

/// Replica node `victim` (1 or 2) is killed and misses 6000 writes
/// (acknowledged with FUA: sync_quorum commits them on the other two), comes
/// back, and is killed again once the primary reports it in `state`; 1000
/// more writes, then it comes back for good. Afterwards every acknowledged
/// write reads back, the three exports compare identical, and the primary's
/// recovery log shows `plan`.
async fn kill_a_replica_mid_recovery(
    volume: VolumeOptions,
    victim: usize,
    state: &str,
    plan: &str,
) -> Vec<String> {
    let mut cluster = NodeCluster::start(quorum_with_slow_streams(volume)).await;
    cluster.wait_converged(CONVERGE).await;
    let addr = nbd_addr(&cluster.nodes[0]);
    let acked = Arc::new(AtomicU64::new(0));
    let name = cluster.nodes[victim].name.clone();

    cluster.kill(victim).await;
    let gap = write_blocks(addr, 0..6000, true, Arc::clone(&acked)).await;
    assert_eq!(gap.len(), 6000);
    // Writes keep flowing while it returns, is killed mid-recovery, and
    // returns for good.
    let writer = tokio::spawn(write_blocks(addr, 6000..7000, true, Arc::clone(&acked)));
    cluster.spawn(victim);
    cluster.wait_replica_state(&name, state, CONVERGE).await;
    // A scrape while it recovers: its progress series are set.
    let admin_addr = cluster.nodes[0].admin_addr();
    let (_, during) = admin::request(&admin_addr, "/metrics", None)
        .await
        .expect("GET /metrics");
    cluster.kill(victim).await;
    let more = writer.await.unwrap();
    assert_eq!(more.len(), 1000);
    cluster.spawn(victim);
    cluster.wait_up(victim, Duration::from_secs(20)).await;
    cluster.wait_converged(CONVERGE).await;
    let mut client = Haggle::connect(addr).await.go("vol0").await;
    assert_eq!(
        client.call(CMD_FLUSH, 0, 0, 0, &[]).await,
        0,
        "FLUSH once in sync"
    );
    assert_blocks(addr, &[gap, more].concat()).await;
    assert_replicas_identical(&cluster, 0).await;
    // Two recoveries of that replica: the one the kill cut, and the last.
    let log = cluster.primary_volume().await["recent_recovery"].clone();
    let replica = format!("vol0/{name}");
    let plans = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["replica"] == replica.as_str())
        .filter(|e| e["event"].as_str().unwrap_or_default().starts_with(plan))
        .map(|e| 1 + e["repeats"].as_u64().unwrap_or(0))
        .sum::<u64>();
    assert!(plans >= 2, "{plans} {plan} for {replica}: {log:#}");
    // The same recoveries as Prometheus counters, by outcome (`plan` is a
    // prefix: plan_rebuild_full_base, plan_rebuild_snapshot_tail). The
    // counters are the volume's, all replicas together: at least the
    // victim's plans the log shows.
    let (_, text) = admin::request(&cluster.nodes[0].admin_addr(), "/metrics", None)
        .await
        .expect("GET /metrics");
    let counted = |event: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("walship_recovery_decisions_total{"))
            .filter(|l| l.contains("volume=\"vol0\"") && l.contains(&format!("event=\"{event}")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert!(
        counted(plan) >= plans,
        "{plan} counted {}, {plans} in the log:\n{text}",
        counted(plan)
    );
    let completed = counted("session_completed") + counted("rebuild_completed");
    assert!(completed >= 1, "no completed recovery counted:\n{text}");
    // Once every recovery ended, no series says there is anything to go
    // (the recorder keeps a series for good; a scrape clears the ended).
    let to_go = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("walship_replica_recovery_bytes_to_go{"))
            .filter(|l| !l.ends_with(" 0"))
            .map(str::to_owned)
            .collect()
    };
    if !to_go(&during).is_empty() {
        assert!(
            to_go(&text).is_empty(),
            "ended recoveries still to go: {:?}",
            to_go(&text)
        );
    }
    // The victim's plans, in order, with their proofs.
    log.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["replica"] == replica.as_str())
        .filter(|e| e["event"].as_str().unwrap_or_default().starts_with(plan))
        .map(|e| {
            format!(
                "{} {}",
                e["event"].as_str().unwrap(),
                e["detail"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_catch_up_comes_back_and_nothing_acknowledged_is_lost() {
    let plans =
        kill_a_replica_mid_recovery(VolumeOptions::default(), 1, "catching_up", "plan_catchup")
            .await;
    assert!(plans.len() >= 2, "{plans:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_rebuild_comes_back_and_nothing_acknowledged_is_lost() {
    let volume = VolumeOptions {
        // A hold of at most one segment and frequent checkpoints: the WAL
        // is recycled past a replica away for long, which then rebuilds.
        tuning: format!(
            "{}retention_max_bytes = 1048576\ncheckpoint_every_lsns = 500\n",
            VolumeOptions::default().tuning
        ),
        ..VolumeOptions::default()
    };
    let plans = kill_a_replica_mid_recovery(volume, 2, "rebuilding", "plan_rebuild").await;
    // What each rebuild moved (the source, snapshot and tail, is logged
    // beside it). The replica left empty-handed (nothing was written before
    // its first kill) gets it whole; cut by the second kill, it resumes
    // what it installed: below its cursor only what the map marked since,
    // above it what differs (or, killed before its install began, it is
    // compared or sent whole again).
    eprintln!("plans: {plans:#?}");
    let transfers: Vec<&String> = plans
        .iter()
        .filter(|p| {
            !p.starts_with("plan_rebuild_snapshot_tail") && !p.starts_with("plan_rebuild_full_base")
        })
        .collect();
    assert!(transfers.len() >= 2, "{plans:#?}");
    assert!(
        transfers[0].starts_with("plan_rebuild_whole replica_empty"),
        "{plans:#?}"
    );
    let later = [
        "plan_rebuild_resume ",
        "plan_rebuild_checksum ",
        "plan_rebuild_whole ",
    ];
    assert!(
        transfers[1..]
            .iter()
            .all(|p| later.iter().any(|kind| p.starts_with(kind))),
        "{plans:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_config_with_an_unknown_key_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    let text = "node = \"node1\"\nreplication = \"127.0.0.1:0\"\nnbd_port = 10809\n";
    std::fs::write(&config, text).unwrap();
    let data = dir.path().join("data");
    let args = [
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    let refused = run(nodes::WALSHIP, &args, CLIENT).await;
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("node.toml:3: unknown field `nbd_port`"),
        "{said}"
    );
}

/// POSTs an assignment of vol0 to node `i`, which must take it.
async fn assign(cluster: &NodeCluster, i: usize, epoch: u64, primary: usize, replicas: &[usize]) {
    let replicas: serde_json::Map<String, serde_json::Value> = replicas
        .iter()
        .map(|&r| {
            let node = &cluster.nodes[r];
            (
                node.name.clone(),
                format!("127.0.0.1:{}", node.replication).into(),
            )
        })
        .collect();
    let body = serde_json::json!({
        "epoch": epoch,
        "primary": cluster.nodes[primary].name,
        "commit_mode": "sync_all",
        "replicas": replicas,
    });
    let path = "/volumes/vol0/assignment";
    let (status, answer) =
        walship::node::admin::request(&cluster.nodes[i].admin_addr(), path, Some(body.to_string()))
            .await
            .unwrap();
    assert_eq!(status, 200, "{}: {answer}", cluster.nodes[i].name);
    if i == primary {
        // A new primary peers with its replicas before it serves.
        let serving = walship::actors::testing::within(Duration::from_secs(20), || async {
            let volume = cluster.status(i).await["volumes"][0].clone();
            volume["status"]["registry"].is_object().then_some(())
        })
        .await;
        assert!(serving.is_some(), "{:#}", cluster.status(i).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_by_assignment_keeps_every_acknowledged_write_and_the_old_primary_rejoins() {
    let mut cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let acked = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_blocks(
        nbd_addr(&cluster.nodes[0]),
        0..4000,
        true,
        Arc::clone(&acked),
    ));
    wait_acked(&acked, 200, CLIENT).await;
    cluster.kill(0).await;
    let before = writer.await.unwrap();

    // The operator's failover: epoch 2, node2 primary with node3. node3
    // first, so it fences epoch 1 before node2 opens as primary.
    assign(&cluster, 2, 2, 1, &[2]).await;
    assign(&cluster, 1, 2, 1, &[2]).await;
    let promoted = cluster.status(1).await["volumes"][0].clone();
    assert_eq!(promoted["role"], "primary");
    assert_eq!(promoted["export"], "read-write");
    assert_eq!(promoted["status"]["registry"]["epoch"], 2 << 20);
    // Every write node1 acknowledged is on node2 (A1), and node2 takes more.
    let node2 = nbd_addr(&cluster.nodes[1]);
    assert_blocks(node2, &before).await;
    let after = write_blocks(node2, 5000..5300, true, Arc::clone(&acked)).await;
    assert_eq!(after.len(), 300, "sync_all with node3 in sync");

    // node1 comes back as a replica from a config that says so (epoch 2),
    // and joins in epoch 3; whatever it held past the divergence point
    // (writes never acknowledged) is truncated before it catches up.
    let config = std::fs::read_to_string(&cluster.nodes[0].config).unwrap();
    let node1_addr = format!("node1 = \"127.0.0.1:{}\"", cluster.nodes[0].replication);
    let node2_addr = format!("node2 = \"127.0.0.1:{}\"", cluster.nodes[1].replication);
    let moved = config
        .replace("primary = \"node1\"", "epoch = 2\nprimary = \"node2\"")
        .replace(&node2_addr, &node1_addr);
    std::fs::write(&cluster.nodes[0].config, moved).unwrap();
    cluster.spawn(0);
    cluster.wait_up(0, Duration::from_secs(20)).await;
    assert_eq!(cluster.status(0).await["volumes"][0]["role"], "replica");
    for i in [2, 0, 1] {
        assign(&cluster, i, 3, 1, &[0, 2]).await;
    }
    cluster.wait_converged_on(1, CONVERGE).await;
    assert_blocks(node2, &[before, after].concat()).await;
    assert_replicas_identical(&cluster, 1).await;
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_budget_comes_from_the_config_and_changes_at_run_time_or_not_at_all() {
    let volume = VolumeOptions {
        tuning: format!(
            "{}\n[recovery]\nrate = \"64MiB\"\nfloor = \"8MiB\"\nmax_rebuilds = 2\nreceive_rate = \"48MiB\"\n",
            VolumeOptions::default().tuning
        ),
        ..VolumeOptions::default()
    };
    let cluster = NodeCluster::start_nodes(volume, 2).await;
    let admin = cluster.nodes[0].admin_addr();
    let show = |args: &'static [&'static str]| {
        let admin = admin.clone();
        async move {
            let mut all = vec!["recovery", "--admin", &admin];
            all.extend_from_slice(args);
            run(nodes::WALSHIP, &all, CLIENT).await
        }
    };
    let text = |output: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    };
    let shown = show(&[]).await;
    assert!(shown.status.success(), "{}", text(&shown));
    assert!(
        text(&shown).contains(
            "rate 64.0 MiB/s  floor 8.0 MiB/s per recovery  max rebuilds 2  receive rate 48.0 MiB/s"
        ),
        "{}",
        text(&shown)
    );
    // Refused, with why, and nothing of it applied.
    for (args, why) in [
        (&["--rate", "0"][..], "rate of 0"),
        (
            &["--max-rebuilds", "0", "--rate", "100MiB"][..],
            "max_rebuilds of 0",
        ),
        (&["--rate", "1MiB"][..], "below the floor"),
        (&["--receive-rate", "0"][..], "receive rate of 0"),
        (
            &["--receive-rate", "2MiB"][..],
            "receive rate of 2097152 B/s is below the floor",
        ),
        (&["--rate", "fast"][..], "not a size"),
    ] {
        let refused = show(args).await;
        assert!(!refused.status.success(), "{args:?}: {}", text(&refused));
        assert!(text(&refused).contains(why), "{args:?}: {}", text(&refused));
        let still = text(&show(&[]).await);
        assert!(
            still.contains("rate 64.0 MiB/s")
                && still.contains("max rebuilds 2")
                && still.contains("receive rate 48.0 MiB/s"),
            "{args:?} applied something: {still}"
        );
    }
    let changed = show(&[
        "--rate",
        "200MiB",
        "--max-rebuilds",
        "unlimited",
        "--receive-rate",
        "unlimited",
    ])
    .await;
    assert!(changed.status.success(), "{}", text(&changed));
    assert!(
        text(&changed).contains(
            "rate 200.0 MiB/s  floor 8.0 MiB/s per recovery  max rebuilds unlimited  receive rate unlimited"
        ),
        "{}",
        text(&changed)
    );
    let metrics = admin_get(&admin, "/metrics").await;
    assert!(
        metrics.contains("walship_recovery_rate_limit_bytes_per_second 209715200"),
        "{metrics}"
    );
}

async fn admin_get(admin: &str, path: &str) -> String {
    let (status, body) = walship::node::admin::request(admin, path, None)
        .await
        .unwrap();
    assert!(status.is_success(), "{path}: {status}: {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walship_verify_finds_a_flipped_region_exits_1_and_repair_makes_it_clean() {
    use std::os::unix::fs::FileExt;
    let cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let admin = cluster.nodes[0].admin_addr();
    let verify = |args: &'static [&'static str]| {
        let admin = admin.clone();
        async move {
            let mut all = vec!["verify", "--admin", &admin, "vol0"];
            all.extend_from_slice(args);
            run(nodes::WALSHIP, &all, CLIENT).await
        }
    };
    let out = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let clean = verify(&[]).await;
    assert!(clean.status.success(), "{}", out(&clean));
    assert!(
        out(&clean).contains("vol0/node2: clean at lsn"),
        "{}",
        out(&clean)
    );
    assert!(
        out(&clean).contains("vol0/node3: clean at lsn"),
        "{}",
        out(&clean)
    );
    // Bytes flipped in node2's extent, behind the running process: the
    // 64 KiB region at 1 MiB (blocks 256-271).
    let store = cluster.nodes[1].data_dir.join("vol0").join("store");
    let extent = std::fs::read_dir(&store)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("extent."))
        })
        .unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(extent)
        .unwrap();
    file.write_all_at(b"not what the primary holds", (1 << 20) + 17)
        .unwrap();
    let found = verify(&[]).await;
    assert_eq!(found.status.code(), Some(1), "{}", out(&found));
    assert!(
        out(&found).contains("vol0/node2: DIFFERS at lsn")
            && out(&found).contains("blocks 256-271"),
        "{}",
        out(&found)
    );
    assert!(out(&found).contains("vol0/node3: clean"), "{}", out(&found));
    let repairing = verify(&["--repair"]).await;
    assert_eq!(repairing.status.code(), Some(1), "{}", out(&repairing));
    assert!(
        out(&repairing).contains("(rebuilding what differs)"),
        "{}",
        out(&repairing)
    );
    cluster.wait_converged(CONVERGE).await;
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let again = verify(&[]).await;
        if again.status.success() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", out(&again));
        tokio::task::yield_now().await;
    }
    // On a replica's node: refused, saying where the primary is.
    let elsewhere = run(
        nodes::WALSHIP,
        &["verify", "--admin", &cluster.nodes[1].admin_addr(), "vol0"],
        CLIENT,
    )
    .await;
    assert!(!elsewhere.status.success());
    assert!(
        out(&elsewhere).contains("this node is a replica; its primary is node1"),
        "{}",
        out(&elsewhere)
    );
}

/// Whether node `i`'s primary logged `event` for `replica` lately.
async fn logged_lately(cluster: &NodeCluster, replica: &str, event: &str) -> bool {
    let log = cluster.primary_volume().await["recent_recovery"].clone();
    log.as_array().is_some_and(|log| {
        log.iter()
            .any(|e| e["replica"] == replica && e["event"] == event)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_slow_link_is_named_not_converging_by_the_node() {
    let volume = VolumeOptions {
        commit_mode: "best_effort".into(),
        tuning: format!(
            "{}converge_window_ms = 500\nconverge_within_ms = 4000\ninflight_bytes = 65536\n",
            VolumeOptions::default().tuning
        ),
        ..VolumeOptions::default()
    };
    let mut cluster = NodeCluster::start_nodes(volume, 2).await;
    cluster
        .wait_replica_state("node2", "in_sync", CONVERGE)
        .await;
    // From epoch 2 on node1 reaches node2 through a link that passes
    // 512 KiB/s.
    let node2 = format!("127.0.0.1:{}", cluster.nodes[1].replication);
    let relay = walship::actors::testing::Relay::start(&node2)
        .await
        .unwrap();
    relay.limit_rate(Some(512 << 10));
    let body = serde_json::json!({
        "epoch": 2,
        "primary": "node1",
        "commit_mode": "best_effort",
        "replicas": { "node2": relay.addr },
    });
    let admin = cluster.nodes[0].admin_addr();
    let (status, answer) =
        admin::request(&admin, "/volumes/vol0/assignment", Some(body.to_string()))
            .await
            .unwrap();
    assert_eq!(status, 200, "{answer}");
    cluster
        .wait_replica_state("node2", "in_sync", CONVERGE)
        .await;
    // A client writes 16 KiB every 5 ms (about 3 MiB/s) over NBD.
    let nbd: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.nodes[0].nbd)
        .parse()
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let writer = tokio::spawn(async move {
        let mut client = Haggle::connect(nbd).await.go("vol0").await;
        let data = vec![7u8; 16 << 10];
        let mut i = 0u64;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let offset = (i * (16 << 10)) % (64 << 20);
            assert_eq!(client.write(offset, &data, 0).await, 0);
            i += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let named = walship::actors::testing::within(CONVERGE, || async {
        logged_lately(&cluster, "vol0/node2", "not_converging")
            .await
            .then_some(())
    })
    .await;
    assert!(named.is_some(), "{:#}", cluster.primary_volume().await);
    // Where operators look: /metrics and walship status.
    let metrics = admin_get(&admin, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("walship_replica_not_converging{")
                && l.contains("vol0/node2")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    let table = run_ok(nodes::WALSHIP, &["status", "--admin", &admin], CLIENT).await;
    assert!(table.contains("NOT CONVERGING: "), "{table}");
    // What only grows is a counter (`_total`), and it grew.
    assert!(
        metrics.contains("# TYPE walship_replica_shipped_bytes_total counter"),
        "{metrics}"
    );
    let shipped = series(
        &metrics,
        "walship_replica_shipped_bytes_total",
        &["vol0/node2"],
    );
    assert!(shipped.is_some_and(|bytes| bytes > 0.0), "{metrics}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    relay.limit_rate(None);
    // Healed: node2 holds everything and the node says it converged.
    let converged = walship::actors::testing::within(CONVERGE, || async {
        let status = cluster.primary_volume().await["status"].clone();
        let sender = status["registry"]["senders"][0].clone();
        let caught_up = sender["state"] == "in_sync" && sender["flushed"] == status["head"];
        let said = logged_lately(&cluster, "vol0/node2", "converged").await;
        (caught_up && said).then_some(())
    })
    .await;
    assert!(converged.is_some(), "{:#}", cluster.primary_volume().await);
    cluster.stop_cleanly(&[0, 1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_volume_under_fio_verifies_clean_twenty_times_in_a_row() {
    let mut cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let admin = cluster.nodes[0].admin_addr();
    let head = || async {
        cluster.primary_volume().await["status"]["head"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = head().await;
    // fio writes the whole time (random 4 KiB at QD 4, a flush every 16
    // writes), bounded to five minutes; killed (only it) at the end.
    let mut fio = tokio::process::Command::new("fio")
        .args([
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", cluster.nodes[0].uri("vol0")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=32M",
            "--fsync=16",
            "--time_based",
            "--runtime=300",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("fio");
    let writing = walship::actors::testing::within(CONVERGE, || async {
        (head().await > before + 100).then_some(())
    })
    .await;
    assert!(writing.is_some(), "fio never wrote");
    let mut lsns = Vec::new();
    for round in 0..20 {
        let out = run(
            nodes::WALSHIP,
            &["verify", "--admin", &admin, "vol0"],
            CLIENT,
        )
        .await;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "round {round}: {text}");
        for replica in ["vol0/node2", "vol0/node3"] {
            let said = format!("{replica}: clean at lsn ");
            let at = text
                .split(&said)
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|lsn| {
                    lsn.trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u64>()
                        .ok()
                });
            let Some(at) = at else {
                panic!("round {round}: {replica} not clean: {text}");
            };
            lsns.push(at);
        }
        assert!(
            fio.try_wait().unwrap().is_none(),
            "fio stopped before round {round}"
        );
    }
    let after = head().await;
    fio.kill().await.unwrap();
    assert!(
        after > before + 1000,
        "writes flowed: head {before} -> {after}"
    );
    assert!(
        lsns.first() < lsns.last(),
        "compared at LSNs that moved with the writes: {lsns:?}"
    );
    cluster.stop_cleanly(&[0, 1, 2]).await;
}

/// The value of the series `name` whose labels include every one of
/// `labels` in a Prometheus text scrape.
fn series(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_fio_did_to_the_export() {
    let mut cluster = NodeCluster::start_nodes(VolumeOptions::default(), 1).await;
    let admin = cluster.nodes[0].admin_addr();
    let out = run_ok(
        "fio",
        &[
            "--name=counted",
            "--ioengine=nbd",
            &format!("--uri={}", cluster.nodes[0].uri("vol0")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=4",
            "--size=4M",
            "--end_fsync=1",
            "--output-format=json",
        ],
        CLIENT,
    )
    .await;
    // fio prints its JSON after whatever it says first.
    let json: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let write = &json["jobs"][0]["write"];
    let (ios, bytes) = (
        write["total_ios"].as_u64().unwrap(),
        write["io_bytes"].as_u64().unwrap(),
    );
    assert_eq!(bytes, 4 << 20, "{write}");
    let text = admin_get(&admin, "/metrics").await;
    let of = |name: &str, op: &str| {
        series(&text, name, &["volume=\"vol0\"", &format!("op=\"{op}\"")])
            .unwrap_or_else(|| panic!("no {name} for {op}:\n{text}"))
    };
    assert_eq!(of("walship_nbd_requests_total", "write"), ios as f64);
    assert_eq!(of("walship_nbd_bytes_total", "write"), bytes as f64);
    assert_eq!(of("walship_nbd_request_seconds_count", "write"), ios as f64);
    assert_eq!(of("walship_nbd_errors_total", "write"), 0.0);
    assert!(
        of("walship_nbd_requests_total", "flush") >= 1.0,
        "end_fsync"
    );
    assert_eq!(of("walship_nbd_requests_total", "read"), 0.0);
    // Every series says what it is.
    for typed in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = typed.split(' ').next().unwrap();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP line:\n{text}"
        );
    }
    cluster.stop_cleanly(&[0]).await;
}
