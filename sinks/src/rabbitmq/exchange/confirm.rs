//! Publisher confirms in exchange mode: what the broker answered about each publish
//! (confirmed, nacked, returned as unroutable), which event a returned message belongs to,
//! and what each answer does under the sink's policies, including the per-key rule that a
//! retried event takes the later events of its key along.

use super::broker::classify;
use super::ExchangeSettings;
use crate::rabbitmq::{permanent, retryable, Policy};
use crate::{Event, EventState, SinkError};
use lapin::message::BasicReturnMessage;
use lapin::{Confirmation, PublisherConfirm};
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use tracing::warn;

/// What the broker said about one publish.
pub(super) enum Answer {
    Confirmed,
    Nacked,
    Unroutable(String),
}

/// A message RabbitMQ returned as unroutable. lapin hands it to whichever confirm
/// completes next (with a multiple ack, any of the acknowledged ones), not necessarily the
/// returned message's own: its `message_id` (the event id) says whose it is.
pub(super) struct Returned {
    message_id: Option<String>,
    reason: String,
}

/// A message handed to lapin. `basic_publish` queues the message's frames for lapin's I/O
/// thread on its first poll and then waits until that thread has written them; awaiting each
/// publish in turn would cost a hand-off between threads per message. So the first poll
/// happens at once (messages go out in the order they were started) and the write is
/// awaited together with the confirm.
pub(super) enum Publishing<F> {
    Writing(Pin<Box<F>>),
    Written(lapin::Result<PublisherConfirm>),
}

impl<F: Future<Output = lapin::Result<PublisherConfirm>>> Publishing<F> {
    pub(super) async fn start(publish: F) -> Self {
        let mut publish = Box::pin(publish);
        match std::future::poll_fn(|cx| Poll::Ready(publish.as_mut().poll(cx))).await {
            Poll::Ready(written) => Publishing::Written(written),
            Poll::Pending => Publishing::Writing(publish),
        }
    }

    /// What the broker answered for the message, and the returned message its confirm
    /// carried, if any.
    pub(super) async fn answer(
        self,
        settings: &ExchangeSettings,
        context: &str,
    ) -> Result<(Answer, Option<Returned>), SinkError> {
        let written = match self {
            Publishing::Writing(publish) => publish.await,
            Publishing::Written(written) => written,
        };
        let confirm =
            written.map_err(|err| classify(&format!("{context}: publishing"), &err, settings))?;
        await_confirm(confirm, settings).await
    }
}

pub(super) async fn await_confirm(
    confirm: PublisherConfirm,
    settings: &ExchangeSettings,
) -> Result<(Answer, Option<Returned>), SinkError> {
    let context = format!("sink {}", settings.name);
    let confirmation = tokio::time::timeout(settings.timeout, confirm)
        .await
        .map_err(|_| {
            retryable(format!(
                "{context}: no publisher confirm within {:?}; reconnecting",
                settings.timeout
            ))
        })?
        .map_err(|err| classify(&format!("{context}: waiting for a confirm"), &err, settings))?;
    let describe = |returned: BasicReturnMessage| Returned {
        message_id: returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned()),
        reason: format!(
            "returned by RabbitMQ: {} {} (no queue is bound to exchange {:?} for routing key \
             {:?})",
            returned.reply_code,
            returned.reply_text,
            settings.exchange,
            returned.delivery.routing_key.as_str()
        ),
    };
    Ok(match confirmation {
        Confirmation::Ack(returned) => (Answer::Confirmed, returned.map(describe)),
        Confirmation::Nack(returned) => (Answer::Nacked, returned.map(describe)),
        Confirmation::NotRequested => {
            return Err(retryable(format!(
                "{context}: the channel is not in confirm mode; reconnecting"
            )))
        }
    })
}

/// What one publishing round learned, as the confirms come in.
pub(super) struct Answers<'a> {
    /// The round's events, among which a returned message's owner is looked up by id
    /// (returns are rare: no index is built for them).
    pub(super) round: &'a [usize],
    /// Events returned as unroutable: their own confirm, which may come before or after the
    /// returned message, must not mark them confirmed.
    pub(super) returned: HashSet<usize>,
    /// Events to publish again, with why.
    pub(super) to_retry: Vec<(usize, String)>,
}

