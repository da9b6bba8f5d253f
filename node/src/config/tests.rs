use super::*;

const NODE1: &str = r#"node = "node1"
data_dir = "/tmp/walship-node1"
replication = "127.0.0.1:7401"
admin = "127.0.0.1:9401"
nbd = "127.0.0.1:10809"

[[volume]]
name = "vol0"
size = "256MiB"
block_size = 4096
commit_mode = "sync_all"
primary = "node1"
replicas = { node2 = "127.0.0.1:7402", node3 = "127.0.0.1:7403" }
"#;

fn refusal(text: &str) -> (usize, String) {
    match parse("node.toml", text, None) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(ConfigError::Invalid { line, what, .. }) => (line, what),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_recovery_budget_is_checked_where_it_is_written() {
    let with = |table: &str| {
        NODE1.replace(
            "\n[[volume]]",
            &format!("\n[recovery]\n{table}\n[[volume]]"),
        )
    };
    let config = parse(
        "n",
        &with(
            "rate = \"200MiB/s\"\nfloor = \"16MiB\"\nmax_rebuilds = 2\nreceive_rate = \"100MiB\"",
        ),
        None,
    )
    .unwrap();
    assert_eq!(config.recovery.rate, Some(200 << 20));
    assert_eq!(config.recovery.receive_rate, Some(100 << 20));
    assert_eq!(config.recovery.floor, 16 << 20);
    assert_eq!(config.recovery.max_rebuilds, Some(2));
    let unlimited = parse("n", &with("rate = \"unlimited\""), None).unwrap();
    assert_eq!(unlimited.recovery.rate, None);
    assert_eq!(
        parse("n", NODE1, None).unwrap().recovery,
        walship_actors::RecoveryLimits::default()
    );
    for (table, why) in [
        ("rate = \"1MiB\"", "below the floor"),
        ("rate = 0", "rate of 0"),
        ("max_rebuilds = 0", "max_rebuilds of 0"),
        ("rate = \"fast\"", "not a size"),
        ("floor = \"1KiB\"", "recoveries would crawl"),
        ("receive_rate = 0", "receive rate of 0"),
        ("receive_rate = \"2MiB\"", "below the floor"),
    ] {
        let (line, what) = refusal(&with(table));
        assert_eq!(line, 7, "{table}: the [recovery] table");
        assert!(what.contains(why), "{table}: {what}");
    }
    let (_, what) = refusal(&with("speed = 1"));
    assert!(what.contains("unknown field"), "{what}");
}

#[test]
fn a_three_node_volume_parses() {
    let config = parse("node1.toml", NODE1, None).unwrap();
    assert_eq!(config.node, "node1");
    assert_eq!(config.cluster, "walship");
    assert_eq!(config.nbd, Some("127.0.0.1:10809".parse().unwrap()));
    let volume = &config.volumes[0];
    assert_eq!(volume.size, 256 << 20);
    assert_eq!(volume.blocks(), 65536);
    assert_eq!(volume.assignment.commit_mode, CommitMode::SyncAll);
    assert_eq!(volume.assignment.epoch, 1);
    assert_eq!(volume.assignment.replicas.len(), 2);
    assert_eq!((volume.line, volume.size_line), (8, 9));
    assert!(!volume.export_replicas);
}

#[test]
fn the_command_line_data_dir_wins() {
    let config = parse("n", NODE1, Some(Path::new("/elsewhere"))).unwrap();
    assert_eq!(config.data_dir, Path::new("/elsewhere"));
    let without = NODE1.replace("data_dir = \"/tmp/walship-node1\"\n", "");
    let (line, what) = refusal(&without);
    assert_eq!(line, 1);
    assert!(what.contains("--data-dir"), "{what}");
}

#[test]
fn an_unknown_key_is_refused_with_its_line() {
    // Inside the volume's table: the volume refuses it.
    let (line, what) = refusal(&format!("{NODE1}colour = \"blue\"\n"));
    assert_eq!(line, 14);
    assert!(what.contains("unknown field `colour`"), "{what}");
    let (line, what) = refusal(&NODE1.replace("nbd =", "nbd_listen ="));
    assert_eq!(line, 5);
    assert!(what.contains("nbd_listen"), "{what}");
}

#[test]
fn a_replica_on_the_primarys_own_node_is_refused() {
    let text = NODE1.replace("node3 = \"127.0.0.1:7403\"", "node1 = \"127.0.0.1:7401\"");
    let (line, what) = refusal(&text);
    assert_eq!(line, 13);
    assert!(what.contains("node1 is its primary"), "{what}");
}

#[test]
fn a_duplicate_volume_is_refused_at_its_second_line() {
    let volume = &NODE1[NODE1.find("[[volume]]").unwrap()..];
    let (line, what) = refusal(&format!("{NODE1}\n{volume}"));
    assert_eq!(line, 16);
    assert!(what.contains("vol0 is configured twice"), "{what}");
}

#[test]
fn bad_values_are_refused_with_their_line() {
    for (from, to, line, says) in [
        ("\"256MiB\"", "\"256MB\"", 9, "size must be"),
        ("\"256MiB\"", "1000", 9, "size must be"),
        (
            "block_size = 4096",
            "block_size = 512",
            10,
            "block_size must be 4096",
        ),
        ("\"sync_all\"", "\"sync_most\"", 11, "commit_mode"),
        (
            "\"127.0.0.1:7401\"\nadmin",
            "\"localhost\"\nadmin",
            3,
            "replication",
        ),
        ("\"127.0.0.1:7402\"", "\"nowhere\"", 13, "replica node2"),
        (
            "primary = \"node1\"",
            "primary = \"node4\"",
            8,
            "neither its primary",
        ),
        ("name = \"vol0\"", "name = \"a/b\"", 8, "volume name"),
        // The assignment's own rules (Assignment::validate), each at its key.
        (
            "primary = \"node1\"",
            "epoch = 0\nprimary = \"node1\"",
            12,
            "epochs start at 1",
        ),
        (
            "primary = \"node1\"",
            "primary = \"a/b\"",
            12,
            "primary \"a/b\"",
        ),
        (
            "node2 = \"127.0.0.1:7402\"",
            "node1 = \"127.0.0.1:7402\"",
            13,
            "node1 is its primary",
        ),
    ] {
        assert!(NODE1.contains(from), "{from}");
        let (got, what) = refusal(&NODE1.replacen(from, to, 1));
        assert_eq!(got, line, "{to}: {what}");
        assert!(what.contains(says), "{to}: {what}");
    }
}

#[test]
fn tuning_reaches_the_runtime() {
    let text = format!(
        "{NODE1}\n[tuning]\nbarrier_timeout_ms = 250\npeer_timeout_ms = 700\n\
         network_retry_max_ms = 900\nsegment_bytes = 1048576\nretention_max_bytes = 4096\n\
         inflight_bytes = 32768\ncheckpoint_every_lsns = 500\ndelta_rebuilds = false\n\
         converge_window_ms = 2000\nconverge_within_ms = 0\nconverge_boost = false\n\
         write_backpressure_percent = 80\nmax_write_delay_ms = 7\n"
    );
    // [tuning] after the volume's table would belong to it: put it first.
    let (head, volume) = text.split_at(text.find("[[volume]]").unwrap());
    let (volume, tuning) = volume.split_at(volume.find("[tuning]").unwrap());
    let config = parse("n", &format!("{head}{tuning}\n{volume}"), None).unwrap();
    assert_eq!(config.tuning.segment_bytes, 1 << 20);
    let tuning = config.tuning.tuning();
    assert_eq!(tuning.barrier_timeout_ticks, 25);
    assert_eq!(tuning.peer_timeout, Duration::from_millis(700));
    assert_eq!(tuning.network_retry.max, Duration::from_millis(900));
    assert_eq!(tuning.retention_max_bytes, Some(4096));
    assert_eq!(tuning.max_inflight_bytes, 32768);
    assert_eq!(tuning.batch_bytes, 32768);
    assert_eq!(tuning.image_chunk_bytes, 32768);
    assert_eq!(tuning.checkpoint_every_lsns, 500);
    assert!(!tuning.delta_rebuilds);
    assert!(
        TuningSpec::default().tuning().delta_rebuilds,
        "on by default"
    );
    let policy = tuning.convergence_policy();
    assert_eq!(policy.window_ticks, 200);
    assert_eq!(policy.converge_within_ticks, None);
    assert!(!policy.boost);
    assert_eq!(policy.backpressure_percent, Some(80));
    assert_eq!(policy.caught_up_bytes, 2 * 32768);
    assert_eq!(tuning.max_write_delay, Duration::from_millis(7));
    let defaults = TuningSpec::default().tuning().convergence_policy();
    assert_eq!(defaults.backpressure_percent, None, "opt-in");
    assert!(defaults.boost);
    // What the types let through and the meaning does not.
    for (bad, says) in [
        ("write_backpressure_percent = 101", "a percentage"),
        ("converge_window_ms = 0", "must be longer"),
        (
            "write_backpressure_percent = 50\nmax_write_delay_ms = 0",
            "no write could be held",
        ),
    ] {
        let (head, volume) = NODE1.split_at(NODE1.find("[[volume]]").unwrap());
        let (_, what) = refusal(&format!("{head}[tuning]\n{bad}\n{volume}"));
        assert!(what.contains(says), "{bad}: {what}");
    }
}

#[test]
fn an_impossible_quorum_is_refused_at_its_mode() {
    let text = NODE1
        .replace("\"sync_all\"", "\"sync_quorum\"")
        .replace(", node3 = \"127.0.0.1:7403\"", "");
    let (line, what) = refusal(&text);
    assert_eq!(line, 11);
    assert!(what.contains("quorum"), "{what}");
}

#[test]
fn sizes_take_binary_units() {
    assert_eq!(parse_size("256MiB"), Some(256 << 20));
    assert_eq!(parse_size("1 GiB"), Some(1 << 30));
    assert_eq!(parse_size("4096"), Some(4096));
    assert_eq!(parse_size("12MB"), None);
    assert_eq!(parse_size("MiB"), None);
}
