//! A verified delivery's body turned into one normalized inbound record:
//! which provider object it is about, the provider's own version of it, the
//! hints for finding the user's row, and the mapped column values. One
//! parser per provider (Clerk, Memberstack, Stripe, any Standard Webhooks
//! sender); the apply path in `store::inbound` only sees [`InboundRecord`].
//! No I/O.

use serde_json::{Map, Value};

/// Which provider a source is, and so how its bodies read and its deliveries
/// are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Clerk,
    Memberstack,
    Stripe,
    Standard,
}

impl SourceKind {
    pub fn parse(s: &str) -> Option<SourceKind> {
        match s {
            "clerk" => Some(SourceKind::Clerk),
            "memberstack" => Some(SourceKind::Memberstack),
            "stripe" => Some(SourceKind::Stripe),
            "standard" => Some(SourceKind::Standard),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::Clerk => "clerk",
            SourceKind::Memberstack => "memberstack",
            SourceKind::Stripe => "stripe",
            SourceKind::Standard => "standard",
        }
    }

    pub fn scheme(self) -> crate::core::inbound::Scheme {
        match self {
            SourceKind::Stripe => crate::core::inbound::Scheme::Stripe,
            _ => crate::core::inbound::Scheme::Standard,
        }
    }

    /// The outbound sink kind (`sink.kind`) that talks to the same service:
    /// an inbound write of this source must never be pushed back to it.
    pub fn service(self) -> Option<&'static str> {
        match self {
            SourceKind::Memberstack => Some("memberstack"),
            SourceKind::Stripe => Some("stripe"),
            SourceKind::Clerk | SourceKind::Standard => None,
        }
    }
}

/// Where a column's value comes from in the provider's object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// An RFC 6901 JSON pointer into the object (the Clerk user, the
    /// Memberstack member, the Stripe object); absent means "leave the
    /// column as it is", JSON null sets NULL.
    Pointer(String),
    /// Clerk: the address of `primary_email_address_id` in
    /// `email_addresses[]`.
    PrimaryEmail,
    /// Memberstack: `auth.email`.
    AuthEmail,
}

impl Field {
    /// `primary_email`, `auth_email` or a pointer starting with `/`.
    pub fn parse(s: &str) -> Option<Field> {
        match s {
            "primary_email" => Some(Field::PrimaryEmail),
            "auth_email" => Some(Field::AuthEmail),
            p if p.starts_with('/') => Some(Field::Pointer(p.to_string())),
            _ => None,
        }
    }
}

/// What an event asks of the user's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Create or update the user (created/updated events).
    Upsert,
    /// Update an existing user only (subscription state): never creates.
    Update,
    /// The provider's object is gone.
    Delete,
    /// An event type usersync does not map: answered 200 and recorded.
    Ignore,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Upsert => "upsert",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::Ignore => "ignore",
        }
    }
}

/// One inbound event, provider-neutral. Also what an import produces for
/// each listed object (with an event id of its own making).
#[derive(Debug, Clone, PartialEq)]
pub struct InboundRecord {
    /// Dedupe key within the source (Svix message id, Stripe `evt_…`).
    pub event_id: String,
    pub event_type: String,
    pub action: Action,
    /// Which of the provider's version sequences `version` belongs to: a
    /// Stripe subscription's `created` is not comparable with its customer's.
    pub stream: &'static str,
    /// The provider's id of the user (Clerk `user_…`, `mem_…`, `cus_…`).
    pub subject: String,
    /// The user's key in this table as usersync's own sinks stored it
    /// (`usersync_key` metadata, Clerk `external_id`).
    pub back_ref: Option<String>,
    pub email: Option<String>,
    /// The provider's version of the object, in milliseconds; never compared
    /// with the database's clock.
    pub version: i64,
    /// Column → value, only the columns whose field is present.
    pub values: Map<String, Value>,
    /// Stripe `request.idempotency_key`: the request that caused the event.
    pub idempotency_key: Option<String>,
}

