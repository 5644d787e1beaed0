//! What the users table's non-builtin array and domain types are made of,
//! read from the catalog: pgoutput's Type messages name a type but do not
//! say that `_mood` is an array of the enum `mood` or that `age` is a domain
//! over `int`, and without that their values would be pushed as literals.

use tokio_postgres::Client;

use crate::core::names::TableName;
use crate::source::value::{TypeKind, TypeRegistry};
use crate::store::db::DbError;

/// Every domain and array type the table's columns use, followed down to
/// their element and base types.
const KINDS_SQL: &str = "WITH RECURSIVE t(oid) AS ( \
       SELECT a.atttypid FROM pg_attribute a \
        WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
     UNION \
       SELECT CASE WHEN ty.typtype = 'd' THEN ty.typbasetype ELSE ty.typelem END \
         FROM pg_type ty JOIN t ON ty.oid = t.oid \
        WHERE ty.typtype = 'd' OR (ty.typcategory = 'A' AND ty.typelem <> 0) \
     ) \
     SELECT ty.oid, ty.typtype::text, ty.typelem, ty.typbasetype, ty.typdelim::text \
       FROM pg_type ty JOIN t ON ty.oid = t.oid \
      WHERE ty.typtype = 'd' OR (ty.typcategory = 'A' AND ty.typelem <> 0)";

/// Records the kinds of the table's array and domain types in `types`.
pub async fn load_kinds(
    client: &Client,
    table: &TableName,
    types: &mut TypeRegistry,
) -> Result<(), DbError> {
    let ctx = DbError::ctx("reading the users table's array and domain types");
    for row in client
        .query(KINDS_SQL, &[&table.quoted()])
        .await
        .map_err(ctx)?
    {
        let oid: u32 = row.try_get(0).map_err(ctx)?;
        let typtype: String = row.try_get(1).map_err(ctx)?;
        let kind = if typtype == "d" {
            TypeKind::Domain {
                base: row.try_get(3).map_err(ctx)?,
            }
        } else {
            let delimiter: String = row.try_get(4).map_err(ctx)?;
            TypeKind::Array {
                element: row.try_get(2).map_err(ctx)?,
                delimiter: delimiter.bytes().next().unwrap_or(b','),
            }
        };
        types.set_kind(oid, kind);
    }
    Ok(())
}
