//! Turns decoded pgoutput tuples of the users table into `Change`s: keeps the
//! relation and type caches current (ALTER TABLE mid-stream sends a new
//! Relation message), restricts rows to the synced columns, recovers
//! unchanged TOASTed values from the old row, and drops updates that change
//! no synced column.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde_json::{Map, Value};

use super::pgoutput::{ColumnValue, OldTuple, Relation, TupleData};
use super::value::{text_to_json, TypeRegistry, ValueError};
use crate::config::TableName;
use crate::core::change::{Change, Lsn, Operation, UserKey};
use crate::core::table::EXTERNAL_ID_COLUMN;
use crate::core::table::SYNCED_AT_COLUMN;

#[derive(Debug, thiserror::Error)]
pub enum RowError {
    #[error("change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
    #[error("the users table no longer has its key column {0}, and no single other column takes its place (was it dropped, or renamed along with other column changes?); restore it, or start usersync again once it is the primary key under its new name")]
    KeyColumnGone(String),
    #[error("the tuple has {got} columns but relation {table} has {expected}")]
    ColumnCount {
        table: String,
        expected: usize,
        got: usize,
    },
    #[error("the key column {0} is NULL or was not sent")]
    KeyMissing(String),
    #[error("column {column}: {source}")]
    Value { column: String, source: ValueError },
}

impl crate::core::error::Classify for RowError {
    /// Each of these stops the session for good: retrying decodes the same
    /// message again. A key column renamed or dropped mid-stream is the
    /// operator's to know about, and like every failure after streaming
    /// began it is a runtime stop (exit 1, `app::run`): the next start reads
    /// the primary key's new name and decodes the change again from the
    /// slot's confirmed position.
    fn kind(&self) -> crate::core::error::ErrorKind {
        crate::core::error::ErrorKind::Permanent
    }
}

/// Where a change sits in the stream, for its event id and time.
#[derive(Debug, Clone, Copy)]
pub struct TxnPosition {
    pub commit_lsn: Lsn,
    pub xid: u32,
    pub commit_time_us: i64,
    pub position: u32,
}

/// One decoded column: a value, PostgreSQL's "unchanged TOAST, not sent",
/// or a value that cannot be converted to JSON (a fault of this one row,
/// never of the stream).
enum Cell {
    Value(Value),
    Unchanged,
    Failed(ValueError),
}

fn mark_unconvertible(change: &mut Change, column: &str, error: &ValueError) {
    tracing::warn!(
        event_id = %change.event_id,
        column,
        error = %error,
        "a value of this change cannot be converted to JSON; the change is refused for this user"
    );
    // The first one names the change's dead letter; the others are logged.
    if change.unconvertible.is_none() {
        change.unconvertible = Some(format!("{column}: {error}"));
    }
}

/// A sync request as the stream carries it.
#[derive(Debug, Clone)]
pub struct RequestRow {
    pub id: i64,
    pub key: String,
    /// `recover` asked for a delete when the row is gone.
    pub delete_if_gone: bool,
    /// The external id such a delete names (from the sync log).
    pub external_id: Option<String>,
}

pub struct RowBuilder {
    table: TableName,
    table_label: String,
    key_column: String,
    /// Synced columns; `None` means every column but the two sync columns.
    columns: Option<HashSet<String>>,
    relations: HashMap<u32, Relation>,
    types: TypeRegistry,
    /// Synced columns the server does not stream (generated columns before
    /// PostgreSQL 18): named in every insert's and update's `omitted`.
    not_streamed: Vec<String>,
    /// Every column of the table as the catalog had it at session start:
    /// finds the key of a change decoded under a relation from before a
    /// rename of the key column.
    table_columns: HashSet<String>,
}

impl RowBuilder {
    pub fn new(table: TableName, key_column: String, columns: &[String]) -> Self {
        RowBuilder {
            table_label: table.to_string(),
            table,
            key_column,
            columns: if columns.is_empty() {
                None
            } else {
                Some(columns.iter().cloned().collect())
            },
            relations: HashMap::new(),
            types: TypeRegistry::default(),
            not_streamed: Vec::new(),
            table_columns: HashSet::new(),
        }
    }

