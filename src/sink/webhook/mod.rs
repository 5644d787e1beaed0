//! The webhook sink: POSTs each change as a JSON envelope signed per the
//! Standard Webhooks spec, and reads the external id from the response by a
//! configured JSON pointer.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Map, Value};

use super::http::Http;
use super::{excerpt, refuse_unconvertible, validate_external_id, Sink, SinkError};
use crate::config::SinkConfig;
use crate::core::change::{format_time_us, Change, Operation};
use crate::core::signature::WebhookSecret;

pub struct WebhookSink {
    http: Http,
    url: String,
    secret: WebhookSecret,
    pointer: String,
    ignore_deletes: bool,
    max_external_id_length: usize,
}

/// The body of every webhook request. Field order is the documented one.
#[derive(Serialize)]
pub struct Envelope<'a> {
    pub id: &'a str,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub occurred_at: String,
    pub table: &'a str,
    pub key: &'a Value,
    pub external_id: Option<&'a str>,
    pub data: Option<&'a Map<String, Value>>,
    pub previous: Option<&'a Map<String, Value>>,
    pub changed: &'a [String],
    pub omitted: &'a [String],
}

impl<'a> Envelope<'a> {
    pub fn new(change: &'a Change, external_id: Option<&'a str>) -> Self {
        Envelope {
            id: &change.event_id,
            kind: change.op.event_type(),
            occurred_at: format_time_us(change.commit_time_us),
            table: &change.table,
            key: &change.key.json,
            external_id,
            data: change.data.as_ref(),
            previous: change.previous.as_ref(),
            changed: &change.changed,
            omitted: &change.omitted,
        }
    }
}

impl WebhookSink {
    pub fn new(cfg: &SinkConfig) -> Result<Self, String> {
        Ok(WebhookSink {
            http: Http::new(cfg)?,
            url: cfg.url.clone(),
            secret: cfg
                .secret
                .clone()
                .ok_or("the webhook sink needs sink.secret_env or sink.secret_file")?,
            pointer: cfg.external_id_pointer.clone(),
            ignore_deletes: cfg.on_delete == crate::config::OnDelete::Ignore,
            max_external_id_length: cfg.max_external_id_length,
        })
    }

    async fn send(
        &self,
        change: &Change,
        external_id: Option<&str>,
    ) -> Result<Option<String>, SinkError> {
        refuse_unconvertible(change)?;
        if self.ignore_deletes && change.op == Operation::Delete {
            return Ok(external_id.map(str::to_string));
        }
        let envelope = Envelope::new(change, external_id);
        match self.post(&envelope, change.op).await {
            // An update naming no external id that the endpoint cannot place
            // (by key) has no record there: a row from before usersync. Its
            // first push creates it, under its own webhook id so that a
            // receiver deduplicating on ids does not take it for the update.
            // Only when the endpoint returns ids: otherwise no row ever has
            // one, and every update would read as a create.
            Err(SinkError::Http { status: 404, .. })
                if change.op == Operation::Update
                    && external_id.is_none()
                    && !self.pointer.is_empty() =>
            {
                tracing::debug!(event_id = %change.event_id, "user.updated answered 404 and no external id is known: creating the user");
                let id = format!("{}_create", change.event_id);
                let create = Envelope {
                    id: &id,
                    kind: Operation::Insert.event_type(),
                    ..envelope
                };
                self.post(&create, Operation::Insert).await
            }
            // Deleting what the service does not have leaves it as wanted:
            // never created (a row from before usersync) or already deleted.
            Err(SinkError::Http { status: 404, .. }) if change.op == Operation::Delete => {
                tracing::debug!(event_id = %change.event_id, "user.deleted answered 404: nothing to delete");
                Ok(external_id.map(str::to_string))
            }
            other => other.map(|id| id.or_else(|| external_id.map(str::to_string))),
        }
    }

    /// One signed POST; `op` decides whether the answer must carry an id.
    async fn post(
        &self,
        envelope: &Envelope<'_>,
        op: Operation,
    ) -> Result<Option<String>, SinkError> {
        let body = serde_json::to_vec(envelope)
            .map_err(|e| SinkError::Malformed(format!("cannot encode envelope: {e}")))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let signature = self.secret.sign(envelope.id, timestamp, &body);
        let request = self
            .http
            .client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", envelope.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body);
        let answer = self.http.send(request, str::to_string).await?;
        let (status, retry_after) = (answer.status, answer.retry_after());
        let body = answer.body;
        if !(200..300).contains(&status) {
            return Err(SinkError::Http {
                status,
                body: excerpt(&body.text),
                retry_after,
            });
        }
        self.external_id_from(op, &body)
    }

