//! `usersync fake-service`: one of the fakes on a fixed port, for trying
//! usersync by hand or from another language's tests. The command line
//! prints what this returns.

use futures::future::BoxFuture;

use crate::config::SinkKind;
use crate::core::signature::WebhookSecret;
use crate::dev::fake::clerk::{FakeClerk, FakeClerkOptions};
use crate::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use crate::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
use crate::dev::fake::{FakeOptions, FakeService};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the signing secret: {0}")]
    Secret(#[from] crate::core::signature::SecretError),
    #[error("fake service: {0}")]
    Io(#[from] std::io::Error),
    #[error("the webhook secret: {0}")]
    WebhookSecret(#[from] crate::core::inbound::InboundSecretError),
    #[error("--webhook-url needs --mode clerk, memberstack or stripe: the webhook receiver fake sends no webhooks")]
    NoWebhooks,
}

/// Which service a fake imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeKind {
    /// The receiver of usersync's own webhook sink.
    Webhook,
    Memberstack,
    Stripe,
    /// Clerk's Backend API users endpoints.
    Clerk,
}

impl From<SinkKind> for FakeKind {
    fn from(kind: SinkKind) -> Self {
        match kind {
            SinkKind::Webhook => FakeKind::Webhook,
            SinkKind::Memberstack => FakeKind::Memberstack,
            SinkKind::Stripe => FakeKind::Stripe,
        }
    }
}

/// Where a vendor fake sends its signed events.
#[derive(Debug, Clone)]
pub struct SendWebhooks {
    pub url: String,
    /// `whsec_…`: Svix's for Clerk and Memberstack, Stripe's for Stripe.
    pub secret: String,
    /// Multiplies the provider's retry schedule (1.0: as the provider).
    pub compress: f64,
}

impl SendWebhooks {
    fn target(&self, kind: FakeKind) -> Result<super::webhooks::WebhookTarget, StartError> {
        let target = match kind {
            FakeKind::Stripe => super::webhooks::WebhookTarget::stripe(&self.url, &self.secret)?,
            FakeKind::Clerk | FakeKind::Memberstack => {
                super::webhooks::WebhookTarget::svix(&self.url, &self.secret)?
            }
            FakeKind::Webhook => return Err(StartError::NoWebhooks),
        };
        Ok(target.compressed(self.compress))
    }
}

/// A started fake: where it listens, the secret or key it made up when none
/// was given (a line to show the person), and how to stop it.
pub struct Running {
    pub url: String,
    pub generated: Option<String>,
    pub stop: Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>,
}

/// Starts the fake of `kind`. `given` is the webhook signing secret
/// (`whsec_…`) or the API key the fake accepts; without one, it makes one up.
/// `webhooks`: where a vendor fake sends its signed events.
pub async fn start(
    kind: FakeKind,
    port: u16,
    given: Option<String>,
    latency: std::time::Duration,
    webhooks: Option<SendWebhooks>,
) -> Result<Running, StartError> {
    let target = webhooks.as_ref().map(|w| w.target(kind)).transpose()?;
    match kind {
        FakeKind::Webhook => {
            let (secret, generated) = match given {
                Some(text) => (WebhookSecret::parse(&text)?, None),
                None => {
                    let s = WebhookSecret::generate();
                    let line = format!(
                        "signing secret (give it to usersync through sink.secret_env): {}",
                        s.to_whsec()
                    );
                    (s, Some(line))
                }
            };
            let fake = FakeService::start(FakeOptions {
                port,
                secret: Some(secret),
                latency,
            })
            .await?;
            Ok(Running {
                url: fake.url(),
                generated,
                stop: Box::new(move || Box::pin(fake.shutdown())),
            })
        }
        FakeKind::Memberstack | FakeKind::Stripe | FakeKind::Clerk => {
            let (key, generated) = match given {
                Some(key) => (key, None),
                None => {
                    let k = format!(
                        "sk_test_{}",
                        WebhookSecret::generate()
                            .to_whsec()
                            .trim_start_matches("whsec_")
                            .replace(['+', '/', '='], "")
                    );
                    let line =
                        format!("API key (give it to usersync through sink.api_key_env): {k}");
                    (k, Some(line))
                }
            };
            if kind == FakeKind::Clerk {
                let fake = FakeClerk::start(FakeClerkOptions {
                    port,
                    secret_key: key,
                    latency,
                    ..FakeClerkOptions::default()
                })
                .await?;
                fake.webhooks().set_target(target);
                Ok(Running {
                    url: fake.url(),
                    generated,
                    stop: Box::new(move || Box::pin(fake.shutdown())),
                })
            } else if kind == FakeKind::Memberstack {
                let fake = FakeMemberstack::start(FakeMemberstackOptions {
                    port,
                    api_key: key,
                    latency,
                    ..FakeMemberstackOptions::default()
                })
                .await?;
                fake.webhooks().set_target(target);
                Ok(Running {
                    url: fake.url(),
                    generated,
                    stop: Box::new(move || Box::pin(fake.shutdown())),
                })
            } else {
                let fake = FakeStripe::start(FakeStripeOptions {
                    port,
                    api_key: key,
                    latency,
                    ..FakeStripeOptions::default()
                })
                .await?;
                fake.webhooks().set_target(target);
                Ok(Running {
                    url: fake.url(),
                    generated,
                    stop: Box::new(move || Box::pin(fake.shutdown())),
                })
            }
        }
    }
}
