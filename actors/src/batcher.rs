//! The dynamic batcher: pure queueing logic with Triton's knobs, no clocks and no IO.
//!
//! Rules, in order, each time [`Batcher::pop_ready`] is asked at `now`:
//!
//! Sizes count rows: a request may carry several ([`Pending::rows`], a partition's wave), and a
//! batch takes whole requests in arrival order, never more rows than the size it aims for, but
//! always at least one request (a request larger than `max_batch_size` runs alone; the router
//! never sends one).
//!
//! 1. Requests whose caller has gone away ([`Pending::is_cancelled`]) leave the queue when a
//!    batch is due by the rules below (they count until then), and are handed back as
//!    cancelled; they never reach the model. The batch is then decided again without them.
//! 2. If `max_batch_size` rows wait, run up to that many (and if that batch left short a request
//!    that did not fit, run that one next without waiting for its own batch to fill).
//! 3. If the largest preferred batch size (or `max_batch_size` when none is set) can be formed,
//!    run up to the largest preferred size that fits.
//! 4. If the queue's start time ([`Batcher::deadline`]) has come, run everything queued (up to
//!    `max_batch_size`). The start time is the earlier of
//!    - the oldest request without a due time plus `max_queue_delay` (Triton's fixed delay): no
//!      such request waits longer than the delay before its batch starts;
//!    - the earliest due time ([`Pending::due`], its event's deadline) minus the time the batch
//!      is at risk from: its own expected compute time, that of the [`AHEAD`] full batches that
//!      may run before it (the worker's one on the device and the next), and [`DUE_MARGIN`].
//!      The expected compute per batch size is learned from the batches run ([`ComputeCost`]).
//!      Until then the batch grows: requests with time to spare wait for batch-mates instead of
//!      running in small batches. Before the batcher has learned anything, every request keeps
//!      the fixed delay (a due time is no use without an expected compute time).
//! 5. Otherwise wait until [`Batcher::deadline`] or the next arrival.
//!
//! With `max_queue_delay = 0` the batcher runs whatever has accumulated while the previous batch
//! ran ("opportunistic" batching); with `max_batch_size = 1` batching is off.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::model::BatchPolicy;

/// Time kept in hand before a due time beyond the expected compute: waking the worker, answering
/// the caller, and an estimate's error.
pub const DUE_MARGIN: Duration = Duration::from_millis(1);

/// Batches that may run on a worker before a batch formed now: the one on the device and a full
/// one handed to it meanwhile (the worker's two in flight).
pub const AHEAD: u32 = 2;

/// What the batcher needs to know about a queued request.
pub trait Pending {
    /// When the request entered the queue (the router stamps it before sending).
    fn enqueued_at(&self) -> Instant;
    /// True when nobody waits for the answer any more.
    fn is_cancelled(&self) -> bool;
    /// Rows it carries.
    fn rows(&self) -> usize {
        1
    }
    /// When its answer is due (its event's deadline), if it has one: such a request waits for
    /// batch-mates while its batch can still be computed in time (rule 4), not `max_queue_delay`.
    fn due(&self) -> Option<Instant> {
        None
    }
}

/// Expected compute time of a batch by its rows, learned online: a moving average of the
/// `forward` times seen per size class (rows rounded up to a power of two).
#[derive(Debug, Clone, Default)]
pub struct ComputeCost {
    /// Microseconds, by class (index = log2 of the rows rounded up); `None`: none seen yet.
    classes: Vec<Option<f64>>,
}

impl ComputeCost {
    /// Weight of the newest observation in its class's average.
    const WEIGHT: f64 = 0.2;

    fn class(rows: usize) -> usize {
        rows.max(1).next_power_of_two().trailing_zeros() as usize
    }

    /// A batch of `rows` rows took `took`.
    pub fn learn(&mut self, rows: usize, took: Duration) {
        let c = Self::class(rows);
        if self.classes.len() <= c {
            self.classes.resize(c + 1, None);
        }
        let us = took.as_secs_f64() * 1e6;
        let avg = self.classes[c].get_or_insert(us);
        *avg += Self::WEIGHT * (us - *avg);
    }

    /// The expected compute time of a batch of `rows` rows: its class's average; for a class not
    /// seen yet, the nearest larger class's (an upper bound: more rows cost no less), else the
    /// largest smaller class's scaled up in proportion to the rows; `None` before any batch ran.
    pub fn expected(&self, rows: usize) -> Option<Duration> {
        let c = Self::class(rows);
        let us = self.classes.iter().skip(c).find_map(|v| *v).or_else(|| {
            let (below, us) =
                self.classes.iter().take(c).enumerate().rev().find_map(|(i, v)| Some((i, (*v)?)))?;
            Some(us * rows as f64 / (1u64 << below) as f64)
        });
        us.map(|us| Duration::from_micros(us.round() as u64))
    }
}

