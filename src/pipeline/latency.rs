//! The commit→acknowledgement latency histogram each worker keeps: fixed size, no
//! allocation while recording.

/// Sub-buckets per power of two: values are kept to within 1/32 (about 3%).
const SUB_BUCKET_BITS: u32 = 5;

pub(super) const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;

/// Values are exact below this, then log-linear.
const LINEAR_LIMIT: u64 = 2 * SUB_BUCKETS;

/// Enough buckets for any u64.
pub(super) const BUCKETS: usize =
    (LINEAR_LIMIT + (64 - SUB_BUCKET_BITS as u64 - 1) * SUB_BUCKETS) as usize;

/// A fixed-size log-linear histogram of microseconds (as HdrHistogram with 5 bits of
/// precision): recording is a few integer operations on an array allocated once, with no
/// allocation per event, so it can run for every event on the hot path.
#[derive(Clone)]
pub struct LatencyHistogram {
    counts: Box<[u64; BUCKETS]>,
    count: u64,
    max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            counts: Box::new([0; BUCKETS]),
            count: 0,
            max: 0,
        }
    }

    /// Records one latency; negative values (clock steps) count as zero.
    pub fn record(&mut self, micros: i64) {
        let value = micros.max(0) as u64;
        self.counts[bucket_of(value)] += 1;
        self.count += 1;
        self.max = self.max.max(value);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q` (0..=1): the middle of its bucket, never above the maximum
    /// recorded; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_range(index);
                return (low + (high - low) / 2).min(self.max);
            }
        }
        self.max
    }
}

pub(super) fn bucket_of(value: u64) -> usize {
    if value < LINEAR_LIMIT {
        return value as usize;
    }
    let exponent = 63 - value.leading_zeros(); // > SUB_BUCKET_BITS
    let shift = exponent - SUB_BUCKET_BITS;
    let sub = (value >> shift) - SUB_BUCKETS; // 0..SUB_BUCKETS
    (LINEAR_LIMIT + u64::from(shift - 1) * SUB_BUCKETS + sub) as usize
}

/// The values `[low, high]` that land in bucket `index`.
pub(super) fn bucket_range(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < LINEAR_LIMIT {
        return (index, index);
    }
    let shift = (index - LINEAR_LIMIT) / SUB_BUCKETS + 1;
    let sub = (index - LINEAR_LIMIT) % SUB_BUCKETS;
    let low = (SUB_BUCKETS + sub) << shift;
    (low, low + ((1u64 << shift) - 1))
}
