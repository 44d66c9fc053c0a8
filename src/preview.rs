//! Live previews of a running job: the images so far, decoded while the reverse process goes
//! on, still-masked tokens painted grey ([`crate::image::MASKED_GREY`]), so a person watches
//! the image reveal itself.
//!
//! A preview costs a decoder run (and PNG encoding in the service); decoding after every
//! transformer call can cost more than the calls themselves. How often one is made is decided
//! by [`Pacer`] from what this run measures, not from a fixed k: a preview is made once the
//! run has worked [`Pacer::BUDGET`]'s inverse times as long as the last preview took, and at
//! least [`Pacer::MIN_GAP`] after it. Previews then add at most a fifth to a run's time on any
//! device (a GPU whose decoder is cheap gets one every call, a CPU with a slow decoder one every
//! few), and a browser gets at most ten a second. Previews never change the tokens: they read
//! the chains between calls and draw nothing from the random streams.

use std::time::{Duration, Instant};

use crate::image::Pixels;

/// Where the previews of a run go (the service: an asynchronous job's event stream).
pub trait PreviewSink {
    /// True while someone looks: no preview is decoded otherwise.
    fn wanted(&self) -> bool;

    /// Images `first..first + pixels.len()` of the job after `steps` steps that called the
    /// transformer.
    fn preview(&mut self, first: usize, steps: usize, pixels: Vec<Pixels>);

    /// How often previews are made.
    fn pacer(&self) -> Pacer {
        Pacer::new()
    }
}

/// When the next preview is due (module docs).
#[derive(Debug, Clone)]
pub struct Pacer {
    /// Share of the run's time previews may take (between them).
    budget: f64,
    /// The shortest time between two previews.
    min_gap: Duration,
    /// When the last preview was done, and what it cost.
    last: Option<(Instant, Duration)>,
}

impl Pacer {
    /// Time previews may take, as a share of the run's time between them: 0.25 of the work
    /// is at most a fifth of the whole.
    pub const BUDGET: f64 = 0.25;

    /// The shortest time between two previews.
    pub const MIN_GAP: Duration = Duration::from_millis(100);

    /// A pacer for a new run: the first preview is due at once (it also measures the cost).
    pub fn new() -> Pacer {
        Pacer {
            budget: Pacer::BUDGET,
            min_gap: Pacer::MIN_GAP,
            last: None,
        }
    }

    /// A preview after every step, whatever it costs (tests, recordings).
    pub fn every_step() -> Pacer {
        Pacer {
            budget: f64::INFINITY,
            min_gap: Duration::ZERO,
            last: None,
        }
    }

    /// True when a preview should be made at `now`.
    pub fn due(&self, now: Instant) -> bool {
        match self.last {
            None => true,
            Some((end, cost)) => now.saturating_duration_since(end) >= self.gap(cost),
        }
    }

    /// Records a preview that ran from `start` to `end`.
    pub fn record(&mut self, start: Instant, end: Instant) {
        self.last = Some((end, end.saturating_duration_since(start)));
    }

    fn gap(&self, cost: Duration) -> Duration {
        cost.mul_f64(1.0 / self.budget).max(self.min_gap)
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_preview_is_due_at_once() {
        assert!(Pacer::new().due(Instant::now()));
    }

    #[test]
    fn a_cheap_preview_waits_the_minimum_gap() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        p.record(t0, t0 + 2 * MS);
        let end = t0 + 2 * MS;
        assert!(!p.due(end));
        assert!(!p.due(end + 99 * MS));
        assert!(p.due(end + 100 * MS));
    }

    #[test]
    fn a_costly_preview_waits_four_times_its_cost() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        p.record(t0, t0 + 50 * MS);
        let end = t0 + 50 * MS;
        assert!(!p.due(end + 199 * MS));
        assert!(p.due(end + 200 * MS));
    }

    #[test]
    fn the_last_preview_sets_the_pace() {
        let t0 = Instant::now();
        let mut p = Pacer::new();
        p.record(t0, t0 + 100 * MS);
        let t1 = t0 + 600 * MS;
        assert!(p.due(t1));
        p.record(t1, t1 + MS);
        assert!(!p.due(t1 + 50 * MS));
        assert!(p.due(t1 + 101 * MS));
    }

    #[test]
    fn every_step_is_always_due() {
        let t0 = Instant::now();
        let mut p = Pacer::every_step();
        p.record(t0, t0 + 500 * MS);
        assert!(p.due(t0 + 500 * MS));
    }
}