    /// A relation without the key column is not refused here but when one
    /// of its changes needs the key (`key_of`): after a rename of the key
    /// column a restart replays from before it, and the Relation messages
    /// of the skipped transactions there (our own write-backs) still carry
    /// the old name.
    pub fn on_relation(&mut self, rel: Relation) {
        self.relations.insert(rel.id, rel);
    }

    /// The catalog's word on the table's array and domain types, read at
    /// session start (`store::types`).
    pub fn with_types(mut self, types: TypeRegistry) -> Self {
        self.types = types;
        self
    }

    /// Columns the stream cannot carry (see `store::catalog::
    /// unstreamed_generated_columns`); the synced ones among them are
    /// listed in `omitted`, so a receiver knows they exist but were not sent.
    pub fn with_not_streamed(mut self, columns: Vec<String>) -> Self {
        let synced: Vec<String> = columns.into_iter().filter(|c| self.synced(c)).collect();
        self.not_streamed = synced;
        self
    }

    /// The table's columns at session start (`TableShape::columns`).
    pub fn with_table_columns<'a>(mut self, columns: impl IntoIterator<Item = &'a str>) -> Self {
        self.table_columns = columns.into_iter().map(str::to_string).collect();
        self
    }

    pub fn on_type(&mut self, oid: u32, namespace: String, name: String) {
        self.types.insert(oid, namespace, name);
    }

    fn is_users(&self, rel: &Relation) -> bool {
        rel.namespace == self.table.schema && rel.name == self.table.name
    }

    /// Whether `rel_id` is the users table (changes to other tables in the
    /// publication are not ours to push).
    pub fn is_users_relation(&self, rel_id: u32) -> Result<bool, RowError> {
        self.relations
            .get(&rel_id)
            .map(|r| self.is_users(r))
            .ok_or(RowError::UnknownRelation(rel_id))
    }

    fn synced(&self, column: &str) -> bool {
        match &self.columns {
            Some(set) => set.contains(column) || column == self.key_column,
            None => column != EXTERNAL_ID_COLUMN && column != SYNCED_AT_COLUMN,
        }
    }

    /// The tuple's synced columns and the external id, decoded; the rest
    /// (external_synced_at, unmapped columns) is skipped unparsed: decoding
    /// is most of the daemon's CPU per change (BENCHMARKS.md).
    fn decode(&self, rel: &Relation, tuple: &TupleData) -> Result<Vec<(String, Cell)>, RowError> {
        if tuple.0.len() != rel.columns.len() {
            return Err(RowError::ColumnCount {
                table: self.table_label.clone(),
                expected: rel.columns.len(),
                got: tuple.0.len(),
            });
        }
        Ok(rel
            .columns
            .iter()
            .zip(&tuple.0)
            .filter(|(col, _)| col.name == EXTERNAL_ID_COLUMN || self.synced(&col.name))
            .map(|(col, v)| {
                let cell = match v {
                    ColumnValue::Null => Cell::Value(Value::Null),
                    ColumnValue::UnchangedToast => Cell::Unchanged,
                    ColumnValue::Text(b) | ColumnValue::Binary(b) => {
                        match text_to_json(col.type_oid, b, &self.types) {
                            Ok(v) => Cell::Value(v),
                            Err(e) => Cell::Failed(e),
                        }
                    }
                };
                (col.name.clone(), cell)
            })
            .collect())
    }

    /// The key, and the key column's conversion error if its value cannot
    /// be converted (the key then travels as its text).
    fn key_of(
        &self,
        rel: &Relation,
        tuple: &TupleData,
    ) -> Result<(UserKey, Option<ValueError>), RowError> {
        let idx = rel
            .columns
            .iter()
            .position(|c| c.name == self.key_column)
            .or_else(|| self.renamed_key(rel))
            .ok_or_else(|| RowError::KeyColumnGone(self.key_column.clone()))?;
        match tuple.0.get(idx) {
            Some(ColumnValue::Text(b)) | Some(ColumnValue::Binary(b)) => {
                let text = String::from_utf8_lossy(b).into_owned();
                match text_to_json(rel.columns[idx].type_oid, b, &self.types) {
                    Ok(json) => Ok((UserKey { text, json }, None)),
                    Err(e) => Ok((
                        UserKey {
                            json: Value::String(text.clone()),
                            text,
                        },
                        Some(e),
                    )),
                }
            }
            _ => Err(RowError::KeyMissing(self.key_column.clone())),
        }
    }

    /// A relation without the key column: the key was renamed since (a
    /// restart replays changes from before the rename under the name the
    /// catalog has now) or is being renamed while streaming. When exactly
    /// one of the relation's columns is unknown to the table as it was at
    /// session start, that column is the key under its other name; with
    /// more than one the key cannot be told, and the change fails.
    fn renamed_key(&self, rel: &Relation) -> Option<usize> {
        if self.table_columns.is_empty() {
            return None;
        }
        let mut unknown = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !self.table_columns.contains(&c.name))
            .map(|(i, _)| i);
        match (unknown.next(), unknown.next()) {
            (Some(i), None) => Some(i),
            _ => None,
        }
    }

    fn external_id(cells: &[(String, Cell)]) -> Option<String> {
        cells.iter().find_map(|(name, cell)| match cell {
            Cell::Value(Value::String(s)) if name == EXTERNAL_ID_COLUMN && !s.is_empty() => {
                Some(s.clone())
            }
            _ => None,
        })
    }

    fn relation(&self, rel_id: u32) -> Result<&Relation, RowError> {
        self.relations
            .get(&rel_id)
            .ok_or(RowError::UnknownRelation(rel_id))
    }

    /// `base_change`, marked when the key could not be converted.
    fn keyed_change(
        &self,
        op: Operation,
        (key, key_error): (UserKey, Option<ValueError>),
        at: TxnPosition,
    ) -> Change {
        let mut change = self.base_change(op, key, at);
        if let Some(e) = key_error {
            mark_unconvertible(&mut change, &self.key_column, &e);
        }
        change
    }

    /// Marks every failed synced cell of the new row.
    fn mark_failed(&self, change: &mut Change, cells: &[(String, Cell)]) {
        for (name, cell) in cells {
            if let Cell::Failed(e) = cell {
                if self.synced(name) {
                    mark_unconvertible(change, name, e);
                    if change.op == Operation::Update {
                        change.changed.push(name.clone());
                    }
                }
            }
        }
    }

    fn base_change(&self, op: Operation, key: UserKey, at: TxnPosition) -> Change {
        Change {
            event_id: Change::event_id_for(at.commit_lsn, at.position),
            op,
            key,
            table: self.table_label.clone(),
            commit_lsn: at.commit_lsn,
            position: at.position,
            xid: at.xid,
            commit_time_us: at.commit_time_us,
            data: None,
            previous: None,
            changed: Vec::new(),
            omitted: match op {
                Operation::Delete => Vec::new(),
                _ => self.not_streamed.clone(),
            },
            external_id: None,
            unconvertible: None,
            decoded_at: Instant::now(),
        }
    }

    fn synced_map(&self, cells: Vec<(String, Cell)>) -> Map<String, Value> {
        cells
            .into_iter()
            .filter(|(name, _)| self.synced(name))
            .filter_map(|(name, cell)| match cell {
                Cell::Value(v) => Some((name, v)),
                Cell::Unchanged | Cell::Failed(_) => None,
            })
            .collect()
    }

    pub fn insert(
        &self,
        rel_id: u32,
        new: &TupleData,
        at: TxnPosition,
    ) -> Result<Change, RowError> {
        let rel = self.relation(rel_id)?;
        let key = self.key_of(rel, new)?;
        let cells = self.decode(rel, new)?;
        let mut change = self.keyed_change(Operation::Insert, key, at);
        change.external_id = Self::external_id(&cells);
        self.mark_failed(&mut change, &cells);
        let data = self.synced_map(cells);
        change.changed = data.keys().cloned().collect();
        change.data = Some(data);
        Ok(change)
    }

    /// `None` when no synced column changed: nothing to push.
    pub fn update(
        &self,
        rel_id: u32,
        old: Option<&OldTuple>,
        new: &TupleData,
        at: TxnPosition,
    ) -> Result<Option<Change>, RowError> {
        let rel = self.relation(rel_id)?;
        let key = self.key_of(rel, new)?;
        let new_cells = self.decode(rel, new)?;
        let old_cells = match old {
            Some(OldTuple::Full(t)) => Some(self.decode(rel, t)?),
            // A key-only old tuple says nothing about other columns' old values.
            Some(OldTuple::Key(_)) | None => None,
        };
        let mut change = self.keyed_change(Operation::Update, key, at);
        self.mark_failed(&mut change, &new_cells);
        change.external_id = Self::external_id(&new_cells)
            .or_else(|| old_cells.as_deref().and_then(Self::external_id));
        let old_value = |name: &str| -> Option<&Value> {
            old_cells.as_ref().and_then(|cells| {
                cells.iter().find_map(|(n, c)| match c {
                    Cell::Value(v) if n == name => Some(v),
                    _ => None,
                })
            })
        };
        let mut data = Map::new();
        for (name, cell) in &new_cells {
            if !self.synced(name) {
                continue;
            }
            match cell {
                Cell::Value(v) => {
                    let differs = match &old_cells {
                        Some(_) => old_value(name) != Some(v),
                        None => true,
                    };
                    if differs {
                        change.changed.push(name.clone());
                    }
                    data.insert(name.clone(), v.clone());
                }
                // Unchanged by definition; carry the real value when the old row has it.
                Cell::Unchanged => match old_value(name) {
                    Some(v) => {
                        data.insert(name.clone(), v.clone());
                    }
                    None => change.omitted.push(name.clone()),
                },
                // Marked above; an old value that failed is only unknown.
                Cell::Failed(_) => {}
            }
        }
        if change.changed.is_empty() {
            return Ok(None);
        }
        change.previous = old_cells.map(|cells| self.synced_map(cells));
        change.data = Some(data);
        Ok(Some(change))
    }

    pub fn delete(&self, rel_id: u32, old: &OldTuple, at: TxnPosition) -> Result<Change, RowError> {
        let rel = self.relation(rel_id)?;
        let tuple = match old {
            OldTuple::Full(t) | OldTuple::Key(t) => t,
        };
        let key = self.key_of(rel, tuple)?;
        // A value of the old row that cannot be converted only leaves that
        // column out of `previous`: the delete itself must go through.
        let mut change = self.keyed_change(Operation::Delete, key, at);
        if let OldTuple::Full(t) = old {
            let cells = self.decode(rel, t)?;
            change.external_id = Self::external_id(&cells);
            change.previous = Some(self.synced_map(cells));
        }
        Ok(change)
    }

    /// For an INSERT into `usersync.sync_requests`: the request's id, user
    /// key, and whether it asks for a delete (`recover`). `None` for any
    /// other relation.
    pub fn request_of(&self, rel_id: u32, new: &TupleData) -> Result<Option<RequestRow>, RowError> {
        let rel = self.relation(rel_id)?;
        if rel.namespace != crate::core::table::REQUESTS_SCHEMA
            || rel.name != crate::core::table::REQUESTS_TABLE
        {
            return Ok(None);
        }
        let optional = |column: &str| -> Option<String> {
            let idx = rel.columns.iter().position(|c| c.name == column)?;
            match new.0.get(idx) {
                Some(ColumnValue::Text(b)) | Some(ColumnValue::Binary(b)) => {
                    Some(String::from_utf8_lossy(b).into_owned())
                }
                _ => None,
            }
        };
        let text = |column: &str| -> Result<String, RowError> {
            optional(column)
                .ok_or_else(|| RowError::KeyMissing(format!("usersync.sync_requests.{column}")))
        };
        let id = text("id")?;
        let id = id
            .parse::<i64>()
            .map_err(|_| RowError::KeyMissing("usersync.sync_requests.id".into()))?;
        let delete_if_gone =
            optional("reason").as_deref() == Some(crate::core::table::RECOVER_DELETE_REASON);
        // Only a delete request names a target, and only a bounded one.
        let external_id = optional("external_id").filter(|x| {
            delete_if_gone
                && !x.is_empty()
                && x.len() <= crate::core::table::MAX_REQUEST_EXTERNAL_ID
        });
        Ok(Some(RequestRow {
            id,
            key: text("user_key")?,
            delete_if_gone,
            external_id,
        }))
    }

    /// A request's change: the user's lane reads the row when its turn comes
    /// and fills in the operation, key and data then. A `recover` delete
    /// request starts as the delete it pushes if the row is still gone.
    pub fn request_change(&self, request: &RequestRow, at: TxnPosition) -> Change {
        let key = UserKey {
            json: Value::String(request.key.clone()),
            text: request.key.clone(),
        };
        if request.delete_if_gone {
            let mut change = self.base_change(Operation::Delete, key, at);
            change.external_id = request.external_id.clone();
            return change;
        }
        self.base_change(Operation::Update, key, at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::table::{
        MAX_REQUEST_EXTERNAL_ID, RECOVER_DELETE_REASON, REQUESTS_SCHEMA, REQUESTS_TABLE,
    };
    use crate::source::pgoutput::RelationColumn;

    fn builder_with(namespace: &str, name: &str) -> RowBuilder {
        let mut rows = RowBuilder::new(
            TableName {
                schema: "public".into(),
                name: "users".into(),
            },
            "id".into(),
            &[],
        );
        let column = |name: &str, type_oid: u32| RelationColumn {
            is_key: name == "id",
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        rows.on_relation(Relation {
            id: 1,
            namespace: namespace.into(),
            name: name.into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 20),
                column("user_key", 25),
                column("reason", 25),
                column("external_id", 25),
            ],
        });
        rows
    }

    fn request(rows: &RowBuilder, reason: &str, external_id: &str) -> Option<RequestRow> {
        let text = |s: &str| ColumnValue::Text(s.as_bytes().to_vec().into());
        let tuple = TupleData(vec![text("7"), text("42"), text(reason), text(external_id)]);
        rows.request_of(1, &tuple).expect("a readable request")
    }

    /// Only `usersync.sync_requests` carries requests: a table of that name
    /// in another schema, or another table in usersync's schema, is none.
    /// Only a delete request names an external id, and only a non-empty,
    /// bounded one (the table is writable by hand; an empty id must not
    /// reach a sink as the record to delete).
    #[test]
    fn requests_come_from_the_request_table_and_name_only_a_sound_delete_target() {
        let rows = builder_with(REQUESTS_SCHEMA, REQUESTS_TABLE);
        let delete = request(&rows, RECOVER_DELETE_REASON, "usr_1").expect("a request");
        assert_eq!((delete.id, delete.key.as_str()), (7, "42"));
        assert!(delete.delete_if_gone);
        assert_eq!(delete.external_id.as_deref(), Some("usr_1"));
        let empty = request(&rows, RECOVER_DELETE_REASON, "").expect("a request");
        assert_eq!(empty.external_id, None);
        let long = "x".repeat(MAX_REQUEST_EXTERNAL_ID + 1);
        let long = request(&rows, RECOVER_DELETE_REASON, &long).expect("a request");
        assert_eq!(long.external_id, None);
        let sync = request(&rows, "sync-user", "usr_1").expect("a request");
        assert!(!sync.delete_if_gone);
        assert_eq!(sync.external_id, None);
        for (namespace, name) in [("public", REQUESTS_TABLE), (REQUESTS_SCHEMA, "other")] {
            let rows = builder_with(namespace, name);
            assert!(
                request(&rows, "sync-user", "").is_none(),
                "{namespace}.{name}"
            );
        }
    }
}
