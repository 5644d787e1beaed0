//! Conversion of one column value, as PostgreSQL's text output, into JSON.
//!
//! This module owns the mapping from type oid to JSON shape, the names of
//! builtin types and arrays, the registry of non-builtin type names learnt from
//! pgoutput Type messages, and the parser for array literals. It assumes the
//! replication session runs with `DateStyle=ISO`, `TimeZone=UTC`,
//! `IntervalStyle=iso_8601` and `extra_float_digits=3`: the parsers below only
//! accept the shapes PostgreSQL prints under those settings, so a session set
//! up differently fails loudly instead of shipping misread values.
//!
//! Values may be personal data, so errors name the type and the kind of
//! problem but never include any part of the value.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;
use serde_json::Value;

const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const TIMESTAMP: u32 = 1114;
const TIMESTAMPTZ: u32 = 1184;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

/// Builtin non-array types (oid < 10000), sorted by oid. Taken from a
/// PostgreSQL 15 `pg_type`; builtin oids are fixed across versions.
const BUILTIN_TYPES: &[(u32, &str)] = &[
    (16, "bool"),
    (17, "bytea"),
    (18, "char"),
    (19, "name"),
    (20, "int8"),
    (21, "int2"),
    (22, "int2vector"),
    (23, "int4"),
    (24, "regproc"),
    (25, "text"),
    (26, "oid"),
    (27, "tid"),
    (28, "xid"),
    (29, "cid"),
    (30, "oidvector"),
    (114, "json"),
    (142, "xml"),
    (194, "pg_node_tree"),
    (600, "point"),
    (601, "lseg"),
    (602, "path"),
    (603, "box"),
    (604, "polygon"),
    (628, "line"),
    (650, "cidr"),
    (700, "float4"),
    (701, "float8"),
    (718, "circle"),
    (774, "macaddr8"),
    (790, "money"),
    (829, "macaddr"),
    (869, "inet"),
    (1033, "aclitem"),
    (1042, "bpchar"),
    (1043, "varchar"),
    (1082, "date"),
    (1083, "time"),
    (1114, "timestamp"),
    (1184, "timestamptz"),
    (1186, "interval"),
    (1266, "timetz"),
    (1560, "bit"),
    (1562, "varbit"),
    (1700, "numeric"),
    (1790, "refcursor"),
    (2202, "regprocedure"),
    (2203, "regoper"),
    (2204, "regoperator"),
    (2205, "regclass"),
    (2206, "regtype"),
    (2950, "uuid"),
    (2970, "txid_snapshot"),
    (3220, "pg_lsn"),
    (3361, "pg_ndistinct"),
    (3402, "pg_dependencies"),
    (3614, "tsvector"),
    (3615, "tsquery"),
    (3642, "gtsvector"),
    (3734, "regconfig"),
    (3769, "regdictionary"),
    (3802, "jsonb"),
    (3904, "int4range"),
    (3906, "numrange"),
    (3908, "tsrange"),
    (3910, "tstzrange"),
    (3912, "daterange"),
    (3926, "int8range"),
    (4072, "jsonpath"),
    (4089, "regnamespace"),
    (4096, "regrole"),
    (4191, "regcollation"),
    (4451, "int4multirange"),
    (4532, "nummultirange"),
    (4533, "tsmultirange"),
    (4534, "tstzmultirange"),
    (4535, "datemultirange"),
    (4536, "int8multirange"),
    (4600, "pg_brin_bloom_summary"),
    (4601, "pg_brin_minmax_multi_summary"),
    (5017, "pg_mcv_list"),
    (5038, "pg_snapshot"),
    (5069, "xid8"),
];

/// Builtin array types: (array oid, name, element oid, element delimiter),
/// sorted by oid. Only `box` uses a delimiter other than a comma, because its
/// own text contains commas.
const ARRAY_TYPES: &[(u32, &str, u32, u8)] = &[
    (143, "_xml", 142, b','),
    (199, "_json", 114, b','),
    (271, "_xid8", 5069, b','),
    (629, "_line", 628, b','),
    (651, "_cidr", 650, b','),
    (719, "_circle", 718, b','),
    (775, "_macaddr8", 774, b','),
    (791, "_money", 790, b','),
    (1000, "_bool", 16, b','),
    (1001, "_bytea", 17, b','),
    (1002, "_char", 18, b','),
    (1003, "_name", 19, b','),
    (1005, "_int2", 21, b','),
    (1006, "_int2vector", 22, b','),
    (1007, "_int4", 23, b','),
    (1008, "_regproc", 24, b','),
    (1009, "_text", 25, b','),
    (1010, "_tid", 27, b','),
    (1011, "_xid", 28, b','),
    (1012, "_cid", 29, b','),
    (1013, "_oidvector", 30, b','),
    (1014, "_bpchar", 1042, b','),
    (1015, "_varchar", 1043, b','),
    (1016, "_int8", 20, b','),
    (1017, "_point", 600, b','),
    (1018, "_lseg", 601, b','),
    (1019, "_path", 602, b','),
    (1020, "_box", 603, b';'),
    (1021, "_float4", 700, b','),
    (1022, "_float8", 701, b','),
    (1027, "_polygon", 604, b','),
    (1028, "_oid", 26, b','),
    (1034, "_aclitem", 1033, b','),
    (1040, "_macaddr", 829, b','),
    (1041, "_inet", 869, b','),
    (1115, "_timestamp", 1114, b','),
    (1182, "_date", 1082, b','),
    (1183, "_time", 1083, b','),
    (1185, "_timestamptz", 1184, b','),
    (1187, "_interval", 1186, b','),
    (1231, "_numeric", 1700, b','),
    (1270, "_timetz", 1266, b','),
    (1561, "_bit", 1560, b','),
    (1563, "_varbit", 1562, b','),
    (2201, "_refcursor", 1790, b','),
    (2207, "_regprocedure", 2202, b','),
    (2208, "_regoper", 2203, b','),
    (2209, "_regoperator", 2204, b','),
    (2210, "_regclass", 2205, b','),
    (2211, "_regtype", 2206, b','),
    (2949, "_txid_snapshot", 2970, b','),
    (2951, "_uuid", 2950, b','),
    (3221, "_pg_lsn", 3220, b','),
    (3643, "_tsvector", 3614, b','),
    (3644, "_gtsvector", 3642, b','),
    (3645, "_tsquery", 3615, b','),
    (3735, "_regconfig", 3734, b','),
    (3770, "_regdictionary", 3769, b','),
    (3807, "_jsonb", 3802, b','),
    (3905, "_int4range", 3904, b','),
    (3907, "_numrange", 3906, b','),
    (3909, "_tsrange", 3908, b','),
    (3911, "_tstzrange", 3910, b','),
    (3913, "_daterange", 3912, b','),
    (3927, "_int8range", 3926, b','),
    (4073, "_jsonpath", 4072, b','),
    (4090, "_regnamespace", 4089, b','),
    (4097, "_regrole", 4096, b','),
    (4192, "_regcollation", 4191, b','),
    (5039, "_pg_snapshot", 5038, b','),
    (6150, "_int4multirange", 4451, b','),
    (6151, "_nummultirange", 4532, b','),
    (6152, "_tsmultirange", 4533, b','),
    (6153, "_tstzmultirange", 4534, b','),
    (6155, "_datemultirange", 4535, b','),
    (6157, "_int8multirange", 4536, b','),
];

