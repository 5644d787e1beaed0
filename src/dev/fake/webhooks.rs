//! The fakes' outgoing webhooks: what Clerk and Memberstack send through
//! Svix (Standard Webhooks headers, `whsec_` secret) and what Stripe sends
//! (`Stripe-Signature`), delivered to one configured URL the way the
//! providers deliver: each attempt signed at the time it is sent, retried on
//! anything but a 2xx on the provider's schedule (compressed by a factor,
//! so a test waits milliseconds where Svix waits hours), with the same
//! message id on every attempt. Faults a receiver must survive can be
//! switched on: deliveries held back and released in another order,
//! duplicated, or delayed at random.
//!
//! The sender never blocks the fake's request path: an event is queued and
//! delivered by a task of its own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::seq::SliceRandom;
use rand::Rng;
use tokio::sync::Notify;

use crate::core::inbound::{sign_standard, sign_stripe, standard_key, InboundSecretError};

/// Svix's retry schedule after the first attempt (docs.svix.com, "Retries"):
/// 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
pub const SVIX_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Stripe retries live-mode deliveries "for up to three days with an
/// exponential back off" (the exact steps are not published): doubling from
/// one minute, twelve retries, about 68 hours in all.
pub fn stripe_schedule() -> Vec<Duration> {
    (0..12).map(|n| Duration::from_secs(60 << n)).collect()
}

/// How deliveries are signed.
#[derive(Clone)]
enum Signer {
    /// Standard Webhooks with `svix-*` headers (Clerk, Memberstack).
    Svix(Vec<u8>),
    /// `Stripe-Signature: t=…,v1=…`, keyed by the whole secret string.
    Stripe(String),
}

/// Where and how a fake sends its events.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    signer: Signer,
    /// Waits before each retry; its length is the number of retries.
    pub schedule: Vec<Duration>,
    /// How long one attempt may take before it counts as failed (Svix: 15 s).
    pub timeout: Duration,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("schedule", &self.schedule)
            .finish_non_exhaustive()
    }
}

impl WebhookTarget {
    /// Svix-signed deliveries (Clerk, Memberstack) with Svix's schedule.
    pub fn svix(url: &str, secret: &str) -> Result<Self, InboundSecretError> {
        Ok(WebhookTarget {
            url: url.to_string(),
            signer: Signer::Svix(standard_key(secret)?),
            schedule: SVIX_SCHEDULE.to_vec(),
            timeout: Duration::from_secs(15),
        })
    }

    /// Stripe-signed deliveries with Stripe's schedule.
    pub fn stripe(url: &str, secret: &str) -> Result<Self, InboundSecretError> {
        if !secret.starts_with("whsec_") {
            return Err(InboundSecretError::StripePrefix);
        }
        Ok(WebhookTarget {
            url: url.to_string(),
            signer: Signer::Stripe(secret.to_string()),
            schedule: stripe_schedule(),
            timeout: Duration::from_secs(20),
        })
    }

    /// The same schedule, every wait multiplied by `factor` (0.001 turns
    /// Svix's 5 s into 5 ms).
    pub fn compressed(mut self, factor: f64) -> Self {
        for wait in &mut self.schedule {
            *wait = wait.mul_f64(factor.max(0.0));
        }
        self
    }
}

/// Misbehaviour of the delivery path, as a receiver meets it in production.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DeliveryFaults {
    /// Percent (0-100) of events delivered twice, as two independent
    /// deliveries with the same message id.
    pub duplicate_percent: u8,
    /// Each first attempt waits a random time up to this, so deliveries
    /// overtake each other.
    pub max_delay: Duration,
}

/// The order in which held deliveries are let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    AsSent,
    Reversed,
    Shuffled,
}

/// One attempt to deliver one event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Attempt {
    /// `svix-id` (`msg_…`) or Stripe's `evt_…`.
    pub message_id: String,
    pub event_type: String,
    /// 1 for the first attempt of a delivery.
    pub attempt: u32,
    /// The receiver's status, or None when the request failed.
    pub status: Option<u16>,
    /// The receiver's answer (at most 1 KiB), or the transport error.
    pub response: String,
    pub at_ms: u128,
}

/// One event as sent: every attempt carries the same id and body.
#[derive(Debug, Clone)]
struct Outgoing {
    message_id: String,
    event_type: String,
    body: Arc<Vec<u8>>,
}

#[derive(Default)]
struct State {
    target: Option<WebhookTarget>,
    faults: DeliveryFaults,
    holding: bool,
    held: Vec<Outgoing>,
    attempts: Vec<Attempt>,
    /// Every event handed to `send`, in order (for tests: what was sent).
    sent: Vec<(String, String, Arc<Vec<u8>>)>,
}

/// A fake's webhook sender; cloneable handle, cheap to keep in its state.
#[derive(Clone, Default)]
pub struct Webhooks {
    state: Arc<Mutex<State>>,
    /// Deliveries not finished (including retries waiting), and held ones.
    pending: Arc<AtomicUsize>,
    settled: Arc<Notify>,
    client: Arc<std::sync::OnceLock<Option<reqwest::Client>>>,
}

impl Webhooks {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts sending every later event to `target`; `None` stops.
    pub fn set_target(&self, target: Option<WebhookTarget>) {
        self.state().target = target;
    }

    pub fn is_configured(&self) -> bool {
        self.state().target.is_some()
    }

    pub fn set_faults(&self, faults: DeliveryFaults) {
        self.state().faults = faults;
    }

