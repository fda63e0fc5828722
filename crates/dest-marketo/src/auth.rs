//! The client-credentials access token: fetched once, shared by every
//! concurrent call, reused until shortly before it expires, and dropped when
//! Marketo says it is invalid (601) or expired (602).

use std::time::{Duration, Instant};

use batchrouter_core::Secret;
use tokio::sync::Mutex;

/// Longest safety margin kept before a token's announced expiry.
const MAX_REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// A token and the moment we stop trusting it.
#[derive(Clone, Debug)]
pub struct CachedToken {
    /// The bearer token; never logged.
    pub value: Secret,
    /// After this instant the token is fetched again.
    pub refresh_at: Instant,
}

impl CachedToken {
    /// A token announced to live `expires_in`, refreshed a margin earlier
    /// (a quarter of its life, at most a minute) so calls do not race expiry.
    pub fn new(value: Secret, expires_in: Duration, now: Instant) -> Self {
        let margin = (expires_in / 4).min(MAX_REFRESH_MARGIN);
        CachedToken {
            value,
            refresh_at: now + expires_in.saturating_sub(margin),
        }
    }

    fn fresh(&self, now: Instant) -> bool {
        now < self.refresh_at
    }
}

/// Single-flight token cache: while one caller fetches, the others wait for
/// its result instead of asking Marketo too.
#[derive(Debug, Default)]
pub struct TokenCache {
    slot: Mutex<Option<CachedToken>>,
}

impl TokenCache {
    /// The cached token, or a new one from `fetch` when missing or stale.
    pub async fn get<F, Fut, E>(&self, fetch: F) -> Result<Secret, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<CachedToken, E>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some(t) = slot.as_ref().filter(|t| t.fresh(Instant::now())) {
            return Ok(t.value.clone());
        }
        let fresh = fetch().await?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    /// Forgets `rejected` (unless another caller already replaced it), so the
    /// next `get` fetches a new token.
    pub async fn invalidate(&self, rejected: &Secret) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|t| t.value == *rejected) {
            *slot = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn refresh_margin_is_a_quarter_at_most_a_minute() {
        let now = Instant::now();
        let t = CachedToken::new(Secret::new("a"), Duration::from_secs(3600), now);
        assert_eq!(t.refresh_at - now, Duration::from_secs(3540));
        let t = CachedToken::new(Secret::new("a"), Duration::from_secs(8), now);
        assert_eq!(t.refresh_at - now, Duration::from_secs(6));
        let t = CachedToken::new(Secret::new("a"), Duration::ZERO, now);
        assert!(!t.fresh(now));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_one_fetch_and_invalidate_refetches() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let cache = cache.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|| async {
                        let n = fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok::<_, ()>(CachedToken::new(
                            Secret::new(format!("t{n}")),
                            Duration::from_secs(60),
                            Instant::now(),
                        ))
                    })
                    .await
                    .unwrap()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().expose(), "t0");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        // A stale rejection (of a token already replaced) changes nothing.
        cache.invalidate(&Secret::new("other")).await;
        let again = cache
            .get(|| async { Err::<CachedToken, _>("no fetch expected") })
            .await;
        assert_eq!(again.unwrap().expose(), "t0");

        cache.invalidate(&Secret::new("t0")).await;
        let next = cache
            .get(|| async {
                Ok::<_, ()>(CachedToken::new(
                    Secret::new("t1"),
                    Duration::from_secs(60),
                    Instant::now(),
                ))
            })
            .await
            .unwrap();
        assert_eq!(next.expose(), "t1");
    }
}