#[derive(Debug)]
pub struct Batcher<T> {
    policy: BatchPolicy,
    queue: VecDeque<T>,
    /// Rows queued.
    rows: usize,
    /// A full batch left its next request behind (it did not fit): that one runs next, at once,
    /// instead of waiting for a batch of its own to fill.
    spilled: bool,
    /// When the oldest queued request without a due time arrived, and the earliest due time
    /// queued: kept on arrival, recomputed when requests leave.
    oldest_undue: Option<Instant>,
    earliest_due: Option<Instant>,
    cost: ComputeCost,
}

impl<T: Pending> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self {
            policy,
            queue: VecDeque::new(),
            rows: 0,
            spilled: false,
            oldest_undue: None,
            earliest_due: None,
            cost: ComputeCost::default(),
        }
    }

    pub fn policy(&self) -> &BatchPolicy {
        &self.policy
    }

    pub fn push(&mut self, item: T) {
        self.rows += item.rows();
        (self.oldest_undue, self.earliest_due) = noted((self.oldest_undue, self.earliest_due), &item);
        self.queue.push_back(item);
    }

    /// Requests left the queue: the oldest arrival without a due time and the earliest due time
    /// of those still queued.
    fn requests_left(&mut self) {
        (self.oldest_undue, self.earliest_due) = self.queue.iter().fold((None, None), noted);
    }

    /// Requests queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Rows queued.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A batch of `rows` rows took `took` to compute (what [`Batcher::deadline`] expects of the
    /// next ones).
    pub fn learn(&mut self, rows: usize, took: Duration) {
        self.cost.learn(rows, took);
    }

    /// When the queued requests' batch must start (rule 4), if any is queued.
    pub fn deadline(&self) -> Option<Instant> {
        let max = self.policy.max_batch_size;
        let (Some(own), Some(full)) = (self.cost.expected(self.rows.min(max)), self.cost.expected(max))
        else {
            // Nothing learned yet: the fixed delay for every request.
            return self.queue.front().map(|r| r.enqueued_at() + self.policy.max_queue_delay);
        };
        let fixed = self.oldest_undue.map(|t| t + self.policy.max_queue_delay);
        let at_risk = own + AHEAD * full + DUE_MARGIN;
        // (Before the clock's origin: at once.)
        let front = || self.queue.front().map_or_else(Instant::now, Pending::enqueued_at);
        let grown = self.earliest_due.map(|d| d.checked_sub(at_risk).unwrap_or_else(front));
        match (fixed, grown) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next batch to run at `now`, if the rules above say one should run. Cancelled requests
    /// found on the way are moved to `cancelled`.
    pub fn pop_ready(&mut self, now: Instant, cancelled: &mut Vec<T>) -> Option<Vec<T>> {
        self.pop(Some(now), cancelled)
    }

    /// The next batch only if `max_batch_size` rows wait (rules 1 and 2): what a worker hands
    /// its device while the device still runs the previous batch. The other rules wait for the
    /// device to be free, so that the rows arriving meanwhile join the batch (as Triton forms a
    /// batch when a model instance is free).
    pub fn pop_full(&mut self, cancelled: &mut Vec<T>) -> Option<Vec<T>> {
        self.pop(None, cancelled)
    }

    fn pop(&mut self, now: Option<Instant>, cancelled: &mut Vec<T>) -> Option<Vec<T>> {
        // Whether a batch is due is first asked with the cancelled requests counted (looking for
        // them on every poll would cost a pass over the queue per arrival); once one is, they
        // leave, and it is asked again.
        self.due_rows(now)?;
        if self.queue.iter().any(Pending::is_cancelled) {
            let (gone, live): (VecDeque<T>, VecDeque<T>) =
                std::mem::take(&mut self.queue).into_iter().partition(Pending::is_cancelled);
            self.rows -= gone.iter().map(Pending::rows).sum::<usize>();
            cancelled.extend(gone);
            self.queue = live;
            self.requests_left();
        }
        let n = self.due_rows(now)?;
        // Whole requests up to `n` rows, at least one.
        let (mut take, mut rows) = (0, 0);
        for item in &self.queue {
            if take > 0 && rows + item.rows() > n {
                break;
            }
            rows += item.rows();
            take += 1;
        }
        self.rows -= rows;
        self.spilled = n == self.policy.max_batch_size && rows < n && take < self.queue.len();
        let batch = self.queue.drain(..take).collect();
        self.requests_left();
        Some(batch)
    }

    /// The rows of the batch the rules say should run at `now` (`None`: only a full batch), if
    /// one should.
    fn due_rows(&self, now: Option<Instant>) -> Option<usize> {
        let len = self.rows;
        let max = self.policy.max_batch_size;
        match now {
            _ if len >= max => Some(max),
            None => None,
            Some(_) if self.spilled && len > 0 => Some(max),
            Some(_) if len >= self.policy.target() && len > 0 => Some(
                self.policy.preferred_batch_sizes.iter().rev().copied().find(|&p| p <= len).unwrap_or(len),
            ),
            Some(now) if self.deadline().is_some_and(|d| now >= d) => Some(len),
            Some(_) => None,
        }
    }

    /// Everything still queued, in arrival order (used when a worker shuts down).
    pub fn drain_all(&mut self) -> impl Iterator<Item = T> + '_ {
        self.rows = 0;
        self.spilled = false;
        (self.oldest_undue, self.earliest_due) = (None, None);
        self.queue.drain(..)
    }
}