    /// Keeps later events back until [`Webhooks::release`].
    pub fn hold(&self) {
        self.state().holding = true;
    }

    /// Lets held events go, in `order`, and stops holding.
    pub fn release(&self, order: Release) {
        let mut held = {
            let mut state = self.state();
            state.holding = false;
            std::mem::take(&mut state.held)
        };
        match order {
            Release::AsSent => {}
            Release::Reversed => held.reverse(),
            Release::Shuffled => held.shuffle(&mut rand::rng()),
        }
        for event in held {
            // Counted as pending since `send`; the delivery takes it over.
            self.dispatch(event);
        }
    }

    /// Every attempt so far, in the order they were answered.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state().attempts.clone()
    }

    /// Every event queued so far: (message id, type, body), in order.
    pub fn sent(&self) -> Vec<(String, String, Vec<u8>)> {
        self.state()
            .sent
            .iter()
            .map(|(id, t, b)| (id.clone(), t.clone(), b.to_vec()))
            .collect()
    }

    /// Resolves when no delivery is under way, waiting for a retry, or held.
    pub async fn settled(&self) {
        loop {
            let notified = self.settled.notified();
            if self.pending.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Queues one event (its body is final: it is what gets signed). A
    /// sender without a target drops it. Called under a fake's state lock,
    /// so it never waits.
    pub(super) fn send(&self, message_id: String, event_type: &str, body: Vec<u8>) {
        let event = Outgoing {
            message_id,
            event_type: event_type.to_string(),
            body: Arc::new(body),
        };
        let duplicate = {
            let mut state = self.state();
            if state.target.is_none() {
                return;
            }
            state.sent.push((
                event.message_id.clone(),
                event.event_type.clone(),
                Arc::clone(&event.body),
            ));
            let pct = state.faults.duplicate_percent.min(100);
            let duplicate = pct > 0 && rand::rng().random_range(0..100u8) < pct;
            let copies = if duplicate { 2 } else { 1 };
            self.pending.fetch_add(copies, Ordering::SeqCst);
            if state.holding {
                for _ in 0..copies {
                    state.held.push(event.clone());
                }
                return;
            }
            duplicate
        };
        if duplicate {
            self.dispatch(event.clone());
        }
        self.dispatch(event);
    }

    fn dispatch(&self, event: Outgoing) {
        let this = self.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.done();
            return;
        };
        runtime.spawn(async move {
            this.deliver(event).await;
            this.done();
        });
    }

    fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.settled.notify_waiters();
        }
    }

    fn client(&self) -> Option<reqwest::Client> {
        self.client
            .get_or_init(|| crate::sink::http_client(Duration::from_secs(60), 64).ok())
            .clone()
    }

    async fn deliver(&self, event: Outgoing) {
        let (target, faults) = {
            let state = self.state();
            (state.target.clone(), state.faults)
        };
        let Some(target) = target else { return };
        if !faults.max_delay.is_zero() {
            let wait = rand::rng().random_range(Duration::ZERO..=faults.max_delay);
            tokio::time::sleep(wait).await;
        }
        let Some(client) = self.client() else { return };
        let mut attempt = 1u32;
        loop {
            let (status, response) = attempt_once(&client, &target, &event).await;
            self.state().attempts.push(Attempt {
                message_id: event.message_id.clone(),
                event_type: event.event_type.clone(),
                attempt,
                status,
                response,
                at_ms: now_ms(),
            });
            if status.is_some_and(|s| (200..300).contains(&s)) {
                return;
            }
            let Some(wait) = target.schedule.get(attempt as usize - 1) else {
                return;
            };
            tokio::time::sleep(*wait).await;
            attempt += 1;
        }
    }
}

async fn attempt_once(
    client: &reqwest::Client,
    target: &WebhookTarget,
    event: &Outgoing,
) -> (Option<u16>, String) {
    let ts = now_secs();
    let mut request = client
        .post(&target.url)
        .timeout(target.timeout)
        .header("content-type", "application/json")
        .header("user-agent", "usersync-fake-webhooks");
    request = match &target.signer {
        Signer::Svix(key) => request
            .header("svix-id", &event.message_id)
            .header("svix-timestamp", ts.to_string())
            .header(
                "svix-signature",
                sign_standard(key, &event.message_id, ts, &event.body),
            ),
        Signer::Stripe(secret) => {
            request.header("stripe-signature", sign_stripe(secret, ts, &event.body))
        }
    };
    match request.body(event.body.as_ref().clone()).send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            (Some(status), text.chars().take(1024).collect())
        }
        Err(err) => (None, err.without_url().to_string()),
    }
}

/// A Svix message id: `msg_` and 27 base62 characters, like a KSUID.
pub fn svix_message_id() -> String {
    format!("msg_{}", random_alnum(27))
}

pub(super) fn random_alnum(n: usize) -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub(super) fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_compress() {
        let t = WebhookTarget::svix("http://x/", "whsec_plJ3nmyCDGBKInavdOK15jsl")
            .expect("secret")
            .compressed(0.001);
        assert_eq!(t.schedule[0], Duration::from_millis(5));
        assert_eq!(t.schedule.len(), 7);
        assert!(WebhookTarget::stripe("http://x/", "nope").is_err());
        let total: Duration = stripe_schedule().iter().sum();
        assert!(total < Duration::from_secs(3 * 24 * 3600), "{total:?}");
    }
}