/// PostgreSQL's own limit (MAXDIM); it also bounds parser recursion.
const MAX_ARRAY_DIMS: usize = 6;

/// Names of non-builtin types seen in pgoutput Type messages, e.g. citext,
/// enums, domains; and, read from the catalog at session start (Type
/// messages carry only names), what a non-builtin array or domain is made of.
#[derive(Debug, Default, Clone)]
pub struct TypeRegistry {
    types: HashMap<u32, (String, String)>,
    kinds: HashMap<u32, TypeKind>,
}

/// The structure of a non-builtin type that decides its JSON form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeKind {
    /// An array (of an enum, a composite, a domain, an extension type…):
    /// a JSON array of its elements.
    Array { element: u32, delimiter: u8 },
    /// A domain: the JSON of its base type (a domain over int is a number).
    Domain { base: u32 },
}

impl TypeRegistry {
    /// Records what a non-builtin array or domain type is made of.
    pub fn set_kind(&mut self, oid: u32, kind: TypeKind) {
        self.kinds.insert(oid, kind);
    }

    /// Records (or replaces, after an `ALTER TYPE ... RENAME`) a type's name.
    pub fn insert(&mut self, oid: u32, namespace: String, name: String) {
        self.types.insert(oid, (namespace, name));
    }

    pub fn name(&self, oid: u32) -> Option<&str> {
        self.types.get(&oid).map(|(_, name)| name.as_str())
    }

    pub fn namespace(&self, oid: u32) -> Option<&str> {
        self.types
            .get(&oid)
            .map(|(namespace, _)| namespace.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("invalid {type_name} text (type oid {oid}): {problem}")]
    Invalid {
        oid: u32,
        type_name: String,
        problem: &'static str,
    },
    #[error("invalid element at index {index} of {type_name} (type oid {oid}): {cause}")]
    ArrayElement {
        oid: u32,
        type_name: String,
        /// Position in row-major order, counting from 0.
        index: usize,
        cause: Box<ValueError>,
    },
}

/// True for the builtin array types this module parses into JSON arrays.
/// Arrays of non-builtin types (an enum's `_mood`, say) are arrays through
/// the registry's [`TypeKind`], read from the catalog.
pub fn is_array_type(oid: u32) -> bool {
    array_info(oid).is_some()
}

/// The type's name for messages: builtin name, else the registry's, else
/// `oid <n>`.
pub fn type_name(oid: u32, types: &TypeRegistry) -> String {
    if let Some(name) = builtin_name(oid) {
        return name.to_owned();
    }
    match types.name(oid) {
        Some(name) => name.to_owned(),
        None => format!("oid {oid}"),
    }
}

/// Converts one value from PostgreSQL's text output into JSON according to its
/// column type.
pub fn text_to_json(type_oid: u32, text: &[u8], types: &TypeRegistry) -> Result<Value, ValueError> {
    text_to_json_at(type_oid, text, types, 0)
}

/// Domains over domains are followed this far at most (the catalog cannot
/// make a cycle; this only bounds the recursion against a corrupt registry).
const MAX_DOMAIN_DEPTH: usize = 32;

fn text_to_json_at(
    type_oid: u32,
    text: &[u8],
    types: &TypeRegistry,
    depth: usize,
) -> Result<Value, ValueError> {
    if let Some((element_oid, delimiter)) = array_info(type_oid) {
        return array_to_json(type_oid, element_oid, delimiter, text, types);
    }
    match types.kinds.get(&type_oid) {
        Some(&TypeKind::Array { element, delimiter }) => {
            array_to_json(type_oid, element, delimiter, text, types)
        }
        Some(&TypeKind::Domain { base }) if depth < MAX_DOMAIN_DEPTH => {
            text_to_json_at(base, text, types, depth + 1)
        }
        _ => scalar_to_json(type_oid, text).map_err(|problem| invalid(type_oid, problem, types)),
    }
}

fn builtin_name(oid: u32) -> Option<&'static str> {
    if let Ok(i) = BUILTIN_TYPES.binary_search_by_key(&oid, |&(o, _)| o) {
        return Some(BUILTIN_TYPES[i].1);
    }
    ARRAY_TYPES
        .binary_search_by_key(&oid, |&(o, ..)| o)
        .ok()
        .map(|i| ARRAY_TYPES[i].1)
}

fn array_info(oid: u32) -> Option<(u32, u8)> {
    ARRAY_TYPES
        .binary_search_by_key(&oid, |&(o, ..)| o)
        .ok()
        .map(|i| (ARRAY_TYPES[i].2, ARRAY_TYPES[i].3))
}

fn invalid(oid: u32, problem: &'static str, types: &TypeRegistry) -> ValueError {
    ValueError::Invalid {
        oid,
        type_name: type_name(oid, types),
        problem,
    }
}

fn utf8(text: &[u8]) -> Result<&str, &'static str> {
    std::str::from_utf8(text).map_err(|_| "invalid UTF-8")
}

/// Problems are static strings so that no part of the value can leak into an
/// error message.
fn scalar_to_json(oid: u32, text: &[u8]) -> Result<Value, &'static str> {
    const NOT_INTEGER: &str = "not an integer in the type's range";
    match oid {
        BOOL => match text {
            b"t" => Ok(Value::Bool(true)),
            b"f" => Ok(Value::Bool(false)),
            _ => Err("expected t or f"),
        },
        INT2 => utf8(text)?
            .parse::<i16>()
            .map(Value::from)
            .map_err(|_| NOT_INTEGER),
        INT4 => utf8(text)?
            .parse::<i32>()
            .map(Value::from)
            .map_err(|_| NOT_INTEGER),
        INT8 => utf8(text)?
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| NOT_INTEGER),
        OID => utf8(text)?
            .parse::<u32>()
            .map(Value::from)
            .map_err(|_| NOT_INTEGER),
        FLOAT4 | FLOAT8 => float(utf8(text)?),
        NUMERIC => numeric(utf8(text)?),
        JSON | JSONB => json_document(text),
        BYTEA => bytea(text),
        TIMESTAMP => timestamp(utf8(text)?),
        TIMESTAMPTZ => timestamptz(utf8(text)?),
        // Everything else, including money (its text depends on lc_monetary)
        // and every non-builtin type, is passed on as the server printed it.
        _ => Ok(Value::String(utf8(text)?.to_owned())),
    }
}

/// The deepest json/jsonb nesting delivered. serde_json's `Value` is a
/// recursive tree: cloning, comparing, serializing and dropping it recurse
/// once per level on whatever thread holds it (a tokio worker has 2 MiB of
/// stack, and a 12,000-deep value, which PostgreSQL accepts by default,
/// overflows it on clone). 1,000 levels use well under a quarter of that
/// stack (unit test `deep_json_is_stack_safe`); a deeper document is a
/// per-change error naming the column, never a crash.
pub const MAX_JSON_DEPTH: usize = 1000;

