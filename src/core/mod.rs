//! The domain vocabulary every other layer speaks: changes, keys and LSNs,
//! what a push or a write-back came to, webhook secrets and signatures.
//! No I/O and no imports from the rest of the crate.

pub mod change;
pub mod error;
pub mod inbound;
pub mod inbound_event;
pub mod names;
pub mod outcome;
pub mod session;
pub mod signature;
pub mod table;
