//! The session settings under which values are read as text: the replication
//! connection and every SQL session that reads rows the way the stream sends
//! them. Written once as (name, value) pairs; both spellings derive from it.

/// Declares the settings once and derives their two spellings.
macro_rules! settings {
    ($n0:literal = $v0:literal $(, $n:literal = $v:literal)* $(,)?) => {
        /// The settings that fix the text output of values, as (name, value).
        pub const VALUE_SETTINGS: &[(&str, &str)] = &[($n0, $v0) $(, ($n, $v))*];

        /// [`VALUE_SETTINGS`] as a startup `options` string (`-c name=value …`),
        /// for the replication connection.
        pub const STARTUP_OPTIONS: &str = concat!("-c ", $n0, "=", $v0 $(, " -c ", $n, "=", $v)*);

        /// [`VALUE_SETTINGS`] as SET statements, plus
        /// `standard_conforming_strings` (for key literals written into SQL;
        /// the stream has no use for it), for a SQL session.
        pub const SQL: &str = concat!(
            "SET ", $n0, "=", $v0 $(, "; SET ", $n, "=", $v)*,
            "; SET standard_conforming_strings=on"
        );
    };
}

settings!(
    "DateStyle" = "ISO",
    "TimeZone" = "UTC",
    "IntervalStyle" = "iso_8601",
    "extra_float_digits" = "3",
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_follow_the_list() {
        assert_eq!(
            STARTUP_OPTIONS,
            "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=iso_8601 -c extra_float_digits=3"
        );
        assert_eq!(
            SQL,
            "SET DateStyle=ISO; SET TimeZone=UTC; SET IntervalStyle=iso_8601; \
             SET extra_float_digits=3; SET standard_conforming_strings=on"
        );
        for (name, value) in VALUE_SETTINGS {
            assert!(STARTUP_OPTIONS.contains(&format!("-c {name}={value}")));
            assert!(SQL.contains(&format!("SET {name}={value};")));
        }
    }
}
