//! Rate limits (spec §6.8): a plain token bucket used for the accept limit
//! (`--accept-connection-limit` / `--accept-connection-burst`) and, per connection, for the
//! per-client receive limit (`--rate-config`), plus [`LogLimiter`] so rejections do not
//! flood the log.
//!
//! Buckets are owned by one task (the accept loop, or one connection's reader): no locks
//! and no shared atomics on the hot path.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst` stored. Starts full.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Takes one token if available (accept limiter: reject otherwise).
    pub fn allow(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens, going into debt if needed, and returns how long the caller must
    /// wait until the debt is paid (zero if there were enough tokens). Waiting instead of
    /// dropping gives TCP back-pressure, as upstream's receive limiter does.
    pub fn take(&mut self, n: f64) -> Duration {
        self.refill();
        self.tokens -= n;
        if self.tokens >= 0.0 || self.rate <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Per-client receive rate limit (upstream `-rate-config` JSON, spec §6.8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecvRateLimit {
    /// Bytes per second (0 disables).
    pub bytes_per_sec: f64,
    /// Burst in bytes; raised to at least [`MIN_RECV_BURST`].
    pub burst_bytes: f64,
}

/// Upstream raises the burst to at least one maximal frame (64 KiB + 32).
pub const MIN_RECV_BURST: f64 = 65_568.0;

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RateConfigJson {
    #[serde(default)]
    per_client_rate_limit_bytes_per_sec: u64,
    #[serde(default)]
    per_client_rate_burst_bytes: u64,
}

impl RecvRateLimit {
    /// Parses upstream's rate config JSON:
    /// `{"PerClientRateLimitBytesPerSec": N, "PerClientRateBurstBytes": M}`.
    /// Returns `None` when N = 0 (disabled).
    pub fn parse_json(text: &str) -> Result<Option<Self>, String> {
        let c: RateConfigJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if c.per_client_rate_limit_bytes_per_sec == 0 {
            return Ok(None);
        }
        #[allow(clippy::cast_precision_loss)]
        Ok(Some(Self {
            bytes_per_sec: c.per_client_rate_limit_bytes_per_sec as f64,
            burst_bytes: (c.per_client_rate_burst_bytes as f64).max(MIN_RECV_BURST),
        }))
    }

    /// A fresh per-connection bucket.
    pub fn bucket(&self) -> TokenBucket {
        TokenBucket::new(self.bytes_per_sec, self.burst_bytes.max(MIN_RECV_BURST))
    }
}

/// Logs at most once per interval; counts what it suppressed in between.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// At most one line per `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last line)` if a line may be logged now.
    pub fn check(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.suppressed.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(2.0, 3.0);
        assert!(b.allow() && b.allow() && b.allow());
        assert!(!b.allow());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.allow());
        assert!(!b.allow());
    }

    #[tokio::test(start_paused = true)]
    async fn take_returns_debt_wait() {
        let mut b = TokenBucket::new(1000.0, 1000.0);
        assert_eq!(b.take(1000.0), Duration::ZERO);
        let w = b.take(500.0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn rate_config_json() {
        let r = RecvRateLimit::parse_json(
            r#"{"PerClientRateLimitBytesPerSec": 1000, "PerClientRateBurstBytes": 10}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(r.bytes_per_sec, 1000.0);
        assert_eq!(r.burst_bytes, MIN_RECV_BURST);
        assert_eq!(RecvRateLimit::parse_json("{}").unwrap(), None);
        assert!(RecvRateLimit::parse_json("nope").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn log_limiter_suppresses() {
        let l = LogLimiter::new(Duration::from_secs(1));
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(l.check(), Some(2));
    }
}
