//! `[sink.mapping]`: which users column feeds which field of the external
//! record. Field paths use dots for nesting (`customFields.first-name`,
//! `metadata.plan`). The vendor sinks turn the result into their own format.

use serde_json::{Map, Value};

/// The metadata key that ties every external record to its row.
pub const KEY_METADATA: &str = "usersync_key";

/// Builds the nested object for `data` per `mapping` (field path, column).
/// Columns absent from `data` (not sent) are left out, not nulled.
pub fn apply(mapping: &[(String, String)], data: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (path, column) in mapping {
        let Some(value) = data.get(column) else {
            continue;
        };
        insert_path(&mut out, path, value.clone());
    }
    out
}

/// Sets `path` (dot-separated) in `obj`, creating objects on the way.
pub fn insert_path(obj: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts = path.split('.').peekable();
    let mut cur = obj;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            cur.insert(part.to_string(), value);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        match entry {
            Value::Object(m) => cur = m,
            _ => return,
        }
    }
}

/// A JSON value as the plain string a form field or string-only API wants.
pub fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_paths_and_missing_columns() {
        let mapping = vec![
            ("email".to_string(), "email".to_string()),
            (
                "customFields.first-name".to_string(),
                "first_name".to_string(),
            ),
            ("metadata.plan".to_string(), "plan".to_string()),
            ("metadata.team".to_string(), "team".to_string()),
        ];
        let data = json!({"email": "a@x", "first_name": "Ada", "plan": "pro", "other": 1});
        let out = apply(&mapping, data.as_object().unwrap());
        assert_eq!(
            Value::Object(out),
            json!({"email": "a@x", "customFields": {"first-name": "Ada"}, "metadata": {"plan": "pro"}})
        );
        assert_eq!(as_text(&json!(5)), Some("5".into()));
        assert_eq!(as_text(&Value::Null), None);
    }

    /// Two fields of one nested object both land in it (the second must
    /// not replace the object the first created), and a path through a
    /// scalar turns it into an object.
    #[test]
    fn paths_share_their_parent_objects() {
        let mut out = Map::new();
        insert_path(&mut out, "metaData.plan", json!("pro"));
        insert_path(&mut out, "metaData.usersync_key", json!("1"));
        insert_path(&mut out, "json.a.b", json!(1));
        insert_path(&mut out, "json.a.c", json!(2));
        assert_eq!(
            Value::Object(out.clone()),
            json!({"metaData": {"plan": "pro", "usersync_key": "1"}, "json": {"a": {"b": 1, "c": 2}}})
        );
        insert_path(&mut out, "json.a.b.d", json!(3));
        assert_eq!(out["json"]["a"]["b"], json!({"d": 3}));
    }
}
