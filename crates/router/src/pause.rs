//! A destination's throttle pause: set when the destination throttles or
//! sends `Retry-After`, honoured before every upload. One type owns the
//! state so every reader and writer agrees on what "paused" means.

use std::sync::Mutex;
use std::time::Duration;

use batchrouter_core::Timestamp;

/// Until when uploads to one destination wait.
#[derive(Debug, Default)]
pub(crate) struct Pause(Mutex<Option<Timestamp>>);

impl Pause {
    /// Pauses until `until`, or keeps a pause that already lasts longer.
    pub(crate) fn extend_to(&self, until: Timestamp) {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *p = Some(p.map_or(until, |cur| cur.max(until)));
    }

    /// The end of a pause still in force at `now`.
    pub(crate) fn active(&self, now: Timestamp) -> Option<Timestamp> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .filter(|t| *t > now)
    }

    /// How long is left of the pause at `now`; an elapsed pause is cleared
    /// and answers `None`.
    pub(crate) fn remaining(&self, now: Timestamp) -> Option<Duration> {
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *p {
            Some(until) if until > now => Some(until.since(now)),
            _ => {
                *p = None;
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_only_ever_grows_and_clears_once_elapsed() {
        let p = Pause::default();
        assert_eq!(p.active(Timestamp(0)), None);
        assert_eq!(p.remaining(Timestamp(0)), None);
        p.extend_to(Timestamp(5_000));
        p.extend_to(Timestamp(2_000));
        assert_eq!(p.active(Timestamp(1_000)), Some(Timestamp(5_000)));
        assert_eq!(p.remaining(Timestamp(1_000)), Some(Duration::from_secs(4)));
        assert_eq!(p.active(Timestamp(5_000)), None, "ends at its time");
        assert_eq!(p.remaining(Timestamp(6_000)), None);
        // Cleared: an earlier pause is not masked by the elapsed one.
        p.extend_to(Timestamp(3_000));
        assert_eq!(p.active(Timestamp(1_000)), Some(Timestamp(3_000)));
    }
}
