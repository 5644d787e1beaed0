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

    /// The version stream of the user object itself (what `upsert` and
    /// `delete` events are about, and what an import lists).
    pub fn user_stream(self) -> &'static str {
        match self {
            SourceKind::Clerk | SourceKind::Standard => "user",
            SourceKind::Memberstack => "member",
            SourceKind::Stripe => "customer",
        }
    }

    /// The other objects whose events update a user (never create one),
    /// each its own version stream and mapping prefix (`subscription:/…`).
    pub fn object_streams(self) -> &'static [&'static str] {
        match self {
            SourceKind::Stripe => &["subscription", "checkout"],
            SourceKind::Memberstack => &["plan"],
            SourceKind::Clerk | SourceKind::Standard => &[],
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
    /// `<stream>:<pointer>`: a pointer into another object of the same
    /// provider that events carry (a Stripe subscription or checkout
    /// session, a Memberstack plan connection's payload). The plain forms
    /// read only the user object (customer, member, Clerk user): a Stripe
    /// subscription and checkout session have `status`, `description`,
    /// `metadata` too, and must not overwrite the customer's columns.
    Object { stream: String, pointer: String },
}

impl Field {
    /// `primary_email`, `auth_email`, a pointer starting with `/`, or
    /// `<stream>:<pointer>` (the stream a lower-case word; the config checks
    /// that the source's kind has it).
    pub fn parse(s: &str) -> Option<Field> {
        match s {
            "primary_email" => Some(Field::PrimaryEmail),
            "auth_email" => Some(Field::AuthEmail),
            p if p.starts_with('/') => Some(Field::Pointer(p.to_string())),
            other => {
                let (stream, pointer) = other.split_once(':')?;
                let word = !stream.is_empty() && stream.chars().all(|c| c.is_ascii_lowercase());
                (word && pointer.starts_with('/')).then(|| Field::Object {
                    stream: stream.to_string(),
                    pointer: pointer.to_string(),
                })
            }
        }
    }

    /// The stream this field reads, `None` for the user object.
    pub fn stream(&self) -> Option<&str> {
        match self {
            Field::Object { stream, .. } => Some(stream),
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
    /// The id of the object the event is about when it is not the user
    /// (`sub_…`, `cs_…`, a plan connection's `con_…`): what a fetch of the
    /// current state asks for.
    pub object_id: Option<String>,
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

impl InboundRecord {
    /// An event of another object than the user (subscription, checkout,
    /// plan) with no field mapped for that object has nothing to write:
    /// it is ignored, rather than touching the row (and its version) for
    /// nothing.
    fn nothing_mapped_is_ignored(mut self) -> InboundRecord {
        if self.action == Action::Update && self.values.is_empty() {
            self.action = Action::Ignore;
        }
        self
    }
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

/// The mapped values of `object`, which is the user object when `stream`
/// is `None`, else that stream's object: each field reads only its own.
fn map_values(
    object: &Value,
    mapping: &[(String, Field)],
    stream: Option<&str>,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (column, field) in mapping {
        if field.stream() != stream {
            continue;
        }
        let value = match field {
            Field::Pointer(p) | Field::Object { pointer: p, .. } => object.pointer(p).cloned(),
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
        Action::Upsert => map_values(data, mapping, None),
        _ => Map::new(),
    };
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream: "user",
        subject,
        object_id: None,
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
    let payload = root
        .get("payload")
        .or_else(|| root.get("data"))
        .ok_or(EventError::Missing("payload"))?;
    let member = payload.get("member").unwrap_or(payload);
    let subject = required(str_at(member, "/id"), "payload.id")?;
    let version = as_ms(root.get("timestamp")).unwrap_or(delivered_at.saturating_mul(1000));
    // Plan events are named `member.plan.added` in one place of the docs
    // and `member.plan.created` in another; both (and `updated`,
    // `canceled`, …) update the user. They carry the member's id and one
    // plan connection, not the member: they are their own stream, and
    // their fields (`plan:/planConnection/status`) read the payload.
    let action = match event_type.as_str() {
        "member.created" | "member.updated" => Action::Upsert,
        "member.deleted" => Action::Delete,
        t if t.starts_with("member.plan.") => Action::Update,
        _ => Action::Ignore,
    };
    let values = match action {
        Action::Upsert => map_values(member, mapping, None),
        Action::Update => map_values(payload, mapping, Some("plan")),
        _ => Map::new(),
    };
    let plan = action == Action::Update;
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream: if plan { "plan" } else { "member" },
        subject,
        object_id: if plan {
            bounded(str_at(payload, "/planConnection/id"), "planConnection.id")?
        } else {
            None
        },
        back_ref: bounded(
            str_at(member, "/metaData/usersync_key")
                .or_else(|| str_at(member, "/metadata/usersync_key")),
            "usersync_key",
        )?,
        email: str_at(member, "/auth/email").map(str::to_string),
        version,
        values,
        idempotency_key: None,
    }
    .nothing_mapped_is_ignored())
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
    // A subscription's or session's `customer` is an id, or the customer
    // itself where a request expanded it.
    let customer = str_at(object, "/customer").or_else(|| str_at(object, "/customer/id"));
    let (mut action, stream, subject) = match event_type.as_str() {
        "customer.created" | "customer.updated" => {
            (Action::Upsert, "customer", str_at(object, "/id"))
        }
        "customer.deleted" => (Action::Delete, "customer", str_at(object, "/id")),
        t if t.starts_with("customer.subscription.") => (Action::Update, "subscription", customer),
        // The async events end a delayed payment (bank debits) and carry
        // the same Checkout Session object as `completed`.
        "checkout.session.completed"
        | "checkout.session.async_payment_succeeded"
        | "checkout.session.async_payment_failed" => (Action::Update, "checkout", customer),
        _ => (Action::Ignore, "other", str_at(object, "/id")),
    };
    // A one-time payment's session may have made no customer: nothing
    // links it to a user.
    if stream == "checkout" && customer.is_none() {
        action = Action::Ignore;
    }
    let subject = match action {
        Action::Ignore => bounded(subject, "data.object.id")?.unwrap_or_default(),
        _ => required(subject, "the customer id")?,
    };
    let values = match action {
        Action::Upsert => map_values(object, mapping, None),
        Action::Update => map_values(object, mapping, Some(stream)),
        _ => Map::new(),
    };
    // What else can find the user: the customer's `usersync_key` metadata
    // and email; a checkout session's `client_reference_id` (the app's own
    // user id, which is what Stripe's docs tell apps to put there) and the
    // email the buyer typed.
    let (back_ref, email) = match stream {
        "customer" => (
            str_at(object, "/metadata/usersync_key"),
            str_at(object, "/email"),
        ),
        "checkout" => (
            str_at(object, "/client_reference_id"),
            str_at(object, "/customer_details/email"),
        ),
        _ => (None, None),
    };
    Ok(InboundRecord {
        event_id,
        event_type,
        action,
        stream,
        subject,
        object_id: match stream {
            "subscription" | "checkout" => bounded(str_at(object, "/id"), "data.object.id")?,
            _ => None,
        },
        back_ref: bounded(back_ref, "usersync_key")?,
        email: email.map(str::to_string),
        version: created.saturating_mul(1000),
        values,
        idempotency_key: bounded(str_at(root, "/request/idempotency_key"), "idempotency_key")?,
    }
    .nothing_mapped_is_ignored())
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
        object_id: None,
        back_ref: bounded(str_at(data, "/usersync_key"), "usersync_key")?,
        email: str_at(data, "/email").map(str::to_string),
        version,
        values: match action {
            Action::Upsert => map_values(data, mapping, None),
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
        object_id: None,
        back_ref: bounded(back_ref, "usersync_key")?,
        email: bounded(email.as_deref(), "email")?,
        version,
        values: map_values(object, mapping, None),
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
        let m = vec![
            (
                "plan".to_string(),
                Field::parse("subscription:/status").expect("field"),
            ),
            ("note".to_string(), Field::Pointer("/description".into())),
        ];
        let r =
            parse(SourceKind::Stripe, body.to_string().as_bytes(), None, 0, &m).expect("parses");
        assert_eq!(
            (r.action, r.stream, r.subject.as_str()),
            (Action::Update, "subscription", "cus_9")
        );
        assert_eq!(r.object_id.as_deref(), Some("sub_1"));
        assert_eq!(r.version, 10_000);
        assert_eq!(r.idempotency_key.as_deref(), Some("k1"));
        assert_eq!(r.values.get("plan"), Some(&json!("active")));
        assert!(
            !r.values.contains_key("note"),
            "a customer field read a subscription"
        );
        // The customer's fields read customers only.
        let customer = json!({"id": "evt_2", "type": "customer.updated", "created": 11,
            "data": {"object": {"id": "cus_9", "status": "x", "description": "vip"}}});
        let r = parse(
            SourceKind::Stripe,
            customer.to_string().as_bytes(),
            None,
            0,
            &m,
        )
        .expect("parses");
        assert_eq!(r.values.get("note"), Some(&json!("vip")));
        assert!(!r.values.contains_key("plan"));
        // Nothing mapped for checkout sessions: ignored, not written.
        let checkout = json!({"id": "evt_3", "type": "checkout.session.completed", "created": 12,
            "data": {"object": {"id": "cs_1", "customer": "cus_9", "status": "complete",
                                "client_reference_id": "42"}}});
        let r = parse(
            SourceKind::Stripe,
            checkout.to_string().as_bytes(),
            None,
            0,
            &m,
        )
        .expect("parses");
        assert_eq!(r.action, Action::Ignore);
        let m = vec![(
            "paid".to_string(),
            Field::parse("checkout:/payment_status").expect("field"),
        )];
        let paid = json!({"id": "evt_4", "type": "checkout.session.completed", "created": 12,
            "data": {"object": {"id": "cs_1", "customer": "cus_9", "payment_status": "paid",
                                "client_reference_id": "42",
                                "customer_details": {"email": "b@x.io"}}}});
        let r =
            parse(SourceKind::Stripe, paid.to_string().as_bytes(), None, 0, &m).expect("parses");
        assert_eq!(
            (
                r.action,
                r.stream,
                r.subject.as_str(),
                r.object_id.as_deref()
            ),
            (Action::Update, "checkout", "cus_9", Some("cs_1"))
        );
        assert_eq!(r.back_ref.as_deref(), Some("42"));
        assert_eq!(r.email.as_deref(), Some("b@x.io"));
        assert_eq!(r.values.get("paid"), Some(&json!("paid")));
        // A delayed payment method (bank debit) ends in one of the async
        // events, which carry the same Checkout Session object.
        for (t, status) in [
            ("checkout.session.async_payment_succeeded", "paid"),
            ("checkout.session.async_payment_failed", "unpaid"),
        ] {
            let later = json!({"id": "evt_5", "type": t, "created": 13,
                "data": {"object": {"id": "cs_1", "customer": "cus_9",
                                    "payment_status": status, "client_reference_id": "42"}}});
            let r = parse(
                SourceKind::Stripe,
                later.to_string().as_bytes(),
                None,
                0,
                &m,
            )
            .expect("parses");
            assert_eq!(
                (
                    r.action,
                    r.stream,
                    r.subject.as_str(),
                    r.object_id.as_deref()
                ),
                (Action::Update, "checkout", "cus_9", Some("cs_1")),
                "{t}"
            );
            assert_eq!(r.values.get("paid"), Some(&json!(status)), "{t}");
        }
    }

    #[test]
    fn memberstack_plan_events_read_either_name_and_envelope() {
        let m = vec![
            (
                "plan".to_string(),
                Field::parse("plan:/planConnection/planId").expect("field"),
            ),
            ("email".to_string(), Field::AuthEmail),
        ];
        for (name, envelope) in [
            ("member.plan.added", "payload"),
            ("member.plan.created", "data"),
            ("member.plan.updated", "payload"),
            ("member.plan.canceled", "data"),
        ] {
            let body = json!({"event": name, "timestamp": 7,
                envelope: {"id": "mem_1", "planConnection": {"id": "con_1", "planId": "pln_gold",
                                                           "status": "ACTIVE"}}});
            let r = parse(
                SourceKind::Memberstack,
                body.to_string().as_bytes(),
                Some("m"),
                0,
                &m,
            )
            .expect("parses");
            assert_eq!(
                (
                    r.action,
                    r.stream,
                    r.subject.as_str(),
                    r.object_id.as_deref()
                ),
                (Action::Update, "plan", "mem_1", Some("con_1")),
                "{name}"
            );
            assert_eq!(r.values.get("plan"), Some(&json!("pln_gold")), "{name}");
            assert!(!r.values.contains_key("email"));
        }
    }

    #[test]
    fn object_fields_parse() {
        assert_eq!(
            Field::parse("subscription:/items/data/0/price/id"),
            Some(Field::Object {
                stream: "subscription".into(),
                pointer: "/items/data/0/price/id".into()
            })
        );
        assert_eq!(Field::parse("Sub:/x"), None);
        assert_eq!(Field::parse("plan:x"), None);
        assert_eq!(Field::parse(":/x"), None);
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