/// (oldest arrival without a due time, earliest due time), with `r` counted.
fn noted(
    (oldest_undue, earliest_due): (Option<Instant>, Option<Instant>),
    r: &impl Pending,
) -> (Option<Instant>, Option<Instant>) {
    match r.due() {
        Some(d) => (oldest_undue, Some(earliest_due.map_or(d, |e| e.min(d)))),
        None => (oldest_undue.or(Some(r.enqueued_at())), earliest_due),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::HashSet;
    use std::rc::Rc;
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug)]
    struct Req {
        id: usize,
        at: Instant,
        cancelled: Rc<Cell<bool>>,
        rows: usize,
        due: Option<Instant>,
    }

    impl Pending for Req {
        fn enqueued_at(&self) -> Instant {
            self.at
        }
        fn is_cancelled(&self) -> bool {
            self.cancelled.get()
        }
        fn rows(&self) -> usize {
            self.rows
        }
        fn due(&self) -> Option<Instant> {
            self.due
        }
    }

    fn policy(max: usize, preferred: &[usize], delay_us: u64) -> BatchPolicy {
        BatchPolicy {
            max_batch_size: max,
            preferred_batch_sizes: preferred.to_vec(),
            max_queue_delay: Duration::from_micros(delay_us),
        }
    }

    fn req(id: usize, at: Instant) -> Req {
        Req { id, at, cancelled: Rc::new(Cell::new(false)), rows: 1, due: None }
    }

    fn ids(batch: &[Req]) -> Vec<usize> {
        batch.iter().map(|r| r.id).collect()
    }

    #[test]
    fn waits_for_the_delay_then_runs_everything() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(8, &[], 100));
        b.push(req(0, t0));
        b.push(req(1, t0 + Duration::from_micros(10)));
        let mut gone = Vec::new();
        assert!(b.pop_ready(t0 + Duration::from_micros(99), &mut gone).is_none());
        assert_eq!(b.deadline(), Some(t0 + Duration::from_micros(100)));
        let batch = b.pop_ready(t0 + Duration::from_micros(100), &mut gone).unwrap();
        assert_eq!(ids(&batch), vec![0, 1]);
        assert!(b.is_empty() && gone.is_empty());
    }

    #[test]
    fn full_batches_run_at_once_and_preferred_sizes_win() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(8, &[2, 4], 1_000_000));
        let mut gone = Vec::new();
        for i in 0..3 {
            b.push(req(i, t0));
        }
        assert!(b.pop_ready(t0, &mut gone).is_none(), "3 < largest preferred size 4");
        for i in 3..7 {
            b.push(req(i, t0));
        }
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![0, 1, 2, 3]);
        assert!(b.pop_ready(t0, &mut gone).is_none(), "3 left, waits for the delay");
        for i in 7..20 {
            b.push(req(i, t0));
        }
        assert_eq!(b.pop_ready(t0, &mut gone).unwrap().len(), 8, "max_batch_size reached");
    }

    #[test]
    fn unbatched_policy_runs_one_at_a_time_without_waiting() {
        let t0 = Instant::now();
        let mut b = Batcher::new(BatchPolicy::unbatched());
        b.push(req(0, t0));
        b.push(req(1, t0));
        let mut gone = Vec::new();
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![0]);
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![1]);
    }

    #[test]
    fn cancelled_requests_never_reach_a_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, &[], 0));
        let r = req(0, t0);
        r.cancelled.set(true);
        b.push(r);
        b.push(req(1, t0));
        let mut gone = Vec::new();
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![1]);
        assert_eq!(ids(&gone), vec![0]);
    }

    #[test]
    fn while_the_device_is_busy_only_a_full_batch_is_taken() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(8, &[4], 0));
        let mut gone = Vec::new();
        for i in 0..3 {
            b.push(req(i, t0));
        }
        assert!(b.pop_full(&mut gone).is_none(), "3 rows are due (no delay) but fill no batch");
        b.push(req(3, t0));
        assert!(b.pop_full(&mut gone).is_none(), "a preferred size grows on while the device is busy");
        for i in 4..9 {
            b.push(req(i, t0));
        }
        assert_eq!(ids(&b.pop_full(&mut gone).unwrap()), (0..8).collect::<Vec<_>>(), "max_batch_size");
        assert!(b.pop_full(&mut gone).is_none());
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![8], "due once the device is free");
    }

    #[test]
    fn a_request_left_out_of_a_full_batch_runs_next_without_waiting() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(512, &[], 1_000_000));
        b.push(Req { rows: 20, ..req(0, t0) });
        b.push(Req { rows: 500, ..req(1, t0) });
        let mut gone = Vec::new();
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![0], "520 rows: the first 20 alone fit");
        assert_eq!(ids(&b.pop_ready(t0, &mut gone).unwrap()), vec![1], "the 500 left out run at once");
        assert!(b.is_empty() && b.rows() == 0);
        // One-row requests past a full batch wait for their own, as before.
        for i in 0..515 {
            b.push(req(i, t0));
        }
        assert_eq!(b.pop_ready(t0, &mut gone).unwrap().len(), 512);
        assert!(b.pop_ready(t0, &mut gone).is_none(), "3 rows wait for the delay");
    }

    #[test]
    fn a_request_with_time_to_spare_grows_its_batch_until_its_due_time_is_at_risk() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(policy(8, &[], 1_000));
        b.push(Req { due: Some(t0 + ms(20)), ..req(0, t0) });
        assert_eq!(b.deadline(), Some(t0 + ms(1)), "nothing learned yet: the fixed delay");
        // Batches of up to 8 rows took 2 ms: a batch is at risk its own 2 ms, 2 x 2 ms for the
        // two full batches that may run before it, and the margin before its due time.
        b.learn(8, ms(2));
        assert_eq!(b.deadline(), Some(t0 + ms(20 - 2 - 4) - DUE_MARGIN));
        let mut gone = Vec::new();
        assert!(b.pop_ready(t0 + ms(2), &mut gone).is_none(), "past max_queue_delay, but time to spare");
        b.push(Req { due: Some(t0 + ms(30)), ..req(1, t0 + ms(3)) });
        b.push(Req { due: Some(t0 + ms(12)), ..req(2, t0 + ms(4)) });
        assert_eq!(b.deadline(), Some(t0 + ms(12 - 2 - 4) - DUE_MARGIN), "the earliest due time rules");
        assert!(b.pop_ready(t0 + ms(4), &mut gone).is_none());
        assert_eq!(ids(&b.pop_ready(t0 + ms(5), &mut gone).unwrap()), vec![0, 1, 2], "all in one batch");
        // A request without a due time keeps the fixed delay, and its batch-mates go with it.
        b.push(Req { due: Some(t0 + ms(40)), ..req(3, t0 + ms(10)) });
        b.push(req(4, t0 + ms(11)));
        assert_eq!(b.deadline(), Some(t0 + ms(12)));
        assert_eq!(ids(&b.pop_ready(t0 + ms(12), &mut gone).unwrap()), vec![3, 4]);
        // Already too late: at once.
        b.push(Req { due: Some(t0 + ms(14)), ..req(5, t0 + ms(13)) });
        assert_eq!(ids(&b.pop_ready(t0 + ms(13), &mut gone).unwrap()), vec![5]);
    }

    #[test]
    fn compute_cost_is_learned_per_size_class_and_bounded_from_above_where_unseen() {
        let ms = |n| Some(Duration::from_millis(n));
        let mut c = ComputeCost::default();
        assert_eq!(c.expected(64), None, "nothing run yet");
        c.learn(64, Duration::from_millis(4));
        assert_eq!(c.expected(64), ms(4));
        assert_eq!(c.expected(33), ms(4), "the same class (33-64 rows)");
        assert_eq!(c.expected(10), ms(4), "a smaller class not seen: the larger one's");
        assert_eq!(c.expected(100), Some(Duration::from_micros(6_250)), "a larger one: scaled by rows");
        c.learn(64, Duration::from_millis(14));
        assert_eq!(c.expected(64), ms(6), "a moving average");
        c.learn(8, Duration::from_millis(1));
        assert_eq!(c.expected(10), ms(6), "16 rows not seen: 64's");
        assert_eq!(c.expected(5), ms(1));
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// A request of `rows` rows (at most `max_batch_size`) arrives after `dt` µs, due that many
        /// µs after its arrival if given.
        Push(u64, usize, Option<u64>),
        /// Time passes without arrivals.
        Advance(u64),
        /// The caller of the n-th request (modulo count) goes away.
        Cancel(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..300, prop_oneof![3 => Just(1usize), 1 => 1usize..40], proptest::option::of(0u64..5_000))
                .prop_map(|(dt, rows, due)| Op::Push(dt, rows, due)),
            2 => (0u64..3_000).prop_map(Op::Advance),
            1 => any::<usize>().prop_map(Op::Cancel),
        ]
    }

    proptest! {
        /// Whatever arrives, whenever, of one row or several, due or not, whatever was learned of
        /// the compute time: no batch exceeds `max_batch_size` rows,
        /// a full batch never waits, batches keep arrival order,
        /// nothing overdue is left waiting after a poll, and every request comes out exactly once
        /// (in a batch, or as cancelled if its caller left before its batch formed).
        #[test]
        fn batcher_properties(
            max in 1usize..40,
            preferred in proptest::collection::vec(1usize..40, 0..3),
            delay_us in 0u64..2_000,
            ops in proptest::collection::vec(op(), 1..300),
            learned in proptest::option::of((1usize..40, 0u64..3_000)),
        ) {
            let preferred: Vec<usize> = {
                let mut p: Vec<usize> = preferred.into_iter().filter(|&p| p <= max).collect();
                p.sort_unstable();
                p.dedup();
                p
            };
            let pol = policy(max, &preferred, delay_us);
            let mut b = Batcher::new(pol.clone());
            if let Some((rows, us)) = learned {
                b.learn(rows, Duration::from_micros(us));
            }
            let t0 = Instant::now();
            let mut now = t0;
            let mut flags: Vec<Rc<Cell<bool>>> = Vec::new();
            let mut batched: Vec<usize> = Vec::new();
            let mut cancelled: Vec<Req> = Vec::new();
            let mut cancelled_before_batch = HashSet::new();
            let poll = |b: &mut Batcher<Req>, now: Instant, batched: &mut Vec<usize>, cancelled: &mut Vec<Req>| {
                while let Some(batch) = b.pop_ready(now, cancelled) {
                    let rows: usize = batch.iter().map(|r| r.rows).sum();
                    prop_assert!(!batch.is_empty() && rows <= max, "batch of {} rows", rows);
                    let got = ids(&batch);
                    prop_assert!(got.windows(2).all(|w| w[0] < w[1]), "order {:?}", got);
                    for r in &batch {
                        prop_assert!(!r.is_cancelled(), "cancelled request {} was batched", r.id);
                    }
                    batched.extend(got);
                }
                if let Some(d) = b.deadline() {
                    prop_assert!(d > now, "request overdue by {:?} after a poll", now - d);
                }
                prop_assert!(b.rows() < max, "{} rows wait after a poll: a full batch was due", b.rows());
                Ok(())
            };
            for op in ops {
                match op {
                    Op::Push(dt, rows, due) => {
                        now += Duration::from_micros(dt);
                        let due = due.map(|us| now + Duration::from_micros(us));
                        let r = Req { rows: rows.min(max), due, ..req(flags.len(), now) };
                        flags.push(r.cancelled.clone());
                        b.push(r);
                    }
                    Op::Advance(dt) => now += Duration::from_micros(dt),
                    Op::Cancel(n) if !flags.is_empty() => {
                        let i = n % flags.len();
                        if !batched.contains(&i) {
                            cancelled_before_batch.insert(i);
                        }
                        flags[i].set(true);
                    }
                    Op::Cancel(_) => {}
                }
                poll(&mut b, now, &mut batched, &mut cancelled)?;
            }
            poll(&mut b, now + pol.max_queue_delay + Duration::from_secs(1), &mut batched, &mut cancelled)?;
            prop_assert!(b.is_empty() && b.rows() == 0);
            let mut all: Vec<usize> = batched.clone();
            all.extend(cancelled.iter().map(|r| r.id));
            all.sort_unstable();
            prop_assert_eq!(all, (0..flags.len()).collect::<Vec<_>>(), "each request exactly once");
            for id in &batched {
                prop_assert!(!cancelled_before_batch.contains(id));
            }
        }
    }
}