/// A json or jsonb document, numbers kept digit for digit
/// (serde_json's `arbitrary_precision`). The nesting depth is measured
/// first, without recursion, so the parser's own recursion is bounded by
/// [`MAX_JSON_DEPTH`] instead of serde_json's limit of 128.
fn json_document(text: &[u8]) -> Result<Value, &'static str> {
    use serde::Deserialize as _;
    let depth = json_depth(text);
    if depth > MAX_JSON_DEPTH {
        return Err("nested deeper than 1000 levels, the most usersync delivers");
    }
    let parse = || {
        let mut de = serde_json::Deserializer::from_slice(text);
        de.disable_recursion_limit();
        let value = Value::deserialize(&mut de).map_err(|_| "not valid JSON")?;
        de.end().map_err(|_| "not valid JSON")?;
        Ok(value)
    };
    if depth <= SHALLOW_JSON_DEPTH {
        return parse();
    }
    // The parser needs several hundred bytes of stack per level: a deep
    // document is parsed on a short-lived thread with room for it.
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("usersync-json".into())
            .stack_size(DEEP_JSON_STACK)
            .spawn_scoped(scope, parse)
            .map_err(|_| "cannot start a thread to parse a deeply nested document")?
            .join()
            .unwrap_or(Err("parser failed"))
    })
}

/// Documents up to this depth (nearly all) are parsed on the caller's stack.
const SHALLOW_JSON_DEPTH: usize = 128;
/// Stack for parsing up to [`MAX_JSON_DEPTH`] levels, with a wide margin.
const DEEP_JSON_STACK: usize = 16 * 1024 * 1024;

/// The deepest nesting of `[` and `{` outside strings. Not a validator:
/// malformed text is left to the parser.
fn json_depth(text: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in text {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn float(s: &str) -> Result<Value, &'static str> {
    if matches!(s, "NaN" | "Infinity" | "-Infinity") {
        return Ok(Value::String(s.to_owned()));
    }
    // Rust also parses "inf", "nan" and friends, which PostgreSQL never prints.
    if !s
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
    {
        return Err("not a number");
    }
    // float4 is parsed as f64 on purpose: with extra_float_digits=3 the server
    // prints the shortest decimal that round-trips, and going through f32 would
    // turn "1.1" into 1.100000023841858.
    let f: f64 = s.parse().map_err(|_| "not a number")?;
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or("number out of range")
}

/// Kept as a string: JSON numbers would lose precision beyond f64.
fn numeric(s: &str) -> Result<Value, &'static str> {
    let special = matches!(s, "NaN" | "Infinity" | "-Infinity");
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = digits.split_once('.').unwrap_or((digits, "0"));
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if special || (all_digits(int) && all_digits(frac)) {
        Ok(Value::String(s.to_owned()))
    } else {
        Err("not a decimal number")
    }
}

/// bytea arrives in hex format (`\x0a0b`) and leaves as base64, which is what
/// JSON consumers expect for binary data.
fn bytea(text: &[u8]) -> Result<Value, &'static str> {
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or("expected hex format starting with \\x")?;
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits");
    }
    let nibble = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err("invalid hex digit"),
    };
    let mut bytes = Vec::with_capacity(hex.len() / 2);
    for pair in hex.chunks_exact(2) {
        bytes.push((nibble(pair[0])? << 4) | nibble(pair[1])?);
    }
    Ok(Value::String(
        base64::engine::general_purpose::STANDARD.encode(bytes),
    ))
}

fn timestamp(s: &str) -> Result<Value, &'static str> {
    if matches!(s, "infinity" | "-infinity") {
        return Ok(Value::String(s.to_owned()));
    }
    let (body, bc) = match s.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (s, false),
    };
    let (date, time, rest) = split_date_time(body)?;
    if !rest.is_empty() {
        return Err("unexpected text after the time");
    }
    // ISO 8601 has no BC marker; a T-form would only pretend to be standard.
    if bc {
        return Ok(Value::String(s.to_owned()));
    }
    Ok(Value::String(format!("{date}T{time}")))
}

fn timestamptz(s: &str) -> Result<Value, &'static str> {
    if matches!(s, "infinity" | "-infinity") {
        return Ok(Value::String(s.to_owned()));
    }
    let (body, bc) = match s.strip_suffix(" BC") {
        Some(body) => (body, true),
        None => (s, false),
    };
    let (date, time, offset) = split_date_time(body)?;
    let offset = normalize_offset(offset)?;
    if bc {
        return Ok(Value::String(s.to_owned()));
    }
    Ok(Value::String(format!("{date}T{time}{offset}")))
}

/// Splits ISO `YYYY-MM-DD HH:MM:SS[.ffffff]` (years may have more than four
/// digits) into date, time and whatever follows the time.
fn split_date_time(s: &str) -> Result<(&str, &str, &str), &'static str> {
    const BAD: &str = "not an ISO date and time";
    let b = s.as_bytes();
    let year_len = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if year_len < 4 {
        return Err(BAD);
    }
    let date_end = year_len + 6;
    let time_start = date_end + 1;
    let time_whole_end = time_start + 8;
    if !matches_pattern(b.get(year_len..date_end), b"-dd-dd")
        || b.get(date_end) != Some(&b' ')
        || !matches_pattern(b.get(time_start..time_whole_end), b"dd:dd:dd")
    {
        return Err(BAD);
    }
    let mut time_end = time_whole_end;
    if b.get(time_end) == Some(&b'.') {
        let frac = b
            .get(time_end + 1..)
            .unwrap_or_default()
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if frac == 0 {
            return Err(BAD);
        }
        time_end += 1 + frac;
    }
    // Every boundary above follows an ASCII byte, so these slices cannot fail.
    match (
        s.get(..date_end),
        s.get(time_start..time_end),
        s.get(time_end..),
    ) {
        (Some(date), Some(time), Some(rest)) => Ok((date, time, rest)),
        _ => Err(BAD),
    }
}

/// `pattern` uses `d` for an ASCII digit; every other byte must match itself.
fn matches_pattern(bytes: Option<&[u8]>, pattern: &[u8]) -> bool {
    bytes.is_some_and(|bytes| {
        bytes.len() == pattern.len()
            && bytes.iter().zip(pattern).all(|(&c, &p)| {
                if p == b'd' {
                    c.is_ascii_digit()
                } else {
                    c == p
                }
            })
    })
}

/// `+00` → `Z`, `+05:30` stays, `-08` → `-08:00`, `+05:53:28` stays: RFC 3339
/// requires minutes, and seconds offsets (local mean time before 1900) have no
/// RFC 3339 form at all, so they are left as the server printed them.
fn normalize_offset(offset: &str) -> Result<Cow<'_, str>, &'static str> {
    let b = offset.as_bytes();
    let shape_ok = matches!(b.first(), Some(b'+' | b'-'))
        && (matches_pattern(b.get(1..), b"dd")
            || matches_pattern(b.get(1..), b"dd:dd")
            || matches_pattern(b.get(1..), b"dd:dd:dd"));
    if !shape_ok {
        return Err("missing or malformed time zone offset");
    }
    if offset.bytes().skip(1).all(|c| c == b'0' || c == b':') {
        return Ok(Cow::Borrowed("Z"));
    }
    if b.len() == 3 {
        return Ok(Cow::Owned(format!("{offset}:00")));
    }
    Ok(Cow::Borrowed(offset))
}

