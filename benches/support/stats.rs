//! Statistics the alternating benchmarks share (`#[path]`-included by
//! `benches/system.rs` and `io/benches/streams.rs`).

/// The median; for an even count, the mean of the middle two (the upper
/// one alone would favour whichever side had one fast outlier).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}
