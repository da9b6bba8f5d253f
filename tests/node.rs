//! Nodes as processes (`walship serve`), with real NBD clients: qemu-io,
//! fio, nbdcopy, qemu-img. Three nodes on loopback: node1 primary of vol0
//! (sync_all), node2 and node3 its replicas, exporting it read-only.

#[path = "support/nodes.rs"]
mod nodes;
mod support;

use nodes::{run, run_ok, NodeCluster, VolumeOptions};
use std::time::Duration;

const CLIENT: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clients_write_through_the_primary_and_every_replica_compares_identical() {
    let mut cluster = NodeCluster::start(VolumeOptions::default()).await;
    cluster.wait_converged(CONVERGE).await;
    let primary = cluster.nodes[0].uri("vol0");

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
    for replica in 1..3 {
        let uri = cluster.nodes[replica].uri("vol0");
        let out = run_ok(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &primary, &uri],
            CLIENT,
        )
        .await;
        assert!(out.contains("Images are identical"), "{uri}: {out}");
    }
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
    for i in [0, 1, 2] {
        let status = cluster.terminate(i, Duration::from_secs(20)).await;
        assert!(
            status.success(),
            "node{} exited with {status}:\n{}",
            i + 1,
            cluster.log(i)
        );
    }
}
