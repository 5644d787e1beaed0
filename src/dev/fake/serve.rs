//! `usersync fake-service`: one of the fakes on a fixed port, for trying
//! usersync by hand or from another language's tests. The command line
//! prints what this returns.

use futures::future::BoxFuture;

use crate::config::SinkKind;
use crate::core::signature::WebhookSecret;
use crate::dev::fake::memberstack::{FakeMemberstack, FakeMemberstackOptions};
use crate::dev::fake::stripe::{FakeStripe, FakeStripeOptions};
use crate::dev::fake::{FakeOptions, FakeService};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the signing secret: {0}")]
    Secret(#[from] crate::core::signature::SecretError),
    #[error("fake service: {0}")]
    Io(#[from] std::io::Error),
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
pub async fn start(
    kind: SinkKind,
    port: u16,
    given: Option<String>,
    latency: std::time::Duration,
) -> Result<Running, StartError> {
    match kind {
        SinkKind::Webhook => {
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
        SinkKind::Memberstack | SinkKind::Stripe => {
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
            if kind == SinkKind::Memberstack {
                let fake = FakeMemberstack::start(FakeMemberstackOptions {
                    port,
                    api_key: key,
                    latency,
                    ..FakeMemberstackOptions::default()
                })
                .await?;
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
                Ok(Running {
                    url: fake.url(),
                    generated,
                    stop: Box::new(move || Box::pin(fake.shutdown())),
                })
            }
        }
    }
}