/// A verified body that cannot be turned into a record: a permanent failure
/// of that event (the provider would send the same bytes again).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not a JSON object")]
    NotJson,
    #[error("event lacks {0}")]
    Missing(&'static str),
    #[error("{0} is too long")]
    TooLong(&'static str),
}

/// Whether an event at `incoming` (version, is a delete) replaces what was
/// applied at `stored` for the same provider object. Newer versions win; on
/// a tie a delete wins, so a delete leaves a tombstone that a create or
/// update of the same or an older version cannot undo, while a repeated
/// state of the same version is applied again (harmless).
pub fn supersedes(incoming: (i64, bool), stored: (i64, bool)) -> bool {
    let ((version, delete), (stored_version, stored_delete)) = (incoming, stored);
    if version != stored_version {
        return version > stored_version;
    }
    delete || !stored_delete
}

/// Longest id or key taken from a body.
const MAX_ID: usize = 255;

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn bounded(s: Option<&str>, what: &'static str) -> Result<Option<String>, EventError> {
    match s {
        Some(s) if s.len() > MAX_ID => Err(EventError::TooLong(what)),
        Some("") | None => Ok(None),
        Some(s) => Ok(Some(s.to_string())),
    }
}

fn required(s: Option<&str>, what: &'static str) -> Result<String, EventError> {
    bounded(s, what)?.ok_or(EventError::Missing(what))
}

fn clerk_primary_email(user: &Value) -> Option<Value> {
    let primary = str_at(user, "/primary_email_address_id")?;
    user.get("email_addresses")?
        .as_array()?
        .iter()
        .find(|e| str_at(e, "/id") == Some(primary))
        .and_then(|e| e.get("email_address").cloned())
}

fn map_values(object: &Value, mapping: &[(String, Field)]) -> Map<String, Value> {
    let mut out = Map::new();
    for (column, field) in mapping {
        let value = match field {
            Field::Pointer(p) => object.pointer(p).cloned(),
            Field::PrimaryEmail => clerk_primary_email(object),
            Field::AuthEmail => object.pointer("/auth/email").cloned(),
        };
        if let Some(v) = value {
            out.insert(column.clone(), v);
        }
    }
    out
}

fn as_ms(v: Option<&Value>) -> Option<i64> {
    let v = v?;
    v.as_i64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Parses a verified body. `message_id` is the delivery's id header
/// (Standard Webhooks), `delivered_at` its timestamp in seconds.
pub fn parse(
    kind: SourceKind,
    body: &[u8],
    message_id: Option<&str>,
    delivered_at: i64,
    mapping: &[(String, Field)],
) -> Result<InboundRecord, EventError> {
    let root: Value = serde_json::from_slice(body).map_err(|_| EventError::NotJson)?;
    if !root.is_object() {
        return Err(EventError::NotJson);
    }
    match kind {
        SourceKind::Clerk => clerk(&root, message_id, mapping),
        SourceKind::Memberstack => memberstack(&root, message_id, delivered_at, mapping),
        SourceKind::Stripe => stripe(&root, mapping),
        SourceKind::Standard => standard(&root, message_id, delivered_at, mapping),
    }
}

fn clerk(
    root: &Value,
    message_id: Option<&str>,
    mapping: &[(String, Field)],
) -> Result<InboundRecord, EventError> {
    let event_id = required(message_id, "svix-id")?;
    let event_type = required(str_at(root, "/type"), "type")?;
    let data = root.get("data").ok_or(EventError::Missing("data"))?;
    let subject = required(str_at(data, "/id"), "data.id")?;
    let (action, version) = match event_type.as_str() {
        "user.created" | "user.updated" => (
            Action::Upsert,
            as_ms(data.get("updated_at")).ok_or(EventError::Missing("data.updated_at"))?,
        ),
        // A deleted user carries no updated_at; the event's own time is
        // after every update of that user.
        "user.deleted" => (
            Action::Delete,
            as_ms(root.get("timestamp")).ok_or(EventError::Missing("timestamp"))?,
        ),
        _ => (Action::Ignore, 0),
    };
    let values = match action {
        Action::Upsert => map_values(data, mapping),
        _ => Map::new(),
    };
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream: "user",
        subject,
        back_ref: bounded(str_at(data, "/external_id"), "external_id")?,
        email: clerk_primary_email(data).and_then(|v| v.as_str().map(str::to_string)),
        version,
        values,
        idempotency_key: None,
    })
}

