//! What clients do to each export, for `/metrics`: requests, bytes, errors
//! and latency per volume and op. Each connection registers its handles
//! once; a request then costs a few atomic adds and a histogram sample.

use super::proto::{CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
use metrics::{Counter, Histogram};
use std::time::Duration;

/// The ops counted, by their `op` label.
const OPS: [(u16, &str); 5] = [
    (CMD_READ, "read"),
    (CMD_WRITE, "write"),
    (CMD_FLUSH, "flush"),
    (CMD_TRIM, "trim"),
    (CMD_WRITE_ZEROES, "write_zeroes"),
];

/// One op's series.
struct Op {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    seconds: Histogram,
}

/// One connection's handles on its export's series.
pub(super) struct IoMetrics {
    ops: Vec<(u16, Op)>,
}

impl IoMetrics {
    pub(super) fn new(volume: &str) -> Self {
        let ops = OPS
            .iter()
            .map(|&(kind, op)| {
                let labels = [("volume", volume.to_owned()), ("op", op.to_owned())];
                let series = Op {
                    requests: metrics::counter!("walship_nbd_requests_total", &labels),
                    bytes: metrics::counter!("walship_nbd_bytes_total", &labels),
                    errors: metrics::counter!("walship_nbd_errors_total", &labels),
                    seconds: metrics::histogram!("walship_nbd_request_seconds", &labels),
                };
                (kind, series)
            })
            .collect();
        Self { ops }
    }

    /// Counts one request of `kind` for `length` bytes, answered `ok` or
    /// not, after `took`. Commands outside [`OPS`] are not counted.
    pub(super) fn record(&self, kind: u16, length: u32, ok: bool, took: Duration) {
        let Some((_, op)) = self.ops.iter().find(|(k, _)| *k == kind) else {
            return;
        };
        op.requests.increment(1);
        op.seconds.record(took.as_secs_f64());
        if ok {
            if kind != CMD_FLUSH {
                op.bytes.increment(u64::from(length));
            }
        } else {
            op.errors.increment(1);
        }
    }
}

/// The `# HELP` lines of the export's series.
pub(crate) fn describe() {
    metrics::describe_counter!(
        "walship_nbd_requests_total",
        "NBD requests answered, per volume and op (read, write, flush, trim, write_zeroes)"
    );
    metrics::describe_counter!(
        "walship_nbd_bytes_total",
        metrics::Unit::Bytes,
        "Bytes NBD clients read, wrote, trimmed or zeroed, per volume and op (requests answered without error)"
    );
    metrics::describe_counter!(
        "walship_nbd_errors_total",
        "NBD requests answered with an error, per volume and op"
    );
    metrics::describe_histogram!(
        "walship_nbd_request_seconds",
        metrics::Unit::Seconds,
        "Time from an NBD request read to its answer ready, per volume and op"
    );
}
