//! The Memberstack sink (skeleton: being implemented).

use futures::future::BoxFuture;

use super::{Sink, SinkError};
use crate::change::Change;
use crate::config::SinkConfig;

pub struct MemberstackSink {}

impl MemberstackSink {
    pub fn new(_cfg: &SinkConfig) -> Result<Self, String> {
        Err("the memberstack sink is not implemented yet".into())
    }
}

impl Sink for MemberstackSink {
    fn name(&self) -> &'static str {
        "memberstack"
    }

    fn push<'a>(
        &'a self,
        _change: &'a Change,
        _external_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Option<String>, SinkError>> {
        Box::pin(async { Err(SinkError::Malformed("not implemented".into())) })
    }
}
