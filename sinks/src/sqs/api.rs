//! One [`BatchApi`] for both services: the client made once, each event's message, and a
//! request handed to the service ([`Service`]: SQS or SNS) that builds its SDK entries.

use super::message::Message;
use super::QueueSettings;
use crate::aws::{sdk_config_of, MAX_ENTRIES_PER_REQUEST};
use crate::batch::{BatchApi, EntryResult, RequestError};
use crate::{Event, SinkError};
use async_trait::async_trait;
use aws_config::SdkConfig;
use std::marker::PhantomData;
use tokio::sync::OnceCell;

/// What differs between SQS and SNS.
#[async_trait]
pub(super) trait Service: Send + Sync + 'static {
    type Client: Send + Sync + 'static;
    /// The service's name, for dead-letter reasons.
    const SERVICE: &'static str;
    /// The batch operation's name, for messages.
    const OPERATION: &'static str;
    fn client(config: &SdkConfig) -> Self::Client;
    /// Sends one request of `messages` to `destination`; one result per message, in order.
    async fn send(
        client: &Self::Client,
        destination: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<EntryResult>, RequestError>;
    /// What to do about a fatal error `code`.
    fn fatal_hint(settings: &QueueSettings, code: &str) -> String;
    /// Problems `outbox-relay check` reports, one line each with the fix.
    async fn check(client: &Self::Client, settings: &QueueSettings) -> Vec<String>;
}

pub(super) struct Api<S: Service> {
    settings: QueueSettings,
    client: OnceCell<S::Client>,
    service: PhantomData<S>,
}

impl<S: Service> Api<S> {
    pub(super) fn new(settings: QueueSettings) -> Self {
        Api {
            settings,
            client: OnceCell::new(),
            service: PhantomData,
        }
    }

    async fn client(&self) -> Result<&S::Client, SinkError> {
        let s = &self.settings;
        self.client
            .get_or_try_init(|| async {
                let region = s.region.as_deref();
                let config =
                    sdk_config_of(&s.name, region, s.endpoint_url.as_deref(), s.timeout).await?;
                Ok(S::client(&config))
            })
            .await
    }

    /// Problems that would stop the sink or dead-letter its events, one line each.
    pub(super) async fn check(&self) -> Vec<String> {
        match self.client().await {
            Ok(client) => S::check(client, &self.settings).await,
            Err(err) => vec![err.to_string()],
        }
    }
}

#[async_trait]
impl<S: Service> BatchApi for Api<S> {
    type Entry = Message;
    const MAX_ENTRIES: usize = MAX_ENTRIES_PER_REQUEST;
    const SERVICE: &'static str = S::SERVICE;
    const OPERATION: &'static str = S::OPERATION;

    fn name(&self) -> &str {
        &self.settings.name
    }

    fn concurrency(&self) -> usize {
        self.settings.concurrency
    }

    fn max_request_bytes(&self) -> usize {
        self.settings.max_request_bytes
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.client().await.map(drop)
    }

    fn entry(&self, event: &Event) -> Result<(Message, usize), String> {
        self.settings.message(event)
    }

    async fn put(&self, messages: Vec<Message>) -> Result<Vec<EntryResult>, RequestError> {
        let client = self.client.get().expect("ready() made the client");
        S::send(client, &self.settings.destination, messages).await
    }

    fn fatal_hint(&self, code: &str, _entries: &[&Message]) -> String {
        S::fatal_hint(&self.settings, code)
    }
}
