//! `walship store inspect|verify DIR`: a store directory read without
//! changing it (no lock taken, nothing truncated or removed).

use std::fmt::Write as _;
use std::path::Path;
use walship::io::{inspect, Inspection, BLOCK_SIZE};

/// Prints what the store in `dir` holds. With `verify`, fails when
/// anything is wrong (a corrupt frame, a bad superblock, a WAL that does
/// not reach the checkpoint...).
pub fn run(dir: &Path, verify: bool, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let report = inspect(dir);
    out.write_all(render(&report).as_bytes())?;
    if verify {
        if !report.problems.is_empty() {
            anyhow::bail!(
                "{}: {} problem(s) (above)",
                dir.display(),
                report.problems.len()
            );
        }
        writeln!(
            out,
            "verified: the superblock and every WAL frame ({} frames) check out",
            report.head - report.tail
        )?;
    }
    Ok(())
}

fn render(report: &Inspection) -> String {
    let mut out = String::new();
    let in_use = if report.in_use {
        "in use by a running process"
    } else {
        "not in use"
    };
    let _ = writeln!(out, "store {} ({in_use})", report.dir.display());
    match &report.superblock {
        Some(sb) => {
            let uuid: String = sb.uuid.iter().map(|b| format!("{b:02x}")).collect();
            let _ = writeln!(
                out,
                "superblock: uuid {uuid}, {} blocks ({} MiB), checkpoint {}, epoch {}, generation {}",
                sb.block_count,
                (sb.block_count * BLOCK_SIZE as u64) >> 20,
                sb.checkpoint,
                sb.epoch,
                sb.generation
            );
        }
        None => {
            let _ = writeln!(out, "superblock: unreadable");
        }
    }
    if let Some((path, len)) = &report.extent {
        let _ = writeln!(out, "extent: {} ({len} bytes)", path.display());
    }
    let [writes, trims, barriers] = report.frames_by_kind;
    let _ = writeln!(
        out,
        "wal: tail {}, head {}: {} frames ({writes} writes, {trims} trims, {barriers} barriers) in {} segments",
        report.tail,
        report.head,
        report.head - report.tail,
        report.segments.len()
    );
    let history: Vec<String> = report
        .epochs
        .iter()
        .map(|e| format!("epoch {} from {}", e.epoch, e.first_lsn))
        .collect();
    let _ = writeln!(
        out,
        "epoch history: {}",
        if history.is_empty() {
            "empty".to_owned()
        } else {
            history.join(", ")
        }
    );
    match &report.torn {
        Some(torn) => {
            let _ = writeln!(
                out,
                "torn tail: {} from offset {}: {} bytes an open would cut",
                torn.path.display(),
                torn.offset,
                torn.bytes
            );
        }
        None => {
            let _ = writeln!(out, "torn tail: none");
        }
    }
    if !report.other_generations.is_empty() {
        let _ = writeln!(
            out,
            "segments of older generations (an open removes them): {}",
            report.other_generations.join(", ")
        );
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    if report.problems.is_empty() {
        let _ = writeln!(out, "problems: none");
    } else {
        let _ = writeln!(out, "problems:");
        for problem in &report.problems {
            let _ = writeln!(out, "  - {problem}");
        }
    }
    out
}