    /// The id at the configured pointer; required in a create's answer,
    /// because without it later updates and deletes could not name the user.
    /// Whatever is found at the pointer must pass [`validate_external_id`]:
    /// an id that cannot be stored fails this push, never the write-back.
    fn external_id_from(
        &self,
        op: Operation,
        body: &super::Body,
    ) -> Result<Option<String>, SinkError> {
        if self.pointer.is_empty() {
            return Ok(None);
        }
        if !body.valid_utf8 {
            return Err(SinkError::Malformed(
                "the answer is not valid UTF-8, so no external id can be read from it".into(),
            ));
        }
        let text = body.text.as_str();
        let found = match serde_json::from_str::<Value>(text)
            .ok()
            .as_ref()
            .and_then(|v| v.pointer(&self.pointer))
        {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(v) => Some(validate_external_id(v, self.max_external_id_length)?),
        };
        match (found, op) {
            (None, Operation::Insert) => Err(SinkError::Malformed(format!(
                "the answer to user.created has no external id at {} (body: {}); set sink.external_id_pointer to where the endpoint returns the id, or to \"\" if it returns none",
                self.pointer,
                excerpt(text)
            ))),
            (found, _) => Ok(found),
        }
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn push<'a>(
        &'a self,
        change: &'a Change,
        external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(self.send(change, external_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OnDelete, SinkKind};
    use crate::dev::fake::{FakeOptions, FakeService};

    fn change(op: Operation, data: Option<Value>) -> Change {
        let mut c = Change::for_test(op, 7.into());
        c.event_id = format!("evt_0000000000000001_{}", op.event_type());
        c.data = data.and_then(|d| d.as_object().cloned());
        c
    }

    fn config(url: &str) -> SinkConfig {
        SinkConfig {
            kind: SinkKind::Webhook,
            url: url.into(),
            secret: Some(
                WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret"),
            ),
            api_key: None,
            api_key_source: String::new(),
            external_id_pointer: "/id".into(),
            columns: vec![],
            mapping: vec![],
            timeout: std::time::Duration::from_secs(10),
            max_in_flight: 1,
            rate_limit_per_sec: 0,
            on_delete: OnDelete::Ignore,
            max_response_bytes: 1 << 20,
            max_external_id_length: 255,
        }
    }

    /// `sink.on_delete = "ignore"`: deletes are not sent (the record stays
    /// at the endpoint), while inserts and updates are sent as always.
    #[tokio::test]
    async fn on_delete_ignore_skips_deletes_only() {
        let fake = FakeService::start(FakeOptions::default())
            .await
            .expect("fake endpoint");
        let cfg = config(&fake.url());
        let sink = WebhookSink::new(&cfg).expect("sink");
        let data = serde_json::json!({"email": "a@example.com"});
        let id = sink
            .push(&change(Operation::Insert, Some(data.clone())), None)
            .await
            .expect("created")
            .expect("an id");
        let updated = sink
            .push(&change(Operation::Update, Some(data)), Some(&id))
            .await
            .expect("updated");
        assert_eq!(updated.as_deref(), Some(id.as_str()));
        let deleted = sink
            .push(&change(Operation::Delete, None), Some(&id))
            .await
            .expect("ignored");
        assert_eq!(deleted.as_deref(), Some(id.as_str()));
        let sent: Vec<String> = fake
            .requests()
            .iter()
            .map(|r| r.body["type"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(sent, ["user.created", "user.updated"]);
        let users = fake.users();
        assert_eq!(users.len(), 1);
        assert!(!users[0].deleted);
    }

    /// A 404 is "nothing to delete" only for a delete: an update of a
    /// record the endpoint does not have, under a known id, is a permanent
    /// failure (dead-lettered), not a success.
    #[tokio::test]
    async fn a_404_to_an_update_with_a_known_id_fails() {
        let fake = FakeService::start(FakeOptions::default())
            .await
            .expect("fake endpoint");
        let mut cfg = config(&fake.url());
        cfg.on_delete = OnDelete::Delete;
        let sink = WebhookSink::new(&cfg).expect("sink");
        let data = serde_json::json!({"email": "a@example.com"});
        let e = sink
            .push(&change(Operation::Update, Some(data)), Some("usr_unknown"))
            .await
            .expect_err("404");
        assert_eq!(e.status(), Some(404));
        assert!(!e.is_retryable());
        let gone = sink
            .push(&change(Operation::Delete, None), Some("usr_unknown"))
            .await
            .expect("nothing to delete");
        assert_eq!(gone.as_deref(), Some("usr_unknown"));
    }

    /// An empty id in the answer is no id: an update keeps the id it was
    /// sent with, and a create fails with the message that names the
    /// pointer (not as an invalid id, which would hide the cause).
    #[tokio::test]
    async fn an_empty_id_in_the_answer_keeps_the_known_id() {
        let server = crate::dev::canned::answering(200, r#"{"id": ""}"#).await;
        let sink = WebhookSink::new(&config(&server.url)).expect("sink");
        let data = serde_json::json!({"email": "a@example.com"});
        let kept = sink
            .push(
                &change(Operation::Update, Some(data.clone())),
                Some("usr_known"),
            )
            .await
            .expect("an update answered without an id succeeds");
        assert_eq!(kept.as_deref(), Some("usr_known"));
        let e = sink
            .push(&change(Operation::Insert, Some(data)), None)
            .await
            .expect_err("a create must return an id");
        assert!(e.to_string().contains("has no external id at /id"), "{e}");
        assert_eq!(server.requests(), 2);
    }

    /// An update of a row from before usersync (no id known, and the
    /// endpoint answers 404) is sent again as a create, under its own
    /// webhook id so a receiver deduplicating on ids does not drop it.
    #[tokio::test]
    async fn an_update_unknown_to_the_endpoint_is_sent_again_as_a_create() {
        let fake = FakeService::start(FakeOptions::default())
            .await
            .expect("fake endpoint");
        let sink = WebhookSink::new(&config(&fake.url())).expect("sink");
        let update = change(
            Operation::Update,
            Some(serde_json::json!({"email": "old@example.com"})),
        );
        let id = sink
            .push(&update, None)
            .await
            .expect("created")
            .expect("an id");
        let sent: Vec<(String, Option<String>, u16)> = fake
            .requests()
            .iter()
            .map(|r| {
                (
                    r.body["type"].as_str().unwrap_or_default().to_string(),
                    r.webhook_id.clone(),
                    r.status,
                )
            })
            .collect();
        assert_eq!(
            sent,
            [
                ("user.updated".into(), Some(update.event_id.clone()), 404),
                (
                    "user.created".into(),
                    Some(format!("{}_create", update.event_id)),
                    201
                ),
            ]
        );
        assert_eq!(fake.users()[0].external_id, id);
    }
}