fn memberstack(
    root: &Value,
    message_id: Option<&str>,
    delivered_at: i64,
    mapping: &[(String, Field)],
) -> Result<InboundRecord, EventError> {
    let event_id = required(message_id, "svix-id")?;
    // The docs disagree on the names: accept both.
    let event_type = required(
        str_at(root, "/event").or_else(|| str_at(root, "/type")),
        "event",
    )?;
    let member = root
        .get("payload")
        .or_else(|| root.get("data"))
        .ok_or(EventError::Missing("payload"))?;
    let member = member.get("member").unwrap_or(member);
    let subject = required(str_at(member, "/id"), "payload.id")?;
    let version = as_ms(root.get("timestamp")).unwrap_or(delivered_at.saturating_mul(1000));
    let action = match event_type.as_str() {
        "member.created" | "member.updated" => Action::Upsert,
        "member.deleted" => Action::Delete,
        t if t.starts_with("member.plan") => Action::Update,
        _ => Action::Ignore,
    };
    let values = match action {
        Action::Upsert | Action::Update => map_values(member, mapping),
        _ => Map::new(),
    };
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream: if action == Action::Update {
            "plan"
        } else {
            "member"
        },
        subject,
        back_ref: bounded(
            str_at(member, "/metaData/usersync_key")
                .or_else(|| str_at(member, "/metadata/usersync_key")),
            "usersync_key",
        )?,
        email: str_at(member, "/auth/email").map(str::to_string),
        version,
        values,
        idempotency_key: None,
    })
}

fn stripe(root: &Value, mapping: &[(String, Field)]) -> Result<InboundRecord, EventError> {
    let event_id = required(str_at(root, "/id"), "id")?;
    let event_type = required(str_at(root, "/type"), "type")?;
    let object = root
        .pointer("/data/object")
        .ok_or(EventError::Missing("data.object"))?;
    let created = root
        .get("created")
        .and_then(Value::as_i64)
        .ok_or(EventError::Missing("created"))?;
    let (action, stream, subject) = match event_type.as_str() {
        "customer.created" | "customer.updated" => {
            (Action::Upsert, "customer", str_at(object, "/id"))
        }
        "customer.deleted" => (Action::Delete, "customer", str_at(object, "/id")),
        t if t.starts_with("customer.subscription.") => {
            (Action::Update, "subscription", str_at(object, "/customer"))
        }
        "checkout.session.completed" => (Action::Update, "checkout", str_at(object, "/customer")),
        _ => (Action::Ignore, "other", str_at(object, "/id")),
    };
    let subject = match action {
        Action::Ignore => bounded(subject, "data.object.id")?.unwrap_or_default(),
        _ => required(subject, "the customer id")?,
    };
    let values = match action {
        Action::Upsert | Action::Update => map_values(object, mapping),
        _ => Map::new(),
    };
    let customer = matches!(stream, "customer");
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream,
        subject,
        back_ref: if customer {
            bounded(str_at(object, "/metadata/usersync_key"), "usersync_key")?
        } else {
            None
        },
        email: if customer {
            str_at(object, "/email").map(str::to_string)
        } else {
            None
        },
        version: created.saturating_mul(1000),
        values,
        idempotency_key: bounded(str_at(root, "/request/idempotency_key"), "idempotency_key")?,
    })
}