/// One node of a parsed array literal; elements borrow from the input unless
/// they contained escapes.
#[derive(Debug, PartialEq)]
enum ArrayNode<'a> {
    Null,
    Element(Cow<'a, str>),
    List(Vec<ArrayNode<'a>>),
}

fn array_to_json(
    oid: u32,
    element_oid: u32,
    delimiter: u8,
    text: &[u8],
    types: &TypeRegistry,
) -> Result<Value, ValueError> {
    let parsed = utf8(text)
        .and_then(|s| parse_array(s, delimiter))
        .map_err(|problem| invalid(oid, problem, types))?;
    let mut index = 0;
    let mut convert_element = |element: &str| {
        let at = index;
        index += 1;
        text_to_json(element_oid, element.as_bytes(), types).map_err(|cause| {
            ValueError::ArrayElement {
                oid,
                type_name: type_name(oid, types),
                index: at,
                cause: Box::new(cause),
            }
        })
    };
    node_to_json(parsed, &mut convert_element)
}

fn node_to_json(
    node: ArrayNode<'_>,
    convert_element: &mut dyn FnMut(&str) -> Result<Value, ValueError>,
) -> Result<Value, ValueError> {
    match node {
        ArrayNode::Null => Ok(Value::Null),
        ArrayNode::Element(text) => convert_element(&text),
        ArrayNode::List(items) => items
            .into_iter()
            .map(|item| node_to_json(item, convert_element))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
    }
}

/// Parses PostgreSQL's array literal: optional `[lb:ub]...=` bounds (dropped,
/// JSON arrays start at 0), then nested braces of elements.
fn parse_array(s: &str, delimiter: u8) -> Result<ArrayNode<'_>, &'static str> {
    let mut p = ArrayParser {
        s,
        b: s.as_bytes(),
        pos: 0,
        delimiter,
    };
    p.skip_space();
    let bounds = if p.peek() == Some(b'[') {
        let bounds = p.bounds()?;
        p.skip_space();
        if p.peek() != Some(b'=') {
            return Err("expected = after array bounds");
        }
        p.pos += 1;
        p.skip_space();
        Some(bounds)
    } else {
        None
    };
    if p.peek() != Some(b'{') {
        return Err("expected {");
    }
    let root = p.list(1)?;
    p.skip_space();
    if p.pos != p.b.len() {
        return Err("unexpected text after the closing }");
    }
    let dims = dimensions(&root)?;
    if let Some(bounds) = bounds {
        if bounds != dims {
            return Err("array bounds do not match the contents");
        }
    }
    Ok(root)
}

/// Lengths along each dimension; errors unless the array is rectangular.
fn dimensions(node: &ArrayNode<'_>) -> Result<Vec<usize>, &'static str> {
    let ArrayNode::List(items) = node else {
        return Ok(Vec::new());
    };
    let mut inner: Option<Vec<usize>> = None;
    let mut nested = None;
    for item in items {
        let is_list = matches!(item, ArrayNode::List(_));
        if *nested.get_or_insert(is_list) != is_list {
            return Err("mixed nested arrays and scalar elements");
        }
        let dims = dimensions(item)?;
        match &inner {
            Some(expected) if *expected != dims => {
                return Err("sub-arrays have different dimensions")
            }
            Some(_) => {}
            None => inner = Some(dims),
        }
    }
    let mut dims = if items.is_empty() {
        Vec::new()
    } else {
        vec![items.len()]
    };
    dims.extend(inner.unwrap_or_default());
    Ok(dims)
}

struct ArrayParser<'a> {
    s: &'a str,
    b: &'a [u8],
    pos: usize,
    delimiter: u8,
}

impl<'a> ArrayParser<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    /// The characters PostgreSQL's array parser treats as white space.
    fn skip_space(&mut self) {
        while matches!(
            self.peek(),
            Some(b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
        ) {
            self.pos += 1;
        }
    }

    /// `[lb:ub]` or `[ub]` repeated; returns each dimension's length.
    fn bounds(&mut self) -> Result<Vec<usize>, &'static str> {
        const BAD: &str = "malformed array bounds";
        let mut dims = Vec::new();
        while self.peek() == Some(b'[') {
            self.pos += 1;
            let first = self.bound()?;
            let (lower, upper) = if self.peek() == Some(b':') {
                self.pos += 1;
                (first, self.bound()?)
            } else {
                (1, first)
            };
            if self.peek() != Some(b']') || upper < lower {
                return Err(BAD);
            }
            self.pos += 1;
            let len = usize::try_from(upper - lower + 1).map_err(|_| BAD)?;
            dims.push(len);
            if dims.len() > MAX_ARRAY_DIMS {
                return Err("too many array dimensions");
            }
        }
        Ok(dims)
    }

    fn bound(&mut self) -> Result<i64, &'static str> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.s
            .get(start..self.pos)
            .and_then(|n| n.parse::<i32>().ok())
            .map(i64::from)
            .ok_or("malformed array bounds")
    }

    /// Parses `{...}` starting at the opening brace.
    fn list(&mut self, depth: usize) -> Result<ArrayNode<'a>, &'static str> {
        if depth > MAX_ARRAY_DIMS {
            return Err("too many array dimensions");
        }
        self.pos += 1;
        let mut items = Vec::new();
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(ArrayNode::List(items));
        }
        loop {
            self.skip_space();
            let item = match self.peek() {
                Some(b'{') => self.list(depth + 1)?,
                Some(b'"') => self.quoted()?,
                Some(_) => self.unquoted()?,
                None => return Err("unterminated array"),
            };
            items.push(item);
            self.skip_space();
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(ArrayNode::List(items));
                }
                Some(c) if c == self.delimiter => self.pos += 1,
                Some(_) => return Err("expected delimiter or } after element"),
                None => return Err("unterminated array"),
            }
        }
    }

    /// A `"..."` element: may contain anything, with `\` escaping the next
    /// character; never NULL.
    fn quoted(&mut self) -> Result<ArrayNode<'a>, &'static str> {
        self.pos += 1;
        let start = self.pos;
        let mut owned: Option<Vec<u8>> = None;
        loop {
            match self.peek() {
                None => return Err("unterminated quoted element"),
                Some(b'"') => break,
                Some(b'\\') => {
                    let buf = owned.get_or_insert_with(|| self.b[start..self.pos].to_vec());
                    let escaped = *self
                        .b
                        .get(self.pos + 1)
                        .ok_or("unterminated quoted element")?;
                    buf.push(escaped);
                    self.pos += 2;
                }
                Some(c) => {
                    if let Some(buf) = owned.as_mut() {
                        buf.push(c);
                    }
                    self.pos += 1;
                }
            }
        }
        let end = self.pos;
        self.pos += 1;
        self.element(start, end, owned).map(ArrayNode::Element)
    }

    /// An unquoted element: runs to the next delimiter or `}`; surrounding
    /// white space is not part of it, and an exact `NULL` (any case) is null.
    fn unquoted(&mut self) -> Result<ArrayNode<'a>, &'static str> {
        let start = self.pos;
        let mut owned: Option<Vec<u8>> = None;
        // End of the element without trailing unescaped white space.
        let mut end = start;
        let mut owned_len = 0;
        loop {
            match self.peek() {
                None => return Err("unterminated array"),
                Some(b'}') => break,
                Some(c) if c == self.delimiter => break,
                Some(b'{' | b'"') => return Err("unexpected { or \" in unquoted element"),
                Some(b'\\') => {
                    // White space before an escape is inside the element, so
                    // copy up to here, not just up to `end`.
                    let buf = owned.get_or_insert_with(|| self.b[start..self.pos].to_vec());
                    let escaped = *self.b.get(self.pos + 1).ok_or("unterminated array")?;
                    buf.push(escaped);
                    self.pos += 2;
                    owned_len = buf.len();
                    end = self.pos;
                }
                Some(c) => {
                    self.pos += 1;
                    let space = matches!(c, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c');
                    if let Some(buf) = owned.as_mut() {
                        buf.push(c);
                        if !space {
                            owned_len = buf.len();
                        }
                    }
                    if !space {
                        end = self.pos;
                    }
                }
            }
        }
        if end == start {
            return Err("empty unquoted element");
        }
        if let Some(buf) = owned.as_mut() {
            buf.truncate(owned_len);
        } else if self.b[start..end].eq_ignore_ascii_case(b"NULL") {
            return Ok(ArrayNode::Null);
        }
        self.element(start, end, owned).map(ArrayNode::Element)
    }

    fn element(
        &self,
        start: usize,
        end: usize,
        owned: Option<Vec<u8>>,
    ) -> Result<Cow<'a, str>, &'static str> {
        match owned {
            Some(buf) => String::from_utf8(buf)
                .map(Cow::Owned)
                .map_err(|_| "invalid UTF-8"),
            None => self
                .s
                .get(start..end)
                .map(Cow::Borrowed)
                .ok_or("invalid UTF-8"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conv(oid: u32, text: &str) -> Result<Value, ValueError> {
        text_to_json(oid, text.as_bytes(), &TypeRegistry::default())
    }

    fn ok(oid: u32, text: &str) -> Value {
        conv(oid, text).unwrap_or_else(|e| panic!("{oid} {text:?}: {e}"))
    }

    fn problem(oid: u32, text: &str) -> String {
        match conv(oid, text) {
            Ok(v) => panic!("{oid} {text:?} accepted as {v}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tables_are_sorted_and_consistent() {
        assert!(BUILTIN_TYPES.windows(2).all(|w| w[0].0 < w[1].0));
        assert!(ARRAY_TYPES.windows(2).all(|w| w[0].0 < w[1].0));
        for &(oid, name, element, _) in ARRAY_TYPES {
            assert!(builtin_name(element).is_some(), "{name}");
            assert!(!is_array_type(element), "{name}");
            assert!(BUILTIN_TYPES.binary_search_by_key(&oid, |t| t.0).is_err());
        }
    }

    #[test]
    fn bool_values() {
        assert_eq!(ok(16, "t"), json!(true));
        assert_eq!(ok(16, "f"), json!(false));
        assert_eq!(
            problem(16, "true"),
            "invalid bool text (type oid 16): expected t or f"
        );
        problem(16, "");
    }

    #[test]
    fn integers() {
        assert_eq!(ok(21, "-32768"), json!(-32768));
        assert_eq!(ok(23, "2147483647"), json!(2147483647));
        assert_eq!(ok(20, "-9223372036854775808"), json!(i64::MIN));
        assert_eq!(ok(20, "0"), json!(0));
        assert_eq!(ok(26, "4294967295"), json!(4294967295u32));
        assert_eq!(
            problem(20, "12x"),
            "invalid int8 text (type oid 20): not an integer in the type's range"
        );
        problem(21, "32768");
        problem(23, "1.5");
        problem(26, "-1");
        problem(20, "");
        problem(20, " 1");
    }

    #[test]
    fn floats() {
        assert_eq!(ok(701, "0.1"), json!(0.1));
        assert_eq!(ok(700, "1.1"), json!(1.1));
        assert_eq!(ok(701, "1e+20"), json!(1e20));
        assert_eq!(ok(700, "1e-05"), json!(1e-5));
        assert_eq!(ok(701, "-2.5"), json!(-2.5));
        assert_eq!(ok(700, "3.4028235e+38"), json!(3.4028235e38));
        assert_eq!(ok(701, "-0"), json!(-0.0));
        assert_eq!(ok(701, "NaN"), json!("NaN"));
        assert_eq!(ok(700, "Infinity"), json!("Infinity"));
        assert_eq!(ok(701, "-Infinity"), json!("-Infinity"));
        problem(701, "inf");
        problem(701, "nan");
        problem(701, "1e999");
        problem(701, "");
        problem(701, "1.2.3");
    }

    #[test]
    fn numeric_and_money_stay_exact() {
        let huge = "-123456789012345678901234567890.000000000000000000001";
        assert_eq!(ok(1700, huge), json!(huge));
        assert_eq!(ok(1700, "NaN"), json!("NaN"));
        assert_eq!(ok(1700, "Infinity"), json!("Infinity"));
        assert_eq!(ok(1700, "0.50"), json!("0.50"));
        problem(1700, "1e5");
        problem(1700, "1.");
        problem(1700, "");
        assert_eq!(ok(790, "$12.50"), json!("$12.50"));
        assert_eq!(ok(790, "-$1,000.00"), json!("-$1,000.00"));
    }

    #[test]
    fn text_like_types() {
        for oid in [25, 1043, 1042, 19, 18, 2950] {
            assert_eq!(ok(oid, "héllo ☃ 🎉"), json!("héllo ☃ 🎉"));
            assert_eq!(ok(oid, ""), json!(""));
        }
        assert_eq!(
            ok(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        let err = text_to_json(25, b"ab\xffcd", &TypeRegistry::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid text text (type oid 25): invalid UTF-8"
        );
    }

    #[test]
    fn non_builtin_types_are_strings() {
        let mut types = TypeRegistry::default();
        types.insert(16385, "public".into(), "citext".into());
        assert_eq!(types.name(16385), Some("citext"));
        assert_eq!(types.namespace(16385), Some("public"));
        assert_eq!(
            text_to_json(16385, b"MiXeD", &types).unwrap(),
            json!("MiXeD")
        );
        // Unregistered oids too: the Type message may not have arrived.
        assert_eq!(
            text_to_json(99999, b"{a,b}", &types).unwrap(),
            json!("{a,b}")
        );
        let err = text_to_json(16385, b"\xff", &types).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid citext text (type oid 16385): invalid UTF-8"
        );
    }

    /// Arrays and domains of non-builtin types take their structure from
    /// the catalog (`set_kind`): an array of an enum is a JSON array, a
    /// domain over int4 a number, and a domain chain that loops (only a
    /// corrupt registry could make one) ends as text instead of recursing
    /// until the stack overflows.
    #[test]
    fn catalog_arrays_and_domains_take_their_structure() {
        let mut types = TypeRegistry::default();
        types.insert(16390, "public".into(), "mood".into());
        types.set_kind(
            16389,
            TypeKind::Array {
                element: 16390,
                delimiter: b',',
            },
        );
        types.set_kind(16391, TypeKind::Domain { base: INT4 });
        types.set_kind(
            16392,
            TypeKind::Array {
                element: 16391,
                delimiter: b';',
            },
        );
        types.set_kind(16393, TypeKind::Domain { base: 16393 });
        assert_eq!(
            text_to_json(16389, b"{happy,\"so so\"}", &types).unwrap(),
            json!(["happy", "so so"])
        );
        assert_eq!(text_to_json(16391, b"42", &types).unwrap(), json!(42));
        assert_eq!(
            text_to_json(16392, b"{1;2}", &types).unwrap(),
            json!([1, 2])
        );
        assert!(text_to_json(16391, b"4x", &types).is_err());
        assert_eq!(text_to_json(16393, b"x", &types).unwrap(), json!("x"));
    }

    #[test]
    fn json_is_embedded() {
        assert_eq!(
            ok(114, r#"{"a": [1, 2.5, null]}"#),
            json!({"a": [1, 2.5, null]})
        );
        assert_eq!(ok(3802, r#""str""#), json!("str"));
        assert_eq!(ok(3802, "null"), json!(null));
        assert_eq!(ok(3802, r#"{"é": "☃"}"#), json!({"é": "☃"}));
        problem(3802, "{");
        problem(114, "");
        // Unbalanced deep text is rejected by the depth check, not the stack.
        let deep = "[".repeat(100_000);
        problem(3802, &deep);
    }

    /// Numbers inside json/jsonb leave exactly as PostgreSQL printed them:
    /// `{"n": 1e400}` is printed by jsonb as 1 and 400 zeros.
    #[test]
    fn json_numbers_keep_every_digit() {
        let huge = format!("1{}", "0".repeat(400));
        for (oid, text) in [
            (3802, format!(r#"{{"n": {huge}}}"#)),
            (3802, "[123456789012345678901234567890]".to_string()),
            (3802, "[-0.1000000000000000000001]".to_string()),
            (
                3802,
                "[18446744073709551616, -9223372036854775809]".to_string(),
            ),
            (3802, "[0.5, 1, -2, 0.0]".to_string()),
        ] {
            let out = serde_json::to_string(&ok(oid, &text)).unwrap();
            let expected = text.replace(", ", ",").replace(": ", ":");
            assert_eq!(out, expected, "{oid}");
        }
        // json keeps the text as typed; exponents stay exact (only the
        // sign of the exponent is spelt out).
        assert_eq!(
            serde_json::to_string(&ok(114, r#"{"m": 1.0E-400, "n": 1e400}"#)).unwrap(),
            r#"{"m":1.0e-400,"n":1e+400}"#
        );
        assert_eq!(
            ok(1231, "{1.50,12345678901234567890.1}"),
            json!(["1.50", "12345678901234567890.1"])
        );
    }

    #[test]
    fn deep_json_up_to_the_limit() {
        let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(
            serde_json::to_string(&ok(3802, &nested(200))).unwrap(),
            nested(200)
        );
        assert_eq!(
            serde_json::to_string(&ok(114, &nested(MAX_JSON_DEPTH))).unwrap(),
            nested(MAX_JSON_DEPTH)
        );
        let objects = format!("{}1{}", r#"{"a": "#.repeat(300), "}".repeat(300));
        assert!(ok(3802, &objects).is_object());
        // Brackets inside strings do not count.
        let strings = format!(r#"["{}\"{}"]"#, "[".repeat(5000), "{".repeat(5000));
        assert!(ok(3802, &strings).is_array());
        // Depth is nesting, not the number of brackets: siblings are shallow.
        let wide = format!("[{}1]", "[1],".repeat(MAX_JSON_DEPTH + 1));
        assert!(ok(3802, &wide).is_array());
        // Nesting after a string (one with an escaped quote) still counts.
        let after_string = format!(r#"{{"a\"": "x", "b": {}}}"#, nested(MAX_JSON_DEPTH));
        assert!(
            problem(3802, &after_string).contains("nested deeper than 1000 levels"),
            "a document nested too deep after a string was accepted"
        );
        let err = problem(3802, &nested(MAX_JSON_DEPTH + 1));
        assert_eq!(
            err,
            "invalid jsonb text (type oid 3802): nested deeper than 1000 levels, the most usersync delivers"
        );
    }

    /// The deepest value delivered survives every recursive operation the
    /// daemon applies to values on a thread with a quarter of a tokio
    /// worker's stack (2 MiB).
    #[test]
    fn deep_json_is_stack_safe() {
        let text = format!(
            "{}1{}",
            r#"{"a": ["#.repeat(MAX_JSON_DEPTH / 2),
            "]}".repeat(MAX_JSON_DEPTH / 2)
        );
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                let v = ok(3802, &text);
                let copy = v.clone();
                assert_eq!(copy, v);
                let as_value = serde_json::to_value(&v).unwrap();
                let bytes = serde_json::to_vec(&as_value).unwrap();
                assert_eq!(bytes.len(), text.len() - (MAX_JSON_DEPTH / 2));
                assert!(v.to_string().len() > MAX_JSON_DEPTH);
                drop((v, copy, as_value));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn bytea_is_base64() {
        assert_eq!(ok(17, "\\x"), json!(""));
        assert_eq!(ok(17, "\\x0a0b"), json!("Cgs="));
        assert_eq!(ok(17, "\\x00FFfe"), json!("AP/+"));
        assert_eq!(ok(17, "\\x68656c6c6f"), json!("aGVsbG8="));
        problem(17, "\\x0");
        problem(17, "\\xzz");
        problem(17, "");
        problem(17, "\\001");
    }

    #[test]
    fn dates_and_times_as_sent() {
        assert_eq!(ok(1082, "2024-01-02"), json!("2024-01-02"));
        assert_eq!(ok(1082, "infinity"), json!("infinity"));
        assert_eq!(ok(1082, "0044-03-15 BC"), json!("0044-03-15 BC"));
        assert_eq!(ok(1083, "03:04:05.5"), json!("03:04:05.5"));
        assert_eq!(ok(1266, "12:00:00+05"), json!("12:00:00+05"));
        assert_eq!(ok(1186, "P1DT2H"), json!("P1DT2H"));
        assert_eq!(ok(869, "10.0.0.1/8"), json!("10.0.0.1/8"));
        assert_eq!(ok(650, "::1/128"), json!("::1/128"));
        assert_eq!(ok(829, "08:00:2b:01:02:03"), json!("08:00:2b:01:02:03"));
    }

    #[test]
    fn timestamp() {
        assert_eq!(
            ok(1114, "2024-01-02 03:04:05.123456"),
            json!("2024-01-02T03:04:05.123456")
        );
        assert_eq!(
            ok(1114, "2024-01-02 03:04:05"),
            json!("2024-01-02T03:04:05")
        );
        assert_eq!(
            ok(1114, "12345-01-01 00:00:00"),
            json!("12345-01-01T00:00:00")
        );
        assert_eq!(ok(1114, "infinity"), json!("infinity"));
        assert_eq!(ok(1114, "-infinity"), json!("-infinity"));
        assert_eq!(
            ok(1114, "0044-03-15 12:00:00 BC"),
            json!("0044-03-15 12:00:00 BC")
        );
        problem(1114, "2024-01-02T03:04:05");
        problem(1114, "2024-01-02 03:04:05+00");
        problem(1114, "2024-01-02 03:04:05.");
        problem(1114, "Tue Jan 02 03:04:05 2024");
        problem(1114, "24-01-02 03:04:05");
        problem(1114, "");
    }

    #[test]
    fn timestamptz() {
        assert_eq!(
            ok(1184, "2024-01-02 03:04:05.123456+00"),
            json!("2024-01-02T03:04:05.123456Z")
        );
        assert_eq!(
            ok(1184, "2024-01-02 03:04:05+00"),
            json!("2024-01-02T03:04:05Z")
        );
        assert_eq!(
            ok(1184, "2024-01-02 03:04:05.1+05:30"),
            json!("2024-01-02T03:04:05.1+05:30")
        );
        assert_eq!(
            ok(1184, "2024-01-02 03:04:05-08"),
            json!("2024-01-02T03:04:05-08:00")
        );
        assert_eq!(
            ok(1184, "1850-01-01 00:00:00+05:53:28"),
            json!("1850-01-01T00:00:00+05:53:28")
        );
        assert_eq!(ok(1184, "infinity"), json!("infinity"));
        assert_eq!(ok(1184, "-infinity"), json!("-infinity"));
        assert_eq!(
            ok(1184, "0044-03-15 12:00:00+00 BC"),
            json!("0044-03-15 12:00:00+00 BC")
        );
        problem(1184, "2024-01-02 03:04:05");
        problem(1184, "2024-01-02 03:04:05+0");
        problem(1184, "2024-01-02 03:04:05 UTC");
        problem(1184, "2024-01-02 03:04:05+05:3");
    }

    #[test]
    fn integer_arrays() {
        assert_eq!(ok(1007, "{1,2,3}"), json!([1, 2, 3]));
        assert_eq!(ok(1016, "{-9223372036854775808}"), json!([i64::MIN]));
        assert_eq!(ok(1005, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            ok(1007, "{{{1},{2}},{{3},{4}}}"),
            json!([[[1], [2]], [[3], [4]]])
        );
        assert_eq!(ok(1007, "{}"), json!([]));
        assert_eq!(ok(1007, "{1,NULL,null,NuLl}"), json!([1, null, null, null]));
        assert_eq!(ok(1007, "  { 1 , 2 }  "), json!([1, 2]));
        assert_eq!(ok(1028, "{0,4294967295}"), json!([0, 4294967295u32]));
    }

    #[test]
    fn array_bounds_are_dropped() {
        assert_eq!(ok(1007, "[0:1]={1,2}"), json!([1, 2]));
        assert_eq!(
            ok(1007, "[2:3][-1:0]={{1,2},{3,4}}"),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(ok(1007, "[3]={1,2,3}"), json!([1, 2, 3]));
        problem(1007, "[0:2]={1,2}");
        problem(1007, "[0:1]{1,2}");
        problem(1007, "[0:1={1,2}");
        problem(1007, "[1:0]={1}");
        problem(1007, "[0:1][0:1]={1,2}");
        problem(1007, "[99999999999:1]={1}");
        // A one-element dimension, and as many dimensions as PostgreSQL allows.
        assert_eq!(ok(1007, "[1:1]={7}"), json!([7]));
        let six = format!("{}={{{{{{{{{{{{1}}}}}}}}}}}}", "[1:1]".repeat(6));
        assert_eq!(ok(1007, &six), json!([[[[[[1]]]]]]));
        let seven = format!("{}={{{{{{{{{{{{{{1}}}}}}}}}}}}}}", "[1:1]".repeat(7));
        assert!(problem(1007, &seven).contains("too many array dimensions"));
        // The closing bracket is checked, not skipped.
        problem(1007, "[0:1x={1,2}");
    }

    #[test]
    fn text_arrays_with_quoting() {
        // As printed by PostgreSQL 15 for
        // array['a','b,c','NULL',null,'',' s ','q"\x','{}']::text[].
        assert_eq!(
            ok(1009, r#"{a,"b,c","NULL",NULL,""," s ","q\"\\x","{}"}"#),
            json!(["a", "b,c", "NULL", null, "", " s ", "q\"\\x", "{}"])
        );
        assert_eq!(ok(1009, r#"{"a}b","{\"x\"}"}"#), json!(["a}b", "{\"x\"}"]));
        assert_eq!(ok(1009, "{é☃,\"ü,ß\"}"), json!(["é☃", "ü,ß"]));
        // Unquoted backslash escapes keep escaped white space, drop the rest.
        assert_eq!(ok(1009, r"{a\,b,c\ }"), json!(["a,b", "c "]));
        assert_eq!(ok(1009, r"{N\ULL}"), json!(["NULL"]));
        assert_eq!(ok(1009, "{ a b }"), json!(["a b"]));
        assert_eq!(ok(1009, r"{ a \b }"), json!(["a b"]));
        assert_eq!(ok(1015, r#"{"\\x01"}"#), json!(["\\x01"]));
        assert_eq!(ok(1014, r#"{"ab  "}"#), json!(["ab  "]));
    }

    #[test]
    fn arrays_use_element_rules() {
        assert_eq!(ok(1000, "{t,f,NULL}"), json!([true, false, null]));
        assert_eq!(ok(1001, r#"{"\\x01ff",NULL}"#), json!(["Af8=", null]));
        assert_eq!(
            ok(1022, "{1.5,NaN,-Infinity}"),
            json!([1.5, "NaN", "-Infinity"])
        );
        assert_eq!(ok(1021, "{1.1}"), json!([1.1]));
        assert_eq!(
            ok(1231, "{1.50,12345678901234567890.1}"),
            json!(["1.50", "12345678901234567890.1"])
        );
        assert_eq!(ok(791, r#"{"$1,000.00"}"#), json!(["$1,000.00"]));
        assert_eq!(
            ok(
                1185,
                r#"{"2024-01-02 03:04:05+00","2024-01-02 03:04:05.5-08"}"#
            ),
            json!(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5-08:00"])
        );
        assert_eq!(
            ok(1115, r#"{"2024-01-02 03:04:05"}"#),
            json!(["2024-01-02T03:04:05"])
        );
        assert_eq!(
            ok(1182, "{2024-01-02,infinity}"),
            json!(["2024-01-02", "infinity"])
        );
        assert_eq!(ok(1183, "{03:04:05}"), json!(["03:04:05"]));
        assert_eq!(ok(1187, "{P1D,PT1S}"), json!(["P1D", "PT1S"]));
        assert_eq!(
            ok(2951, "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}"),
            json!(["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"])
        );
        assert_eq!(
            ok(3807, r#"{"{\"a\": 1}","[1, 2]",NULL}"#),
            json!([{"a": 1}, [1, 2], null])
        );
        assert_eq!(ok(199, r#"{"\"s\""}"#), json!(["s"]));
        assert_eq!(ok(1002, r#"{a,"\\"}"#), json!(["a", "\\"]));
        assert_eq!(ok(1003, "{pg_catalog}"), json!(["pg_catalog"]));
        // box arrays are the one builtin with a ';' delimiter.
        assert_eq!(
            ok(1020, "{(3,4),(1,2);(1,1),(0,0)}"),
            json!(["(3,4),(1,2)", "(1,1),(0,0)"])
        );
    }

    #[test]
    fn array_element_errors_name_the_position() {
        let err = conv(1007, "{1,2,x}").unwrap_err();
        assert!(matches!(err, ValueError::ArrayElement { index: 2, .. }));
        assert_eq!(
            err.to_string(),
            "invalid element at index 2 of _int4 (type oid 1007): \
             invalid int4 text (type oid 23): not an integer in the type's range"
        );
        let err = conv(1016, "{{1,2},{3,oops}}").unwrap_err();
        assert!(matches!(err, ValueError::ArrayElement { index: 3, .. }));
        assert!(!err.to_string().contains("oops"));
    }

    #[test]
    fn malformed_arrays() {
        for text in [
            "",
            "1,2",
            "{",
            "}",
            "{1,2",
            "{1,}",
            "{,1}",
            "{1,,2}",
            "{1 2,3}x",
            "{{1,2},3}",
            "{1,{2,3}}",
            "{{1,2},{3}}",
            "{\"a}",
            "{\"a\"b}",
            "{\"a\"x\"b\"}",
            "{{1}x{2}}",
            "{a\"b\"}",
            "{a{b}",
            "{a\\",
            "{\"a\\",
            "{{{{{{{1}}}}}}}",
            "{}}",
            "[1:1]",
            "={1}",
        ] {
            let err = conv(1009, text).err();
            assert!(err.is_some(), "{text:?} was accepted");
        }
        assert_eq!(
            conv(1009, "{1,2").unwrap_err().to_string(),
            "invalid _text text (type oid 1009): unterminated array"
        );
        // Six dimensions is PostgreSQL's maximum and still accepted.
        assert_eq!(ok(1007, "{{{{{{1}}}}}}"), json!([[[[[[1]]]]]]));
        let deep = format!("{}1{}", "{".repeat(100_000), "}".repeat(100_000));
        problem(1007, &deep);
    }

    #[test]
    fn type_names() {
        let mut types = TypeRegistry::default();
        types.insert(16385, "public".into(), "mood".into());
        assert_eq!(type_name(20, &types), "int8");
        assert_eq!(type_name(1007, &types), "_int4");
        assert_eq!(type_name(16385, &types), "mood");
        assert_eq!(type_name(424242, &types), "oid 424242");
        assert!(is_array_type(1007));
        assert!(is_array_type(3807));
        assert!(!is_array_type(23));
        assert!(!is_array_type(22));
        assert!(!is_array_type(16385));
    }

    #[test]
    fn errors_never_echo_the_value() {
        let secret = "alice@example.com";
        for &(oid, _) in BUILTIN_TYPES {
            if let Err(e) = conv(oid, secret) {
                assert!(!e.to_string().contains("alice"), "{e}");
            }
        }
        for &(oid, ..) in ARRAY_TYPES {
            for text in [format!("{{{secret}}}"), format!("{{\"{secret}\",")] {
                if let Err(e) = conv(oid, &text) {
                    assert!(!e.to_string().contains("alice"), "{e}");
                }
            }
        }
    }

    /// Random bytes and random array-ish text for every known oid (and some
    /// unknown ones) must produce a value or an error, never a panic.
    #[test]
    fn garbage_never_panics() {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: &[u8] = b"{}[]:=,;\"\\ \t-+.0123456789eEnNuUlLtfx:TZ BCa\xc3\xa9\xff\x00";
        let oids: Vec<u32> = BUILTIN_TYPES
            .iter()
            .map(|t| t.0)
            .chain(ARRAY_TYPES.iter().map(|t| t.0))
            .chain([0, 1, 16385, u32::MAX])
            .collect();
        let types = TypeRegistry::default();
        for &oid in &oids {
            for _ in 0..300 {
                let len = (next() % 40) as usize;
                let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let _ = text_to_json(oid, &random, &types);
                let structured: Vec<u8> = (0..len)
                    .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                    .collect();
                let _ = text_to_json(oid, &structured, &types);
                let mut braced = b"{".to_vec();
                braced.extend_from_slice(&structured);
                braced.push(b'}');
                let _ = text_to_json(oid, &braced, &types);
            }
        }
        // Every prefix of valid literals.
        for (oid, text) in [
            (1009, r#"[0:1]={"a\"b",NULL}"#),
            (1185, r#"{"2024-01-02 03:04:05.5+05:30"}"#),
            (1184, "2024-01-02 03:04:05.123456+05:53:28 BC"),
            (1001, r#"{"\\x0a0b"}"#),
        ] {
            for end in 0..text.len() {
                let _ = text_to_json(oid, &text.as_bytes()[..end], &types);
            }
        }
    }
}

/// Property tests: text PostgreSQL prints for a supported type becomes the
/// expected JSON, and any text at all becomes JSON or an error, never a
/// panic.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn conv(oid: u32, text: &[u8]) -> Result<Value, ValueError> {
        text_to_json(oid, text, &TypeRegistry::default())
    }

    fn all_oids() -> Vec<u32> {
        BUILTIN_TYPES
            .iter()
            .map(|t| t.0)
            .chain(ARRAY_TYPES.iter().map(|t| t.0))
            .chain([0, 16385, u32::MAX])
            .collect()
    }

    /// JSON documents as PostgreSQL's jsonb prints them: any nesting of
    /// objects, arrays, strings, integers of any length and decimals.
    fn json_text() -> impl Strategy<Value = String> {
        let number = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            "-?[1-9][0-9]{0,60}",
            "-?(0|[1-9][0-9]{0,30})\\.[0-9]{1,40}",
        ];
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            number,
            any::<String>().prop_map(|s| Value::String(s).to_string()),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::btree_map(any::<String>(), inner, 0..6).prop_map(|m| {
                    let fields: Vec<String> = m
                        .into_iter()
                        .map(|(k, v)| format!("{}: {v}", Value::String(k)))
                        .collect();
                    format!("{{{}}}", fields.join(", "))
                }),
            ]
        })
    }

    /// PostgreSQL's array output for text elements: quoted when needed,
    /// with `"` and `\` escaped.
    fn text_array_literal(items: &[Option<String>]) -> String {
        let quoted = |s: &str| {
            let needs = s.is_empty()
                || s.eq_ignore_ascii_case("null")
                || s.chars().any(|c| {
                    matches!(
                        c,
                        '{' | '}' | ',' | '"' | '\\' | ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c'
                    )
                });
            if needs {
                format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
            } else {
                s.to_string()
            }
        };
        let parts: Vec<String> = items
            .iter()
            .map(|i| i.as_deref().map_or("NULL".to_string(), quoted))
            .collect();
        format!("{{{}}}", parts.join(","))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_never_panic(oid in prop::sample::select(all_oids()), bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = conv(oid, &bytes);
        }

        #[test]
        fn any_string_never_panics(oid in prop::sample::select(all_oids()), text in any::<String>()) {
            let _ = conv(oid, text.as_bytes());
            let _ = conv(oid, format!("{{{text}}}").as_bytes());
        }

        #[test]
        fn json_and_jsonb_round_trip_exactly(text in json_text()) {
            for oid in [JSON, JSONB] {
                let v = conv(oid, text.as_bytes()).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let compact: Value = serde_json::from_str(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(serde_json::to_string(&v).ok(), serde_json::to_string(&compact).ok());
            }
        }

        #[test]
        fn integers_are_numbers(n in any::<i64>(), m in any::<i32>(), k in any::<i16>()) {
            prop_assert_eq!(conv(INT8, n.to_string().as_bytes()).ok(), Some(Value::from(n)));
            prop_assert_eq!(conv(INT4, m.to_string().as_bytes()).ok(), Some(Value::from(m)));
            prop_assert_eq!(conv(INT2, k.to_string().as_bytes()).ok(), Some(Value::from(k)));
        }

        #[test]
        fn numeric_stays_exact(text in "-?(0|[1-9][0-9]{0,80})(\\.[0-9]{1,80})?") {
            prop_assert_eq!(conv(NUMERIC, text.as_bytes()).ok(), Some(Value::String(text)));
        }

        #[test]
        fn text_arrays_round_trip(items in prop::collection::vec(prop::option::of(any::<String>()), 0..8)) {
            let literal = text_array_literal(&items);
            let expected = Value::Array(items.into_iter().map(|i| i.map_or(Value::Null, Value::String)).collect());
            prop_assert_eq!(conv(1009, literal.as_bytes()).ok(), Some(expected));
        }

        #[test]
        fn int_arrays_round_trip(items in prop::collection::vec(prop::option::of(any::<i64>()), 0..8)) {
            let parts: Vec<String> = items.iter().map(|i| i.map_or("NULL".into(), |n| n.to_string())).collect();
            let literal = format!("{{{}}}", parts.join(","));
            let expected = Value::Array(items.into_iter().map(|i| i.map_or(Value::Null, Value::from)).collect());
            prop_assert_eq!(conv(1016, literal.as_bytes()).ok(), Some(expected));
        }
    }
}
