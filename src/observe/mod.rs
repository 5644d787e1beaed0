//! What operators see: Prometheus metrics and the health endpoints
//! (`metrics`), log set-up (`logging`), progress of the long commands (`progress`). Takes plain values from the layers
//! above; imports no domain type.

pub mod listener;
pub mod logging;
pub mod metrics;
pub mod page;
pub mod progress;
