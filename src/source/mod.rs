//! Everything between the replication slot and the pipeline: the pgoutput
//! decoder, text values to JSON, turning tuples of the users table into
//! `Change`s, and the reader task that streams the slot.

pub mod pgoutput;
pub mod rows;
pub mod stream;
pub mod value;
