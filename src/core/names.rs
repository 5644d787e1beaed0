//! Names of database objects and how they are quoted into SQL.

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        if s.chars().any(char::is_control) {
            return Err(format!(
                "{:?} holds a control character (a newline, tab or NUL); table names with those are not supported",
                s
            ));
        }
        let parts: Vec<&str> = s.split('.').collect();
        let (schema, name) = match parts.as_slice() {
            [name] => ("public", *name),
            [schema, name] => (*schema, *name),
            _ => return Err(format!("{s:?} is not a table name (use \"schema.table\")")),
        };
        if schema.is_empty() || name.is_empty() {
            return Err(format!("{s:?} is not a table name (use \"schema.table\")"));
        }
        Ok(TableName {
            schema: schema.to_string(),
            name: name.to_string(),
        })
    }

    /// `"schema"."name"`, safe to splice into SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// An identifier quoted for SQL, the same way everywhere: in the statements
/// usersync runs and in every script, hint and message it prints.
pub fn quote_ident(s: &str) -> String {
    postgres_protocol::escape::escape_identifier(s)
}

/// A string literal for SQL (`E'…'` when it holds a backslash).
pub fn quote_literal(s: &str) -> String {
    postgres_protocol::escape::escape_literal(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_a_table_name_are_refused() {
        for bad in [
            "public.users\n; DROP TABLE x; --",
            "users\r",
            "pub\u{0}lic.users",
            "users\t",
        ] {
            let e = TableName::parse(bad).expect_err(bad);
            assert!(e.contains("control character"), "{e}");
        }
        assert!(TableName::parse("public.Users").is_ok());
    }

    #[test]
    fn quoting_keeps_case_and_doubles_quotes() {
        let t = TableName::parse("public.Users").expect("name");
        assert_eq!(t.quoted(), "\"public\".\"Users\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }
}
