//! Fencing of pushes by a leadership lease. A leader may start a push
//! attempt only while its lease is valid; the lease is a local deadline that
//! ends before PostgreSQL can hand leadership to another daemon (the
//! argument is in DESIGN.md, "Hot standby"). A process that was frozen and
//! wakes up finds its deadline passed on its first attempt, whatever order
//! its tasks run in, and sends nothing.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Sink, SinkError};
use crate::core::change::Change;

/// A leadership term: valid until its deadline, or until `lose` is called.
/// Losing it cancels its token, which the session runs under.
#[derive(Clone)]
pub struct Lease {
    until: Arc<Mutex<Option<Instant>>>,
    lost: CancellationToken,
}

impl Lease {
    /// A lease not yet valid (no deadline), ended when `lost` fires.
    pub fn new(lost: CancellationToken) -> Lease {
        Lease {
            until: Arc::new(Mutex::new(None)),
            lost,
        }
    }

    /// Moves the deadline forward (never back).
    pub fn extend(&self, until: Instant) {
        let mut guard = self.until.lock().unwrap_or_else(PoisonError::into_inner);
        if guard.is_none_or(|t| t < until) {
            *guard = Some(until);
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the holder may still act as the leader. A passed deadline
    /// ends the lease here and now (it does not wait for a timer).
    pub fn is_valid(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        match self.deadline() {
            Some(t) if Instant::now() < t => true,
            _ => {
                self.lost.cancel();
                false
            }
        }
    }

    pub fn lose(&self) {
        self.lost.cancel();
    }

    /// Fires when the lease is lost (and when its parent token fires).
    pub fn token(&self) -> &CancellationToken {
        &self.lost
    }
}

/// A sink that pushes only while the lease is valid.
pub struct Fenced {
    inner: Arc<dyn Sink>,
    lease: Lease,
}

impl Fenced {
    pub fn new(inner: Arc<dyn Sink>, lease: Lease) -> Fenced {
        Fenced { inner, lease }
    }
}

impl Sink for Fenced {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        if !self.lease.is_valid() {
            return Box::pin(async { Err(SinkError::Fenced) });
        }
        self.inner.push(change, external_id)
    }

    fn check(&self) -> BoxFuture<'_, Result<(), SinkError>> {
        self.inner.check()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_lease_ends_at_its_deadline_without_any_timer() {
        let lease = Lease::new(CancellationToken::new());
        assert!(!lease.is_valid(), "no deadline yet: not valid");
        let lease = Lease::new(CancellationToken::new());
        lease.extend(Instant::now() + Duration::from_secs(60));
        assert!(lease.is_valid());
        lease.extend(Instant::now());
        assert!(lease.is_valid(), "extend never moves the deadline back");
        let past = Lease::new(CancellationToken::new());
        past.extend(Instant::now() - Duration::from_millis(1));
        assert!(!past.is_valid());
        assert!(past.token().is_cancelled(), "finding it expired ends it");
    }

    #[test]
    fn a_lost_lease_stays_lost() {
        let lease = Lease::new(CancellationToken::new());
        lease.extend(Instant::now() + Duration::from_secs(60));
        lease.lose();
        assert!(!lease.is_valid());
    }

    #[test]
    fn each_renewal_moves_the_deadline_forward() {
        let lease = Lease::new(CancellationToken::new());
        let first = Instant::now() + Duration::from_secs(60);
        lease.extend(first);
        let later = first + Duration::from_secs(30);
        lease.extend(later);
        assert_eq!(lease.deadline(), Some(later));
    }

    /// Counts the pushes that reach the service.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Sink for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }

        fn push<'a>(
            &'a self,
            _change: &'a Change,
            _external_id: Option<&'a str>,
        ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async { Ok(Some("ext_1".into())) })
        }
    }

    /// The fence itself: while the lease is valid a push reaches the
    /// service; once it has run out, nothing is sent and the push fails
    /// with `Fenced` (abandoned, never dead-lettered).
    #[tokio::test]
    async fn a_push_reaches_the_service_only_under_a_valid_lease() {
        let inner = Arc::new(Counting(Default::default()));
        let lease = Lease::new(CancellationToken::new());
        let fenced = Fenced::new(inner.clone(), lease.clone());
        assert_eq!(fenced.name(), "counting");
        let change = Change::for_test(crate::core::change::Operation::Insert, 1.into());
        lease.extend(Instant::now() + Duration::from_secs(60));
        assert_eq!(
            fenced.push(&change, None).await.expect("pushed"),
            Some("ext_1".into())
        );
        lease.lose();
        assert!(matches!(
            fenced.push(&change, None).await,
            Err(SinkError::Fenced)
        ));
        assert_eq!(inner.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
