//! The Stripe sink (skeleton: being implemented).

use futures::future::BoxFuture;

use super::{Sink, SinkError};
use crate::change::Change;
use crate::config::SinkConfig;

pub struct StripeSink {}

impl StripeSink {
    pub fn new(_cfg: &SinkConfig) -> Result<Self, String> {
        Err("the stripe sink is not implemented yet".into())
    }
}

impl Sink for StripeSink {
    fn name(&self) -> &'static str {
        "stripe"
    }

    fn push<'a>(
        &'a self,
        _change: &'a Change,
        _external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(async { Err(SinkError::Malformed("not implemented".into())) })
    }
}