fn standard(
    root: &Value,
    message_id: Option<&str>,
    delivered_at: i64,
    mapping: &[(String, Field)],
) -> Result<InboundRecord, EventError> {
    let event_id = required(message_id, "webhook-id")?;
    let event_type = required(str_at(root, "/type"), "type")?;
    let data = root.get("data").ok_or(EventError::Missing("data"))?;
    let subject = required(
        str_at(data, "/id").or_else(|| str_at(data, "/external_id")),
        "data.id",
    )?;
    let action = if event_type.ends_with(".deleted") {
        Action::Delete
    } else if event_type.ends_with(".created") || event_type.ends_with(".updated") {
        Action::Upsert
    } else {
        Action::Ignore
    };
    let version = as_ms(data.get("updated_at"))
        .or_else(|| as_ms(root.get("version")))
        .unwrap_or(delivered_at.saturating_mul(1000));
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream: "user",
        subject,
        back_ref: bounded(str_at(data, "/usersync_key"), "usersync_key")?,
        email: str_at(data, "/email").map(str::to_string),
        version,
        values: match action {
            Action::Upsert => map_values(data, mapping),
            _ => Map::new(),
        },
        idempotency_key: None,
    })
}

/// One object read from a provider's list API (`usersync import`, `reconcile
/// --fix pull`) as the record its webhook would have carried: the same
/// subject, back-reference, email and mapped values. The list gives no event,
/// so the caller names the event id and the version: Clerk's `updated_at`
/// where the object has one, else the time of the listing.
pub fn from_listed(
    kind: SourceKind,
    object: &Value,
    mapping: &[(String, Field)],
    event_id: String,
    listed_at_ms: i64,
) -> Result<InboundRecord, EventError> {
    let subject = required(str_at(object, "/id"), "id")?;
    let (stream, back_ref, email, version) = match kind {
        SourceKind::Clerk => (
            "user",
            str_at(object, "/external_id"),
            clerk_primary_email(object).and_then(|v| v.as_str().map(str::to_string)),
            as_ms(object.get("updated_at")).unwrap_or(listed_at_ms),
        ),
        SourceKind::Memberstack => (
            "member",
            str_at(object, "/metaData/usersync_key")
                .or_else(|| str_at(object, "/metadata/usersync_key")),
            str_at(object, "/auth/email").map(str::to_string),
            listed_at_ms,
        ),
        SourceKind::Stripe => (
            "customer",
            str_at(object, "/metadata/usersync_key"),
            str_at(object, "/email").map(str::to_string),
            listed_at_ms,
        ),
        SourceKind::Standard => (
            "user",
            str_at(object, "/usersync_key"),
            str_at(object, "/email").map(str::to_string),
            as_ms(object.get("updated_at")).unwrap_or(listed_at_ms),
        ),
    };
    Ok(InboundRecord {
        event_id,
        event_type: format!("{}.listed", kind.name()),
        action: Action::Upsert,
        stream,
        subject,
        back_ref: bounded(back_ref, "usersync_key")?,
        email: bounded(email.as_deref(), "email")?,
        version,
        values: map_values(object, mapping),
        idempotency_key: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapping() -> Vec<(String, Field)> {
        vec![
            ("email".into(), Field::PrimaryEmail),
            ("name".into(), Field::Pointer("/first_name".into())),
        ]
    }

    #[test]
    fn clerk_user_updated_reads_primary_email_and_version() {
        let body = json!({"type": "user.updated", "timestamp": 99, "instance_id": "ins_1",
            "data": {"id": "user_1", "primary_email_address_id": "idn_2", "external_id": "42",
              "email_addresses": [{"id": "idn_1", "email_address": "old@x.io"},
                                  {"id": "idn_2", "email_address": "new@x.io"}],
              "first_name": "Ada", "updated_at": 1700000000123i64}});
        let r = parse(
            SourceKind::Clerk,
            body.to_string().as_bytes(),
            Some("msg_1"),
            0,
            &mapping(),
        )
        .expect("parses");
        assert_eq!(r.action, Action::Upsert);
        assert_eq!(r.version, 1_700_000_000_123);
        assert_eq!(r.back_ref.as_deref(), Some("42"));
        assert_eq!(r.email.as_deref(), Some("new@x.io"));
        assert_eq!(r.values.get("email"), Some(&json!("new@x.io")));
        assert_eq!(r.values.get("name"), Some(&json!("Ada")));
        let deleted = json!({"type": "user.deleted", "timestamp": 1700000000999i64,
            "data": {"id": "user_1", "deleted": true}});
        let r = parse(
            SourceKind::Clerk,
            deleted.to_string().as_bytes(),
            Some("msg_2"),
            0,
            &mapping(),
        )
        .expect("parses");
        assert_eq!((r.action, r.version), (Action::Delete, 1_700_000_000_999));
        assert!(r.values.is_empty());
    }

    #[test]
    fn memberstack_accepts_payload_or_data() {
        for envelope in ["payload", "data"] {
            let body = json!({"event": "member.updated", "timestamp": 5,
                envelope: {"id": "mem_1", "auth": {"email": "a@x.io"}, "metaData": {"usersync_key": "7"}}});
            let m = vec![("email".to_string(), Field::AuthEmail)];
            let r = parse(
                SourceKind::Memberstack,
                body.to_string().as_bytes(),
                Some("m"),
                0,
                &m,
            )
            .expect("parses");
            assert_eq!(r.subject, "mem_1");
            assert_eq!(r.back_ref.as_deref(), Some("7"));
            assert_eq!(r.values.get("email"), Some(&json!("a@x.io")));
            assert_eq!(r.version, 5);
        }
    }

    #[test]
    fn stripe_subscription_matches_through_the_customer() {
        let body = json!({"id": "evt_1", "type": "customer.subscription.updated", "created": 10,
            "data": {"object": {"id": "sub_1", "customer": "cus_9", "status": "active"}},
            "request": {"idempotency_key": "k1"}});
        let m = vec![("plan".to_string(), Field::Pointer("/status".into()))];
        let r =
            parse(SourceKind::Stripe, body.to_string().as_bytes(), None, 0, &m).expect("parses");
        assert_eq!(
            (r.action, r.stream, r.subject.as_str()),
            (Action::Update, "subscription", "cus_9")
        );
        assert_eq!(r.version, 10_000);
        assert_eq!(r.idempotency_key.as_deref(), Some("k1"));
    }

    #[test]
    fn newer_wins_and_a_tombstone_holds() {
        assert!(supersedes((2, false), (1, false)));
        assert!(!supersedes((1, false), (2, false)));
        assert!(
            !supersedes((1, false), (2, true)),
            "older create after delete"
        );
        assert!(!supersedes((2, false), (2, true)), "tie with the tombstone");
        assert!(supersedes((2, true), (2, false)), "a delete wins a tie");
        assert!(
            supersedes((3, false), (2, true)),
            "a newer create after a delete"
        );
        assert!(supersedes((2, false), (2, false)));
        assert!(supersedes((0, false), (i64::MIN, false)));
    }

    #[test]
    fn hostile_bodies_are_errors_not_panics() {
        for body in [
            &b"nope"[..],
            b"[]",
            b"{}",
            br#"{"type":"user.created","data":{"id":5}}"#,
        ] {
            assert!(parse(SourceKind::Clerk, body, Some("m"), 0, &[]).is_err());
            assert!(parse(SourceKind::Stripe, body, None, 0, &[]).is_err());
        }
        let long = "x".repeat(300);
        let body = json!({"type": "user.created", "data": {"id": long, "updated_at": 1}});
        assert_eq!(
            parse(
                SourceKind::Clerk,
                body.to_string().as_bytes(),
                Some("m"),
                0,
                &[]
            ),
            Err(EventError::TooLong("data.id"))
        );
    }
}