impl<'a> Answers<'a> {
    pub(super) fn new(round: &'a [usize]) -> Self {
        Answers {
            round,
            returned: HashSet::new(),
            to_retry: Vec::new(),
        }
    }

    /// Settles event `index` by its confirm, and the owner of the returned message the
    /// confirm carried.
    pub(super) fn settle(
        &mut self,
        settings: &ExchangeSettings,
        batch: &[Event],
        index: usize,
        (answer, returned): (Answer, Option<Returned>),
        states: &mut [EventState],
    ) -> Result<(), SinkError> {
        if !self.returned.contains(&index) {
            settle(settings, batch, index, answer, states, &mut self.to_retry)?;
        }
        let Some(returned) = returned else {
            return Ok(());
        };
        let owner = returned.message_id.as_deref().and_then(|id| {
            self.round
                .iter()
                .copied()
                .find(|i| batch[*i].id.as_str() == id && !self.returned.contains(i))
        });
        let owner = owner.unwrap_or_else(|| {
            warn!(sink = %settings.name, message_id = ?returned.message_id, "RabbitMQ returned a message of no event in flight; counting it against the confirm that carried it");
            index
        });
        self.returned.insert(owner);
        // The return decides: a retry the owner's own nack asked for is taken back.
        self.to_retry.retain(|&(retried, _)| retried != owner);
        let answer = Answer::Unroutable(returned.reason);
        settle(settings, batch, owner, answer, states, &mut self.to_retry)
    }
}

/// Applies the policy for what the broker answered about event `index`.
pub(super) fn settle(
    settings: &ExchangeSettings,
    batch: &[Event],
    index: usize,
    answer: Answer,
    states: &mut [EventState],
    to_retry: &mut Vec<(usize, String)>,
) -> Result<(), SinkError> {
    let (policy, reason) = match answer {
        Answer::Confirmed => {
            states[index] = EventState::Acked;
            return Ok(());
        }
        Answer::Nacked => (
            settings.on_nack,
            "nacked by RabbitMQ (a queue refused it: full with x-overflow=reject-publish, or \
             an internal error)"
                .to_owned(),
        ),
        Answer::Unroutable(reason) => (settings.on_unroutable, reason),
    };
    let event = &batch[index];
    match policy {
        Policy::Retry => to_retry.push((index, reason)),
        Policy::DeadLetter => states[index] = EventState::Rejected(reason),
        Policy::Fail => {
            return Err(permanent(format!(
                "sink {}: event {} at {} was {reason}; fix the broker side (or set on_nack / \
                 on_unroutable to retry or dead-letter), then restart the relay",
                settings.name, event.id, event.position
            )))
        }
    }
    Ok(())
}

/// Event `index` is published again: so are the later events of its key that the broker
/// already confirmed, so that the key's last copies stay in order.
pub(super) fn republish_later_events_of_key(
    batch: &[Event],
    index: usize,
    states: &mut [EventState],
) {
    states[index] = EventState::Pending;
    let key = &batch[index].key;
    for later in index + 1..batch.len() {
        if batch[later].key == *key && states[later] == EventState::Acked {
            states[later] = EventState::Pending;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::sample;
    use crate::Text;

    #[test]
    fn a_retry_takes_the_later_confirmed_events_of_the_same_key_along() {
        let mut batch = vec![sample(1, 0), sample(1, 1), sample(1, 2), sample(1, 3)];
        batch[1].key = Text::from("other");
        let mut states = vec![
            EventState::Pending,
            EventState::Acked,
            EventState::Acked,
            EventState::Rejected("too big".into()),
        ];
        republish_later_events_of_key(&batch, 0, &mut states);
        assert_eq!(
            states,
            vec![
                EventState::Pending,
                EventState::Acked,
                EventState::Pending,
                EventState::Rejected("too big".into())
            ]
        );
    }
}
