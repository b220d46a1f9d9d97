//! Restart budgets, shared by the supervisors: the worker pool (GPU workers) and the consumer's
//! partition supervision (partition actors).
//!
//! A failed child is restarted after a backoff that doubles with each recent failure (from
//! `backoff` up to `max_backoff`); after `max_restarts` restarts within `within` the budget is
//! spent and the supervisor gives the child up (what that means is the supervisor's policy).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use ractor::{ActorId, SupervisionEvent};

/// A child that stopped, from a supervision event: its id and why (`failed: ...` for an error or a
/// panic, its stop reason, or a note that it was killed). `None` for events that are not a stop.
pub fn child_stopped(evt: &SupervisionEvent) -> Option<(ActorId, String)> {
    match evt {
        SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), format!("failed: {err}"))),
        SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
            cell.get_id(),
            reason.clone().unwrap_or_else(|| "stopped without a reason (killed)".into()),
        )),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: usize,
    pub within: Duration,
    /// Wait before the first restart of a quiet period.
    pub backoff: Duration,
    /// The doubling stops here.
    pub max_backoff: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            within: Duration::from_secs(60),
            backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
        }
    }
}

/// One child's restarts within the policy's window.
#[derive(Debug, Clone)]
pub struct RestartBudget {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(policy: RestartPolicy) -> Self {
        Self { policy, recent: VecDeque::new() }
    }

    /// The child failed at `now`: how long to wait before restarting it, or `None` once
    /// `max_restarts` restarts happened within `within` (the budget is spent).
    pub fn on_failure(&mut self, now: Instant) -> Option<Duration> {
        let within = self.policy.within;
        while self.recent.front().is_some_and(|t| now.duration_since(*t) > within) {
            self.recent.pop_front();
        }
        if self.recent.len() >= self.policy.max_restarts {
            return None;
        }
        let doublings = u32::try_from(self.recent.len()).unwrap_or(u32::MAX).min(20);
        self.recent.push_back(now);
        Some(
            self.policy
                .backoff
                .saturating_mul(1 << doublings)
                .min(self.policy.max_backoff.max(self.policy.backoff)),
        )
    }

    /// Restarts within the window.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }

    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_the_budget_runs_out_within_the_window() {
        let policy = RestartPolicy {
            max_restarts: 4,
            within: Duration::from_secs(60),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(300),
        };
        let mut b = RestartBudget::new(policy);
        let t0 = Instant::now();
        let waits: Vec<Option<Duration>> =
            (0..5).map(|i| b.on_failure(t0 + Duration::from_secs(i))).collect();
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(waits, [ms(100), ms(200), ms(300), ms(300), None]);
        // Once the first restarts leave the window, the budget and the backoff recover.
        assert_eq!(
            b.on_failure(t0 + Duration::from_secs(62)),
            ms(300),
            "the restarts at 2 s and 3 s are still within the window"
        );
        assert_eq!(b.recent(), 3);
        let mut quiet = RestartBudget::new(b.policy().clone());
        assert_eq!(quiet.on_failure(t0), ms(100));
        assert_eq!(quiet.on_failure(t0 + Duration::from_secs(61)), ms(100), "a quiet minute starts over");
    }
}
