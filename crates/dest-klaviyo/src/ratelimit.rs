//! The per-destination request limiter shared by upload, poll and stats:
//! Klaviyo counts every call to the bulk import endpoints against one
//! budget (burst per second, steady per minute), so one limiter per manager
//! keeps the whole destination under it, and a 429's `Retry-After` pauses
//! every caller at once.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Extra room on each window, so jitter between our clock and the vendor's
/// never makes two requests one window apart look like one window.
const WINDOW_MARGIN_PER_SECOND: Duration = Duration::from_millis(10);
/// The longest `Retry-After` honoured; a larger hint is treated as this.
pub const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// Why [`RateLimiter::acquire`] gave no slot; nothing was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// A 429 pause is in force for this much longer.
    Paused(Duration),
    /// The next free slot is this far away, after the caller's deadline.
    NoSlotBefore(Duration),
}

/// Sliding-window limiter: at most `per_second` requests start in any
/// one-second window and at most `per_minute` in any one-minute window.
pub struct RateLimiter {
    per_second: usize,
    per_minute: usize,
    second: Duration,
    minute: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Start times granted so far (some may lie in the near future), oldest first.
    granted: VecDeque<Instant>,
    /// No request may start before this (a 429's `Retry-After`).
    paused_until: Option<Instant>,
}

impl RateLimiter {
    /// A limiter for the given burst and steady rates (both at least 1).
    pub fn new(per_second: u32, per_minute: u32) -> Self {
        RateLimiter {
            per_second: per_second.max(1) as usize,
            per_minute: per_minute.max(1) as usize,
            second: Duration::from_secs(1) + WINDOW_MARGIN_PER_SECOND,
            minute: Duration::from_secs(60) + WINDOW_MARGIN_PER_SECOND * 60,
            state: Mutex::new(State::default()),
        }
    }

    /// Waits for a request slot. Answers at once instead of waiting when a
    /// 429 pause is in force ([`Refused::Paused`], so callers can hand the
    /// hint to the router rather than hold a job for minutes) or when the
    /// next free slot lies after `deadline` ([`Refused::NoSlotBefore`]; no
    /// slot is taken, so the budget stays for the callers that can use it).
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<(), Refused> {
        let slot = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some(until) = st.paused_until {
                if until > now {
                    return Err(Refused::Paused(until - now));
                }
                st.paused_until = None;
            }
            let mut slot = st.granted.back().map_or(now, |last| (*last).max(now));
            let n = st.granted.len();
            if n >= self.per_second {
                slot = slot.max(st.granted[n - self.per_second] + self.second);
            }
            if n >= self.per_minute {
                slot = slot.max(st.granted[n - self.per_minute] + self.minute);
            }
            if deadline.is_some_and(|d| slot > d) {
                return Err(Refused::NoSlotBefore(slot - now));
            }
            st.granted.push_back(slot);
            // Only the last `max(per_second, per_minute)` grants within the
            // last minute can constrain a future slot.
            let keep = self.per_second.max(self.per_minute);
            while st.granted.len() > keep
                || st.granted.front().is_some_and(|t| *t + self.minute < now)
            {
                st.granted.pop_front();
            }
            slot
        };
        tokio::time::sleep_until(slot).await;
        Ok(())
    }

    /// Stops every caller for `d` (capped at [`MAX_PAUSE`]); a longer pause
    /// already in force is kept.
    pub fn pause_for(&self, d: Duration) {
        let until = Instant::now() + d.min(MAX_PAUSE);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.paused_until = Some(st.paused_until.map_or(until, |cur| cur.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn max_in_window(times: &[Instant], window: Duration) -> usize {
        let mut best = 0;
        for (i, start) in times.iter().enumerate() {
            let n = times[i..]
                .iter()
                .take_while(|t| **t < *start + window)
                .count();
            best = best.max(n);
        }
        best
    }

    #[tokio::test(start_paused = true)]
    async fn never_exceeds_burst_or_steady_rate() {
        let limiter = Arc::new(RateLimiter::new(10, 25));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..60 {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire(None).await.unwrap();
                Instant::now()
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        assert_eq!(max_in_window(&times, Duration::from_secs(1)), 10);
        assert_eq!(max_in_window(&times, Duration::from_secs(60)), 25);
        // The first burst goes at once; 60 requests at 25/min need two more minutes.
        assert_eq!(times[9], start);
        let elapsed = *times.last().unwrap() - start;
        assert!(elapsed >= Duration::from_secs(120), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(125), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_answers_at_once_with_the_remaining_time_then_lifts() {
        let limiter = RateLimiter::new(10, 150);
        limiter.pause_for(Duration::from_secs(5));
        limiter.pause_for(Duration::from_secs(2));
        let left = limiter.acquire(None).await.unwrap_err();
        assert_eq!(left, Refused::Paused(Duration::from_secs(5)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(
            limiter.acquire(None).await.unwrap_err(),
            Refused::Paused(Duration::from_secs(2))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        limiter.acquire(None).await.unwrap();
        limiter.pause_for(Duration::from_secs(100_000));
        assert_eq!(
            limiter.acquire(None).await.unwrap_err(),
            Refused::Paused(MAX_PAUSE)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_after_the_deadline_is_refused_without_being_taken() {
        let limiter = RateLimiter::new(1, 60);
        let start = Instant::now();
        let deadline = start + Duration::from_secs(2);
        limiter.acquire(Some(deadline)).await.unwrap();
        limiter.acquire(Some(deadline)).await.unwrap();
        assert!(Instant::now() - start >= Duration::from_secs(1));
        // The third slot (about 2.02 s after the first) is past the deadline.
        match limiter.acquire(Some(deadline)).await.unwrap_err() {
            Refused::NoSlotBefore(d) => {
                assert!(d > Duration::ZERO && d <= Duration::from_secs(2), "{d:?}")
            }
            other => panic!("{other:?}"),
        }
        // Refusing took no slot: a caller without a deadline gets that same slot.
        limiter.acquire(None).await.unwrap();
        let third = Instant::now() - start;
        assert!(third < Duration::from_millis(2_100), "{third:?}");
    }
}
